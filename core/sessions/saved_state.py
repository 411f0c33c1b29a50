"""A conversation's state as a snapshot holds it, and back: ``export`` gives (JSON meta,
tensors), ``restore`` rebuilds the conversation from them; ``new_conversation`` and ``fork``
make the other conversations a session starts with.

Snapshot tensors are the conversation's own (``Conversation.state_tensors()``: KV trimmed to the
position, recurrent state, token ids, last logits) plus, for hybrid (Mamba) models, the
recurrent-state checkpoints at message boundaries (``recurrent.<position>.<name>``), so a
loaded hybrid session can still roll back without replaying its whole history.
"""

from __future__ import annotations

_CKPT_PREFIX = "recurrent."


def _conversation_class():
    from superlinear.engine.conversation import Conversation

    return Conversation


def new_conversation(model, max_seq_len: int, chunk_size: int | None = None):
    kwargs = {"chunk_size": chunk_size} if chunk_size else {}
    return _conversation_class()(model, max_seq_len, **kwargs)














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
