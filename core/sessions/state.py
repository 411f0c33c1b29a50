"""The small interface between sessions and the engine's ``Conversation``.

Everything the manager needs from a conversation goes through here: sizes, a fresh one, its
state as (JSON meta, tensors) for a snapshot and back, fork, resize, and turning an
out-of-memory during allocation into a clear ``TooLarge``.

Snapshot tensors are the conversation's own (``Conversation.state_tensors()``: KV trimmed to the
position, recurrent state, token ids, last logits) plus, for hybrid (Mamba) models, the
recurrent-state checkpoints at message boundaries (``recurrent.<position>.<name>``), so a
loaded hybrid session can still roll back without replaying its whole history.
"""

from __future__ import annotations

from superlinear.errors import TooLarge

_CKPT_PREFIX = "recurrent."


def _conversation_class():
    from superlinear.engine.conversation import Conversation

    return Conversation


def new_conversation(model, max_seq_len: int, chunk_size: int | None = None):
    kwargs = {"chunk_size": chunk_size} if chunk_size else {}
    return _conversation_class()(model, max_seq_len, **kwargs)


def position(conv) -> int:
    return int(conv.position)


def max_seq_len(conv) -> int:
    return int(conv.max_seq_len)


def message_count(conv) -> int:
    return len(conv.transcript)


def nbytes(conv) -> int:
    value = conv.nbytes
    return int(value() if callable(value) else value)


def cache_nbytes(cache) -> int:
    return int(cache.nbytes())


def model_max_seq_len(model) -> int | None:
    """A hard limit on the cache length, if the model declares one (``max_seq_len``)."""
    value = getattr(model, "max_seq_len", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def export(conv) -> tuple[dict, dict]:
    """``(meta, tensors)`` of a conversation: meta is JSON (goes to transcript.json)."""
    meta = dict(conv.state_meta())
    # views into the cache: the writer streams them, no second copy on the device
    tensors = dict(conv.state_tensors(copy=False))
    states = conv.recurrent_checkpoints
    if conv.hybrid:
        kept = sorted(p for p in states if 0 < p < conv.position)
        meta["recurrent_checkpoints"] = kept
        for p in kept:
            for name, t in states[p].items():
                tensors[f"{_CKPT_PREFIX}{p}.{name}"] = t
    return meta, tensors


def restore(model, meta: dict, tensors: dict, *, position: int, max_seq_len: int, chunk_size: int | None = None):
    """Rebuild a conversation from ``export``'s output (a snapshot's transcript + tensors)."""
    from superlinear.errors import InvalidRequest

    tensors = dict(tensors)
    checkpoints: dict[int, dict] = {}
    for key in [k for k in tensors if k.startswith(_CKPT_PREFIX)]:
        rest = key[len(_CKPT_PREFIX):]
        pos, _, name = rest.partition(".")
        checkpoints.setdefault(int(pos), {})[name] = tensors.pop(key).to(model.device)
    if int(meta.get("position", position)) != position:
        raise InvalidRequest(f"snapshot is inconsistent: manifest position {position}, "
                             f"transcript position {meta.get('position')}")
    kwargs = {"chunk_size": chunk_size} if chunk_size else {}
    conv = _conversation_class().from_state(model, meta, tensors, max_seq_len, **kwargs)
    if checkpoints and conv.hybrid:
        conv.add_recurrent_checkpoints(checkpoints)
    return conv


def fork(conv, new_max_seq_len: int | None = None):
    other = conv.fork()
    if new_max_seq_len is not None and new_max_seq_len != other.max_seq_len:
        other.resize(new_max_seq_len)
    return other


def resize(conv, new_max_seq_len: int) -> None:
    conv.resize(new_max_seq_len)


def allocate(build, max_seq_len: int):
    """Run ``build()`` (which allocates a cache); an out-of-memory becomes ``TooLarge``."""
    try:
        return build()
    except TooLarge:
        raise
    except (MemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        free_memory()
        raise TooLarge(f"not enough memory for a cache of {max_seq_len} tokens "
                       f"({str(exc).splitlines()[0][:200]}); use a smaller max_seq_len, or close or save "
                       "other sessions", param="max_seq_len") from exc


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:  # noqa: BLE001
        pass
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def free_memory() -> None:
    """Give freed cache memory back to the device (CUDA caching allocator). Tensors are freed
    by reference counting as soon as a cache is dropped; only CUDA needs this extra step."""
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
