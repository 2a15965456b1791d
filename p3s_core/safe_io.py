"""Safe, atomic safetensors writing and pickle-free header validation (the adapter file, DESIGN.md).

Decisions:

* The writer streams the standard safetensors layout itself (8-byte little-endian header length,
  UTF-8 JSON header padded with spaces to a multiple of 8, then the raw little-endian tensor bytes)
  instead of calling ``safetensors.torch.save_file``: that one writes its ``__metadata__`` map in a
  random order (a Rust ``HashMap``), so two saves of the same adapter differ byte for byte. Here the
  header JSON has sorted keys and tensors are laid out by (element size descending, name), as
  safetensors itself does, so the same tensors + metadata give the same bytes and every tensor is
  aligned to its element size. The files load with ``safetensors.torch.load_file`` (tested).
* Writes go to a hidden temp file in the target folder (``.<name>.<random>.tmp``), are flushed and
  ``os.fsync``-ed, then ``os.replace``-d over the target, so a crash or error never leaves a
  half-written adapter and an older file at that path stays intact. The temp file is removed on
  any error.
* :func:`read_safetensors_header` only parses bytes and JSON: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from .errors import AdapterFileError

__all__ = [
    "atomic_save_safetensors",
    "read_safetensors_header",
    "SAFETENSORS_DTYPES",
    "MAX_HEADER_BYTES",
]

#: torch dtype -> safetensors dtype string.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
#: A header larger than this is refused (safetensors itself refuses headers over 100 MB).
MAX_HEADER_BYTES = 100_000_000


def _build_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None):
    """Return (header bytes incl. the 8-byte length, ordered [(name, contiguous cpu tensor)])."""
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise AdapterFileError("tensors", f"invalid tensor name {name!r}",
                                   "use non-empty string names other than '__metadata__'")
        if not isinstance(t, torch.Tensor):
            raise AdapterFileError("tensors", f"{name!r} is a {type(t).__name__}, not a tensor",
                                   "pass only torch tensors")
        if t.dtype not in SAFETENSORS_DTYPES:
            raise AdapterFileError("tensors", f"{name!r} has dtype {t.dtype}, which safetensors "
                                   "cannot store", "convert it to float32/float16/bfloat16")
        items.append((name, t.detach().to("cpu").contiguous()))
    items.sort(key=lambda it: (-it[1].element_size(), it[0]))
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise AdapterFileError("metadata", f"entry {k!r} is not a str -> str pair",
                                       "convert metadata values to strings (JSON for structures)")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % 8)
    return struct.pack("<Q", len(raw)) + raw, items


def _write_payload(fh, header: bytes, items) -> None:
    fh.write(header)
    for _name, t in items:
        if t.numel() == 0:
            continue
        flat = t.reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        fh.write(memoryview(flat.view(torch.uint8).numpy()))


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (+ str->str ``metadata``) as a safetensors file at ``path``, atomically.

    Temp file in the same folder (``.<name>.*.tmp``) -> flush -> ``os.fsync`` -> ``os.replace``.
    On any error the temp file is removed and a previous file at ``path`` is left untouched.
    Deterministic: equal inputs give equal bytes. Returns the final path.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    header, items = _build_header(tensors, metadata)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdapterFileError(str(path), f"cannot create the folder {folder} ({exc})",
                               "choose a writable location") from exc
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(folder))
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_payload(fh, header, items)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows it
        dfd = os.open(str(folder), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _refuse(path, problem: str, fix: str = "select a .safetensors adapter saved by the P3S "
            "Trainer (or re-train it)") -> AdapterFileError:
    return AdapterFileError(str(path), problem, fix)


def _plausible_header(fh, head: bytes, size: int) -> bool:
    """True when ``head`` is a safetensors header length followed by a JSON object: a header
    length whose low byte is 0x80 (e.g. 640) starts like a pickle; the '{' after it tells them
    apart. Leaves the file position at 8."""
    (n,) = struct.unpack("<Q", head)
    ok = 0 < n <= MAX_HEADER_BYTES and 8 + n <= size and fh.read(1) == b"{"
    fh.seek(8)
    return ok


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, dict]]:
    """Validate ``path`` as a real safetensors file and return ``(metadata, tensors)``.

    ``tensors`` maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` (insertion order
    of the header). Checks: file exists, 8-byte little-endian header length within the file, a
    UTF-8 JSON object header, a str->str ``__metadata__``, and for each tensor a known dtype,
    non-negative integer shape, offsets inside the data section whose length matches the shape.
    Raises :class:`AdapterFileError` for missing, truncated, random-bytes and pickle / PyTorch
    checkpoint files. Never unpickles anything.
    """
    p = Path(path)
    if not p.is_file():
        raise _refuse(p, "the file does not exist", "pick an existing adapter file from models/p3s")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _refuse(p, f"the file is truncated or empty ({size} bytes, not a safetensors "
                          "file)")
        if (head[:2] == b"PK" or head[:1] == b"\x80") and not _plausible_header(fh, head, size):
            raise _refuse(p, "this is a pickle / PyTorch checkpoint (torch.save), not a "
                          "safetensors file; P3S never unpickles files because they can run code",
                          "use a .safetensors adapter saved by the P3S Trainer")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES:
            raise _refuse(p, f"not a safetensors file (declared header length {n})")
        if 8 + n > size:
            raise _refuse(p, f"the file is truncated: header of {n} bytes declared but the file "
                          f"has {size} bytes")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _refuse(p, f"not a safetensors file (the header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise _refuse(p, "not a safetensors file (the header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise _refuse(p, "the safetensors metadata is not a map of strings")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _refuse(p, f"tensor entry {name!r} is malformed")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise _refuse(p, f"tensor {name!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                           for s in shape)):
            raise _refuse(p, f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise _refuse(p, f"tensor {name!r} has invalid data offsets {offs!r}")
        if offs[1] > data_len:
            raise _refuse(p, f"the file is truncated: tensor {name!r} ends at byte {offs[1]} of "
                          f"the data section but only {data_len} bytes are present")
        if offs[1] - offs[0] != math.prod(shape) * _ITEMSIZE[dtype]:
            raise _refuse(p, f"tensor {name!r}: {offs[1] - offs[0]} bytes do not match shape "
                          f"{shape} of {dtype}")
        spans.append((offs[0], offs[1]))
    spans.sort()
    pos = 0
    for a, b in spans:
        if a != pos:
            raise _refuse(p, "the tensor data sections overlap or leave holes (corrupt file)")
        pos = b
    if pos != data_len:
        raise _refuse(p, f"the file has {data_len - pos} unexpected trailing bytes (corrupt or "
                      "not a safetensors file)")
    return dict(meta), header
