"""Parameters of superlinear attention and the exact host tables the kernels read.

Which keys a span contains must not depend on rounding (docs/attention-spec.md, "Exact integers"), so the
stripe offsets ``F(i)`` and the span lengths ``ceil(bf * tp**sp)`` / ``ceil(ff * tp**sp)`` are
computed here once, exactly, and cached per ``(params, length, device)``:

* integer inverse power ``n``: ``F(i) = i**n`` in integer arithmetic;
* float powers: float64, and every value that lands within 1e-9 (relative) of an integer is
  decided exactly with rational arithmetic (the powers and factors are read as the simplest
  fractions that round to the given floats: 0.55 -> 11/20, 0.5 -> 1/2, 3.0 -> 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction
from functools import lru_cache

import numpy as np

_NEAR = 1e-9  # relative distance to an integer below which float64 is not trusted


def _nice_fraction(x: float, max_den: int = 1000) -> Fraction | None:
    """The simplest fraction that rounds to ``x`` (None if there is none with a small denominator)."""
    fr = Fraction(x).limit_denominator(max_den)
    return fr if float(fr) == x else None


@dataclass(frozen=True)
class SpanParams:
    """Parameters of superlinear attention (names as in model configs, see docs/attention-spec.md)."""

    sw_index: int
    num_spans: int
    backward_factor: float
    forward_factor: float
    span_power: float
    search_power: float | None = None
    inv_search_power: int | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"SpanParams: {msg}")

        if isinstance(self.sw_index, bool) or not isinstance(self.sw_index, (int, np.integer)):
            bad(f"sw_index must be an int >= 0, got {self.sw_index!r}")
        if self.sw_index < 0:
            bad(f"sw_index must be >= 0, got {self.sw_index}")
        if isinstance(self.num_spans, bool) or not isinstance(self.num_spans, (int, np.integer)):
            bad(f"num_spans must be an int >= 1, got {self.num_spans!r}")
        if not 1 <= self.num_spans <= 8:
            bad(f"num_spans must be in 1..8, got {self.num_spans}")
        for name in ("backward_factor", "forward_factor", "span_power"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float, np.floating, np.integer)):
                bad(f"{name} must be a number, got {val!r}")
            if not math.isfinite(float(val)):
                bad(f"{name} must be finite, got {val!r}")
            object.__setattr__(self, name, float(val))
        if self.backward_factor < 0:
            bad(f"backward_factor must be >= 0, got {self.backward_factor}")
        if self.forward_factor < 0:
            bad(f"forward_factor must be >= 0, got {self.forward_factor}")
        if not 0 < self.span_power <= 1:
            bad(f"span_power must be in (0, 1], got {self.span_power}")
        has_p = self.search_power is not None
        has_n = self.inv_search_power is not None
        if has_p == has_n:
            bad("give exactly one of search_power / inv_search_power "
                f"(got search_power={self.search_power!r}, inv_search_power={self.inv_search_power!r})")
        if has_n:
            n = self.inv_search_power
            if isinstance(n, float) and float(n).is_integer():
                n = int(n)
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 8:
                bad(f"inv_search_power must be an integer in 1..8 (spec: 2..6), got {self.inv_search_power!r}")
            object.__setattr__(self, "inv_search_power", int(n))
        else:
            p = self.search_power
            if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 < float(p) <= 1:
                bad(f"search_power must be a number in (0, 1], got {p!r}")
            object.__setattr__(self, "search_power", float(p))

    # -- derived -------------------------------------------------------------------------------
    @property
    def effective_n(self) -> int | None:
        """The integer inverse power, also when ``search_power`` is 1/n exactly (float mode must
        agree with integer mode then)."""
        if self.inv_search_power is not None:
            return self.inv_search_power
        inv = 1.0 / self.search_power
        r = round(inv)
        if abs(inv - r) <= 1e-12 * inv:
            return int(r)
        return None

    @property
    def power(self) -> float:
        """The search power p as a float (1/n in integer mode)."""
        n = self.effective_n
        return 1.0 / n if n is not None else float(self.search_power)

    def offset(self, i: int) -> int:
        """F(i), exactly."""
        return int(stripe_offsets_np(self, i)[-1]) if i > 0 else 0

    @property
    def window_len(self) -> int:
        """W = F(s + 1) - 1 (0 means no window)."""
        return self.offset(self.sw_index + 1) - 1

    @classmethod
    def from_config(cls, config) -> SpanParams:
        """Build from a dict (or an object with attributes) using plain names or
        ``span_attention_*`` names; unknown keys are ignored, ``None`` counts as absent."""
        if not isinstance(config, dict):
            config = {k: getattr(config, k) for k in dir(config) if not k.startswith("_")}
        names = [f.name for f in fields(cls)]
        kwargs = {}
        for name in names:
            for key in (name, f"span_attention_{name}"):
                if key in config and config[key] is not None:
                    if name in kwargs and kwargs[name] != config[key]:
                        raise ValueError(f"SpanParams.from_config: conflicting values for {name}: "
                                         f"{kwargs[name]!r} and {config[key]!r}")
                    kwargs[name] = config[key]
        missing = [n for n in names[:5] if n not in kwargs]
        if missing:
            raise ValueError(f"SpanParams.from_config: missing {', '.join(missing)}")
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# exact host tables
# ---------------------------------------------------------------------------------------------

def stripe_offsets_np(params: SpanParams, imax: int) -> np.ndarray:
    """int64 array ``F(0..imax)``, exact."""
    i = np.arange(imax + 1, dtype=np.int64)
    n = params.effective_n
    if n is not None:
        vals = [int(x) ** n for x in range(imax + 1)]
        if vals[-1] >= 2**62:
            raise ValueError("stripe offset overflow")
        return np.array(vals, dtype=np.int64)
    p = params.search_power
    x = i.astype(np.float64) ** (1.0 / p)
    out = np.floor(x).astype(np.int64)
    r = np.round(x)
    near = np.nonzero(np.abs(x - r) <= _NEAR * np.maximum(x, 1.0))[0]
    frac = _nice_fraction(p)
    if frac is not None and len(near):
        a, b = frac.numerator, frac.denominator  # p = a/b, F(i) = floor(i ** (b/a))
        for idx in near:
            cand = int(r[idx])  # floor is cand or cand - 1: cand**a <= i**b ?
            out[idx] = cand if cand ** a <= int(idx) ** b else cand - 1
    return out


def _ceil_scaled_power(factor: float, sp: float, tp: np.ndarray) -> np.ndarray:
    """ceil(factor * tp ** sp) for integer tp >= 0, exact (see module doc)."""
    if factor == 0:
        return np.zeros(tp.shape, dtype=np.int64)
    v = factor * tp.astype(np.float64) ** sp
    out = np.ceil(v).astype(np.int64)
    r = np.round(v)
    near = np.nonzero(np.abs(v - r) <= _NEAR * np.maximum(v, 1.0))[0]
    fsp = _nice_fraction(sp)
    ffac = _nice_fraction(factor, 10**6) or Fraction(factor)
    if fsp is None or not len(near):
        return out
    a, b = fsp.numerator, fsp.denominator  # v**b = factor**b * tp**a
    fb = ffac ** b
    for idx in near:
        t = int(tp[idx])
        n0 = int(r[idx])
        lhs = fb * Fraction(t) ** a
        rhs = Fraction(n0) ** b
        if lhs == rhs:
            out[idx] = n0
        elif lhs > rhs:
            out[idx] = n0 + 1
        else:
            out[idx] = n0
    return out


def span_lengths_np(params: SpanParams, max_tp: int) -> tuple[np.ndarray, np.ndarray]:
    """(back, fwd): int64 arrays over tp = 0..max_tp of ceil(bf*tp**sp), ceil(ff*tp**sp)."""
    tp = np.arange(max_tp + 1, dtype=np.int64)
    return (_ceil_scaled_power(params.backward_factor, params.span_power, tp),
            _ceil_scaled_power(params.forward_factor, params.span_power, tp))


def table_capacity(length: int) -> int:
    """Tables are built for a power-of-two capacity so growing positions reuse them."""
    return max(1024, 1 << max(0, int(length) - 1).bit_length())


@dataclass(frozen=True)
class Tables:
    """Exact tables for positions t + 1 <= capacity (as torch tensors on one device)."""

    capacity: int
    offsets: object  # int64 [NS]: F(0..NS-1); F(NS-1) > capacity (sentinel)
    num_stripes: int  # NS
    back: object  # int32 [capacity + 1]
    fwd: object  # int32 [capacity + 1]
    max_span: int  # max over tp of back + fwd + 1
    max_candidates: int  # max number of stripes i >= s+1 with F(i) <= capacity


@lru_cache(maxsize=64)
def _tables(params: SpanParams, capacity: int, device: str) -> Tables:
    import torch

    # stripes: grow until F(i) > capacity
    imax = max(params.sw_index + 2, int(capacity ** params.power) + 2)
    offs = stripe_offsets_np(params, imax)
    while offs[-1] <= capacity:
        imax *= 2
        offs = stripe_offsets_np(params, imax)
    last = int(np.searchsorted(offs, capacity, side="right"))  # first i with F(i) > capacity
    offs = offs[: last + 1]
    back, fwd = span_lengths_np(params, capacity)
    ncand = max(0, last - (params.sw_index + 1))
    return Tables(
        capacity=capacity,
        offsets=torch.from_numpy(offs.copy()).to(device),
        num_stripes=len(offs),
        back=torch.from_numpy(back.astype(np.int32)).to(device),
        fwd=torch.from_numpy(fwd.astype(np.int32)).to(device),
        max_span=int((back + fwd).max()) + 1,
        max_candidates=ncand,
    )


def get_tables(params: SpanParams, length: int, device) -> Tables:
    """Tables covering every position t with t + 1 <= length (cached, capacity rounded up)."""
    return _tables(params, table_capacity(length), str(device))
