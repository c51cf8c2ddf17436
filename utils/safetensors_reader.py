"""Reading a safetensors artifact: once, into private memory, hashed on the way, and turned
into tensors that are views of exactly the bytes that were hashed (no pickle, no second read)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from utils.artifact_files import open_regular

# hashlib gets the full SHA-NI rate (1.78 GB/s on the benchmark machine, as `openssl speed
# -evp sha256`) from updates of 256 KiB to 16 MiB; one update over a whole 1 GB buffer gets
# 1.2-1.5 GB/s, and 64 KiB updates 1.5 GB/s.
LOAD_CHUNK = 4 * 1024 * 1024
_SMALL_ARTIFACT = 16 * 1024 * 1024
_HEADER_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def sha256_file(path: Path) -> str:
    with open_regular(path) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _private_buffer(size: int) -> bytearray | mmap.mmap:
    """Fresh memory for a whole artifact. Small ones come from the heap, which reuses memory
    already faulted in. Large ones get an anonymous mapping on transparent huge pages where
    the kernel grants them: faulting in 4 KiB pages costs more than copying the bytes (reading
    1 GB: 700-1,000 ms against 220-370 ms with huge pages, on the benchmark machine)."""
    if size <= _SMALL_ARTIFACT:
        return bytearray(size)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def read_private(path: Path, verify: bool) -> tuple[memoryview, str | None]:
    """Read `path` once into private memory; with `verify`, also its SHA-256.

    The hash is taken over these very bytes, which no other process can write, so what was
    checked is what gets used. For large artifacts a second thread hashes each chunk while
    this one reads the next (hashlib releases the GIL on large updates), so the cost is about
    max(read, hash), not their sum; small ones are hashed inline, as a thread would cost more
    than it saves. A file that shrinks meanwhile comes back short, so it fails the hash or the
    parse."""
    with open_regular(path) as handle, ThreadPoolExecutor(max_workers=1) as hasher:
        size = os.fstat(handle.fileno()).st_size
        data = memoryview(_private_buffer(size))
        digest = hashlib.sha256()
        def hash_in_background(chunk: memoryview) -> None:
            hasher.submit(digest.update, chunk)

        hash_chunk = hash_in_background if size > _SMALL_ARTIFACT else digest.update
        filled = _read_into(handle, data, hash_chunk if verify else None)
    return data[:filled], digest.hexdigest() if verify else None


def _read_into(handle: io.BufferedReader, data: memoryview, consume: Callable[[memoryview], object] | None) -> int:
    """Fill `data` from `handle` chunk by chunk, handing each chunk to `consume`; returns the
    number of bytes read."""
    filled = 0
    while filled < len(data) and (count := handle.readinto(data[filled:filled + LOAD_CHUNK])):
        if consume is not None:
            consume(data[filled:filled + count])
        filled += count
    return filled


def tensors_from_buffer(data: memoryview) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file held in `data`, as views of it (no copy).

    safetensors can only build tensors in place from a file it maps itself, which would let
    the file change after it was hashed, and `safetensors.torch.load(bytes)` copies every
    tensor. This reads the same format (8-byte little-endian header length, JSON header,
    tensor data back to back) and checks it as safetensors does: known dtypes, byte sizes that
    match the shapes, tensors tiling the data area with no gap or overlap. Raises ValueError,
    KeyError or TypeError for anything else."""
    if len(data) < _HEADER_LENGTH_BYTES:
        raise ValueError("too short for a safetensors header")
    base = _HEADER_LENGTH_BYTES + int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    if base - _HEADER_LENGTH_BYTES > _MAX_HEADER_BYTES:
        raise ValueError("the header is larger than safetensors allows (100 MB)")
    if base > len(data):
        raise ValueError("the header runs past the end of the file")
    header = json.loads(bytes(data[_HEADER_LENGTH_BYTES:base]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    layouts = sorted(((name, *_tensor_layout(spec)) for name, spec in header.items()), key=lambda item: item[1:3])
    end = 0
    for _, begin, stop, _, _ in layouts:
        if begin != end:
            raise ValueError("tensor data has a gap or an overlap")
        end = stop
    if base + end != len(data):
        raise ValueError("tensor data does not fill the file")
    return {name: _tensor_view(data, base + begin, stop - begin, dtype, shape) for name, begin, stop, dtype, shape in layouts}


def _tensor_layout(spec: Any) -> tuple[int, int, torch.dtype, list[int]]:
    if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES:
        raise ValueError(f"not a tensor entry of a known dtype: {spec!r:.100}")
    dtype, shape = _DTYPES[spec["dtype"]], spec["shape"]
    begin, end = spec["data_offsets"]
    if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
        raise ValueError("shapes and offsets must be non-negative integers")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError("a tensor's byte size does not match its shape")
    return begin, end, dtype, shape


def _tensor_view(data: memoryview, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if nbytes == 0:  # torch.frombuffer refuses empty tensors
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).view(shape)
