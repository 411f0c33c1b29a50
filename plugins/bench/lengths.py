"""Context lengths as people write them on the command line: 512, 16K, 1M (powers of 1024); what
the model benches run over them (``ModelCases``); the failed cases (their error text, and the exit
status they give)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelCases:
    """The cases a model bench runs: ``model`` on ``device`` in ``dtype`` (None: the loader's
    choice) at each of ``lengths`` (empty: the bench's defaults for the device) with each of
    ``attentions``, dense only up to ``dense_max_len``."""

    model: str = "default"
    device: str | None = None
    dtype: str | None = None
    lengths: tuple[int, ...] = ()
    attentions: tuple[str, ...] = ("superlinear", "dense")
    dense_max_len: int = 128 * 1024
    chunk_size: int | None = None  # None: the model's prefill_chunk_size()


def parse_length(text: str) -> int:
    text = text.strip().upper()
    mult = 1
    if text.endswith("K"):
        mult, text = 1024, text[:-1]
    elif text.endswith("M"):
        mult, text = 1024 * 1024, text[:-1]
    return int(float(text) * mult)


def fmt_length(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def case_error(exc: BaseException) -> str:
    """A failed case's ``error``: the exception's type and first line."""
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def exit_on_failed_cases(rows: list[dict]) -> None:
    """After the result is printed: exit 1 when a case failed (a row with ``error``), so scripts
    and CI see a broken benchmark; the other cases' numbers are already out."""
    import click

    failed = [r for r in rows if r.get("error")]
    if failed:
        click.echo(f"spl bench: {len(failed)} of {len(rows)} cases failed (see 'error' in the rows)", err=True)
        raise SystemExit(1)
