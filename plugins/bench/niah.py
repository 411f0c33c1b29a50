"""``spl bench niah``: needle-in-a-haystack (passkey) retrieval at context lengths x needle
depths, superlinear against dense attention on the same weights (``Model.with_attention``).

A case: a haystack of filler sentences generated here from a seed (no downloads, the same text
on every machine), about L tokens long, with the needle sentence ("The pass key is 52817.
Remember it. 52817 is the pass key.") at depth d (0: the start, 1: the end), then the question.
A chat model gets it as one user message and its answer begins "The pass key is"; a model
without a chat template gets the raw text. Greedy decoding of a few tokens; a hit when the
passkey's digits are in the answer. Both attentions answer exactly the same prompts. Inside the
attention window superlinear attention is dense attention, so the two must agree there.
torch is imported only when the command runs.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import click

from superlinear.bus import Context
from superlinear.plugins.bench.lengths import ModelCases, case_error, exit_on_failed_cases, fmt_length, parse_length
from superlinear.plugins.bench.provenance import provenance, provenance_line

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"
REPEATED = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
            "There and back again.")
_ADJECTIVES = ("quiet", "old", "bright", "narrow", "wooden", "distant", "small", "heavy", "pale", "busy",
               "gentle", "crooked", "warm", "empty", "tall")
_NOUNS = ("river", "garden", "lantern", "village", "teacher", "window", "market", "forest", "letter", "bridge",
          "kitchen", "sailor", "mountain", "library", "orchard", "train", "painter", "harbor", "meadow", "clock")
_VERBS = ("passes", "watches", "follows", "leans on", "waits for", "remembers", "crosses", "circles",
          "faces", "shelters", "reaches", "ignores", "guards", "greets", "outlasts")
_PLACES = ("at dawn", "after the rain", "in the evening", "every winter", "before noon", "without a sound",
           "near the square", "by the old road", "under the clouds", "once a year")


@dataclass(frozen=True)
class BenchNiah(ModelCases):
    dense_max_len: int = 256 * 1024
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 2
    haystack: str = "varied"  # or "repeat": the classic passkey filler
    prompt_format: str = "auto"  # chat (the model's template), raw, or auto (chat when it has one)
    answer_tokens: int = 10
    seed: int = 0


def filler(kind: str, rng: random.Random):
    """Endless filler sentences without digits: ``repeat`` cycles the classic passkey filler,
    ``varied`` draws simple sentences from small word lists."""
    index = 0
    while True:
        if kind == "repeat":
            yield REPEATED[index % len(REPEATED)]
        else:
            yield (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
                   f"{rng.choice(_NOUNS)} {rng.choice(_PLACES)}.")
        index += 1


def needle(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def haystack_text(kind: str, sentences: int, depth: float, passkey: str, seed: str) -> str:
    """``sentences`` filler sentences with the needle inserted at ``depth`` (a sentence boundary)."""
    source = filler(kind, random.Random(seed))
    body = [next(source) for _ in range(sentences)]
    body.insert(round(depth * sentences), needle(passkey))
    return " ".join(body)


class PromptBuilder:
    """Token ids of a case's prompt, sized to a target length in tokens."""

    def __init__(self, model, kind: str, prompt_format: str):
        if model.tokenizer is None:
            from superlinear.errors import InvalidRequest

            raise InvalidRequest(f"spl bench niah needs a model with a tokenizer; {model.name} has none")
        self.model, self.kind = model, kind
        has_template = bool(getattr(model.tokenizer, "chat_template", None))
        self.chat = has_template if prompt_format == "auto" else prompt_format == "chat"
        sample = " ".join(s for s, _ in zip(filler(kind, random.Random(0)), range(200), strict=False))
        self.tokens_per_sentence = len(model.tokenizer.encode(sample, add_special_tokens=False)) / 200
        self.overhead = len(self.ids(""))

    def ids(self, text: str) -> list[int]:
        encode = self.model.tokenizer.encode
        if self.chat:
            ids = self.model.chat_token_ids([{"role": "user", "content": INTRO + text + QUESTION}])
            return ids + encode(ANSWER_PREFIX, add_special_tokens=False)
        return encode(INTRO + text + QUESTION + " " + ANSWER_PREFIX)

    def build(self, length: int, depth: float, passkey: str, seed: str) -> list[int]:
        room = length - self.overhead - len(self.model.tokenizer.encode(needle(passkey), add_special_tokens=False))
        sentences = max(1, int(room / self.tokens_per_sentence))
        return self.ids(haystack_text(self.kind, sentences, depth, passkey, seed))


def answer(model, ids: list[int], tokens: int, chunk_size: int) -> str:
    """Greedy decoding of up to ``tokens`` tokens after ``ids`` (stops at end of sequence)."""
    cache = model.new_cache(len(ids) + tokens + 1)
    logits = model.prefill(cache, ids, chunk_size=chunk_size)
    stop = getattr(model.tokenizer, "eos_token_id", None)
    out: list[int] = []
    for _ in range(tokens):
        token = int(logits.argmax())
        if token == stop:
            break
        out.append(token)
        logits = model.decode_step(cache, token)
    return model.tokenizer.decode(out)


def run_bench(command: BenchNiah, ctx: Context | None = None) -> dict:
    from superlinear.model import load_model
    from superlinear.pluginloader import model_loaders

    base = load_model(command.model, device=command.device, dtype=command.dtype, loaders=model_loaders())
    lengths = command.lengths or ((4096, 8192, 16384, 32768, 65536, 131072, 262144)
                                  if base.device.type == "cuda" else (256, 512, 768))
    builder = PromptBuilder(base, command.haystack, command.prompt_format)
    chunk_size = command.chunk_size or base.prefill_chunk_size()
    rows = []
    for length in lengths:
        for depth in command.depths:
            cases = []
            for trial in range(command.trials):
                seed = f"{command.seed}:{length}:{depth}:{trial}"
                passkey = str(random.Random(seed).randrange(10000, 100000))
                cases.append((passkey, builder.build(length, depth, passkey, seed)))
            for attention in command.attentions:
                row = {"length": length, "depth": depth, "attention": attention,
                       "tokens": round(sum(len(ids) for _, ids in cases) / len(cases))}
                if attention == "dense" and length > command.dense_max_len:
                    rows.append({**row, "skipped": "above --dense-max-len"})
                    continue
                model = base.with_attention(attention)
                started = time.perf_counter()
                try:
                    answers = [answer(model, ids, command.answer_tokens, chunk_size) for _, ids in cases]
                except Exception as exc:  # one failing case (e.g. out of memory) must not end the run
                    rows.append({**row, "error": case_error(exc)})
                    continue
                keys = [passkey for passkey, _ in cases]
                hits = [key in text for key, text in zip(keys, answers, strict=True)]
                rows.append({**row, "hits": sum(hits), "trials": len(hits), "hit_rate": sum(hits) / len(hits),
                             "seconds": time.perf_counter() - started,
                             "answers": [{"passkey": k, "answer": a} for k, a in zip(keys, answers, strict=True)]})
    info = base.info()
    return {**provenance(base.device), "model": base.name, "dtype": info["dtype"], "window": base.window,
            "span_params": info["attention"], "forward": info["forward"], "forward_reason": info["forward_reason"],
            "haystack": command.haystack, "format": "chat" if builder.chat else "raw", "trials": command.trials,
            "answer_tokens": command.answer_tokens, "lengths": list(lengths), "depths": list(command.depths),
            "rows": rows, "summary": summary(rows)}


def summary(rows: list[dict]) -> dict:
    """Per attention: the hit rate over every case that ran, and per length."""
    out: dict = {}
    for row in rows:
        if "hits" not in row:
            continue
        entry = out.setdefault(row["attention"], {"hits": 0, "trials": 0, "by_length": {}})
        entry["hits"] += row["hits"]
        entry["trials"] += row["trials"]
        by = entry["by_length"].setdefault(str(row["length"]), [0, 0])
        by[0] += row["hits"]
        by[1] += row["trials"]
    for entry in out.values():
        entry["hit_rate"] = entry["hits"] / entry["trials"]
        entry["by_length"] = {k: hits / trials for k, (hits, trials) in entry["by_length"].items()}
    return out


def markdown(result: dict) -> str:
    attentions = list(dict.fromkeys(r["attention"] for r in result["rows"]))
    trials = f"{result['trials']} trial{'s' if result['trials'] != 1 else ''}"
    lines = [f"{result['date']} · model `{result['model']}` · {result['dtype']} · window {result['window']} · "
             f"{result['haystack']} haystack, {result['format']} prompt · {trials} per cell",
             provenance_line(result), "",
             "| context | " + " | ".join(f"depth {d:g}" for d in result["depths"]) + " | mean |",
             "|---:|" + "---:|" * (len(result["depths"]) + 1)]
    cells = {(r["length"], r["depth"], r["attention"]): r for r in result["rows"]}
    for length in result["lengths"]:
        parts = []
        for depth in result["depths"]:
            values = []
            for attention in attentions:
                row = cells.get((length, depth, attention), {})
                values.append(f"{row['hit_rate']:.0%}" if "hit_rate" in row else "-")
            parts.append(" / ".join(values))
        means = [result["summary"].get(a, {}).get("by_length", {}).get(str(length)) for a in attentions]
        mean = " / ".join("-" if m is None else f"{m:.0%}" for m in means)
        lines.append(f"| {fmt_length(length)} | " + " | ".join(parts) + f" | {mean} |")
    overall = ", ".join(f"{a} {result['summary'][a]['hit_rate']:.1%}" for a in attentions if a in result["summary"])
    lines += ["", f"Cells: hit rate {' / '.join(attentions)}. Overall: {overall}."]
    return "\n".join(lines)


@click.command("niah")
@click.option("--model", default="default", show_default=True, help="A model spec with a tokenizer.")
@click.option("--device", default=None, help="cpu / cuda (default: cuda if available).")
@click.option("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on CUDA, fp32 on CPU).")
@click.option("--lengths", default=None,
              help="Comma-separated prompt lengths in tokens (default: 256,512,768 on CPU; 4K..256K on CUDA).")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True,
              help="Comma-separated needle depths, 0 (start) to 1 (end).")
@click.option("--trials", default=2, show_default=True, type=click.IntRange(1, 1000),
              help="Prompts (passkeys and haystacks) per length and depth.")
@click.option("--attention", "attentions", default="superlinear,dense", show_default=True,
              help="Attentions to run, comma-separated: superlinear, dense (plain causal).")
@click.option("--dense-max-len", default="256K", show_default=True, help="Skip dense attention above this.")
@click.option("--haystack", type=click.Choice(["varied", "repeat"]), default="varied", show_default=True,
              help="varied: generated sentences; repeat: the classic passkey filler.")
@click.option("--format", "prompt_format", type=click.Choice(["auto", "chat", "raw"]), default="auto",
              show_default=True, help="chat: the model's chat template; auto: chat when the model has one.")
@click.option("--answer-tokens", default=10, show_default=True, type=click.IntRange(1, 256),
              help="Tokens generated for each answer (the passkey must be among them).")
@click.option("--chunk-size", default=None, type=int, help="Prefill chunk (default: the model's choice).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the passkeys and haystacks (the same seed, the same prompts).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write the output to this file.")
def command(model, device, dtype, lengths, depths, trials, attentions, dense_max_len, haystack, prompt_format,
            answer_tokens, chunk_size, seed, as_json, out_file) -> None:
    """Passkey retrieval at lengths x depths, superlinear vs dense on the same weights."""
    try:
        parsed_depths = tuple(float(d) for d in depths.split(",") if d.strip())
        parsed_lengths = tuple(parse_length(x) for x in lengths.split(",") if x.strip()) if lengths else ()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not parsed_depths or any(not 0.0 <= d <= 1.0 for d in parsed_depths):
        raise click.BadParameter("depths must be numbers from 0 to 1", param_hint="--depths")
    if any(n < 64 for n in parsed_lengths):
        raise click.BadParameter("lengths must be at least 64 tokens", param_hint="--lengths")
    result = run_bench(BenchNiah(model=model, device=device, dtype=dtype, lengths=parsed_lengths, depths=parsed_depths,
                                trials=trials, attentions=tuple(a.strip() for a in attentions.split(",") if a.strip()),
                                dense_max_len=parse_length(dense_max_len), haystack=haystack,
                                prompt_format=prompt_format, answer_tokens=answer_tokens, chunk_size=chunk_size,
                                seed=seed))
    text = json.dumps(result, indent=2, default=str) if as_json else markdown(result)
    click.echo(text)
    if out_file:
        with open(out_file, "w") as fh:
            fh.write(text + "\n")
    exit_on_failed_cases(result["rows"])


