"""The files of a snapshot directory, written durably: tensors as a safetensors file (streamed,
hashed and fsynced as they are written), bytes, and the manifest (replaced atomically).

``safetensors.torch.save_file`` first turns every tensor into a Python ``bytes`` object, which
doubles the memory a large cache needs. The format is simple (8-byte little-endian header
length, a JSON header, raw little-endian data), so we write it ourselves in bounded chunks,
hashing on the way. Reading goes through the ``safetensors`` library (mmap, no pickle).

Integrity hashes: new files get XXH3-128 (``xxhash``; ~6x SHA-256 here, and SHA-256 alone took
~10 s per pass over a 1M-token session), recorded as ``{"xxh3_128": hex, "bytes": n}``. Files
written by older versions carry ``{"sha256": hex, ...}`` and are checked with SHA-256: the
algorithm is the key the entry has.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import struct
from pathlib import Path

# Bytes copied (device -> host) and written per chunk. Tests patch it to make writes slow.
CHUNK_BYTES = 64 << 20

# The hash new files get, and every one a manifest entry may name (older spl: sha256).
HASH = "xxh3_128"


def _hashers() -> dict:
    import xxhash

    return {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


HASHES = ("xxh3_128", "sha256")


def hash_of(entry: dict) -> tuple[str, str] | None:
    """``(algorithm, hex)`` of a manifest file entry, or None if it names no known hash."""
    for name in HASHES:
        if isinstance(entry.get(name), str):
            return name, entry[name]
    return None


def new_digest(algorithm: str = HASH):
    return _hashers()[algorithm]()


def _dtype_names():
    import torch

    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }
    for attr, name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                       ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = name
    return names


def _write(f, data, digest) -> None:
    """One write; a module-level function so a test can slow it down."""
    digest.update(data)
    f.write(data)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> dict:
    """Write ``tensors`` (name -> torch.Tensor, any device) to ``path``; fsync it.

    Returns ``{"xxh3_128": hex, "bytes": size}`` of the file as written.
    """
    import torch

    dtype_names = _dtype_names()
    header: dict = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in dtype_names:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((8 - len(blob) % 8) % 8)

    digest = new_digest()
    path = Path(path)
    with open(path, "wb") as f:
        _write(f, struct.pack("<Q", len(blob)), digest)
        _write(f, blob, digest)
        for name in names:
            t = tensors[name].detach()
            if t.numel() == 0:
                continue
            step = max(1, CHUNK_BYTES // t.element_size())
            for block in _contiguous_blocks(t):
                flat = block.reshape(-1)  # a view: block is contiguous
                for start in range(0, flat.numel(), step):
                    piece = flat[start:start + step].to("cpu").contiguous().view(torch.uint8)
                    _write(f, memoryview(piece.numpy()), digest)
        f.flush()
        os.fsync(f.fileno())
    return {HASH: digest.hexdigest(), "bytes": path.stat().st_size}


def _contiguous_blocks(t):
    """Yield contiguous sub-tensors of ``t`` that together are ``t`` in row-major order, without
    copying: a view like ``kv[:, :, :position]`` of a preallocated cache is a sequence of
    contiguous ``[position, head_dim]`` blocks. A tensor whose layout has no contiguous suffix
    block worth the name is copied once (small tensors)."""
    if t.is_contiguous():
        yield t
        return
    # the longest suffix of dims laid out contiguously
    expected, k = 1, t.dim()
    while k > 0 and (t.shape[k - 1] == 1 or t.stride(k - 1) == expected):
        expected *= t.shape[k - 1]
        k -= 1
    if k == t.dim() or expected < 1024:
        yield t.contiguous()
        return
    import itertools

    for index in itertools.product(*(range(n) for n in t.shape[:k])):
        yield t[index]


def read_safetensors(path: str | os.PathLike, device=None) -> dict:
    """Load a safetensors file (no pickle) onto ``device`` (default CPU)."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device) if device is not None else "cpu")


def write_bytes(path: str | os.PathLike, data: bytes) -> dict:
    """Write ``data`` to ``path`` and fsync it; returns ``{"xxh3_128", "bytes"}``."""
    digest = new_digest()
    with open(path, "wb") as f:
        _write(f, data, digest)
        f.flush()
        os.fsync(f.fileno())
    return {HASH: digest.hexdigest(), "bytes": len(data)}


def now_iso() -> str:
    """The time stamp manifests record (``created_at``, ``updated_at``)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write ``directory``'s manifest.json atomically (temp file, fsync, rename)."""
    data = json.dumps(manifest, ensure_ascii=False, indent=2).encode() + b"\n"
    part = directory / f".manifest.json.{secrets.token_hex(4)}"
    try:
        write_bytes(part, data)
        os.replace(part, directory / "manifest.json")
    except BaseException:
        part.unlink(missing_ok=True)  # a full disk must not keep what it could not finish
        raise


def file_digest(path: str | os.PathLike, algorithm: str = HASH) -> dict:
    """``{algorithm: hex, "bytes": size}`` of a file on disk."""
    digest = new_digest(algorithm)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {algorithm: digest.hexdigest(), "bytes": size}


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename or a new entry in it survives a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
