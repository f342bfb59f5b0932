"""Streaming safetensors I/O: read one tensor at a time, write a file tensor by tensor, hash while writing.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data offsets) and the raw
tensor bytes. Reading uses the header's offsets and plain positioned reads (no memory map: the process' resident
memory holds one tensor, not the pages of a whole shard). Writing plans the header from the known names, dtypes and
shapes first, then streams each tensor's bytes in order, so a multi-gigabyte shard never sits in memory; the sha256
of the file is computed on the way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}

#: Bytes copied per read when a tensor passes through unchanged.
COPY_CHUNK = 8 << 20
#: Largest header accepted (the format's own limit is 100 MB).
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    #: Absolute byte offsets of the data in the file.
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of a safetensors file (in data order) and its ``__metadata__``."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header of {length} bytes)")
        header = json.loads(fh.read(length))
    base = 8 + length
    size = path.stat().st_size
    metadata = header.pop("__metadata__", None) or {}
    tensors = []
    for name, entry in header.items():
        dtype = entry["dtype"]
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        shape = tuple(int(d) for d in entry["shape"])
        start, end = (int(x) for x in entry["data_offsets"])
        if end - start != math.prod(shape) * ITEMSIZE[dtype] or base + end > size:
            raise ValueError(f"{path}: tensor {name} has inconsistent offsets")
        tensors.append(TensorInfo(name, dtype, shape, base + start, base + end))
    tensors.sort(key=lambda t: t.start)
    return {t.name: t for t in tensors}, {str(k): str(v) for k, v in metadata.items()}


class SafetensorsReader:
    """Positioned reads of single tensors from one safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors, self.metadata = read_header(path)
        self._fd: int | None = os.open(path, os.O_RDONLY)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _pread_into(self, buffer: bytearray | memoryview, offset: int) -> None:
        assert self._fd is not None, "reader is closed"
        view = memoryview(buffer)
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: unexpected end of file")
            done += got

    def read(self, name: str) -> torch.Tensor:
        """The tensor (on the CPU, in its stored dtype), read with one positioned read."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        buffer = bytearray(info.nbytes)
        self._pread_into(buffer, info.start)
        return torch.frombuffer(buffer, dtype=info.torch_dtype).reshape(info.shape)

    def iter_bytes(self, name: str, chunk: int = COPY_CHUNK) -> Iterator[memoryview]:
        """The tensor's raw bytes in chunks (a pass-through copy never builds a tensor)."""
        info = self.tensors[name]
        buffer = bytearray(min(chunk, max(info.nbytes, 1)))
        offset = info.start
        while offset < info.end:
            n = min(len(buffer), info.end - offset)
            view = memoryview(buffer)[:n]
            self._pread_into(view, offset)
            yield view
            offset += n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (any dtype, bfloat16 included)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


class SafetensorsWriter:
    """Write a safetensors file whose tensors are known in advance, streaming each tensor's bytes in order."""

    def __init__(
        self,
        path: Path,
        entries: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._pending: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, dtype, shape in entries:
            if dtype not in DTYPES:
                raise ValueError(f"unsupported dtype {dtype} for {name}")
            if name in header:
                raise ValueError(f"duplicate tensor {name}")
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._pending.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.data_bytes = offset
        self.size = 8 + len(encoded) + offset
        self._sha = hashlib.sha256()
        self._next = 0
        self._fh: BinaryIO | None = path.open("wb")
        self._write(struct.pack("<Q", len(encoded)))
        self._write(encoded)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None, "writer is closed"
        self._fh.write(data)
        self._sha.update(data)

    def _expect(self, name: str) -> tuple[str, tuple[int, ...], int]:
        if self._next >= len(self._pending) or self._pending[self._next][0] != name:
            expected = self._pending[self._next][0] if self._next < len(self._pending) else "nothing"
            raise ValueError(f"{self.path}: wrote {name}, expected {expected}")
        _, dtype, shape, nbytes = self._pending[self._next]
        self._next += 1
        return dtype, shape, nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape, _ = self._expect(name)
        if NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
        self._write(tensor_bytes(tensor.cpu()))

    def write_chunks(self, name: str, chunks: Iterator[memoryview]) -> None:
        _, _, nbytes = self._expect(name)
        written = 0
        for chunk in chunks:
            self._write(chunk)
            written += len(chunk)
        if written != nbytes:
            raise ValueError(f"{name}: copied {written} bytes, planned {nbytes}")

    def close(self) -> tuple[int, str]:
        """Finish the file; returns (size, sha256). Fails if a planned tensor was not written."""
        if self._fh is None:
            raise ValueError("writer already closed")
        if self._next != len(self._pending):
            raise ValueError(f"{self.path}: {len(self._pending) - self._next} planned tensors were not written")
        self._fh.close()
        self._fh = None
        return self.size, self._sha.hexdigest()

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def file_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(COPY_CHUNK), b""):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()
