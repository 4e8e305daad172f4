"""A streaming safetensors writer: one tensor in memory at a time, raw byte copies for the rest.

``safetensors.torch.save_file`` wants every tensor of a file in memory at once. Converting a
checkpoint changes a handful of tensors; the others can be copied byte for byte from the source
file, in chunks, without being decoded. The output is a standard safetensors file (header padded to
8 bytes, data contiguous in header order), readable by ``safe_open``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .safetensors import DTYPE_NAMES, SafetensorsFile
CHUNK = 16 * 2**20


@dataclass
class Entry:
    key: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    write: Callable  # write(fh) -> None, writes exactly nbytes


def tensor_entry(key: str, t: torch.Tensor) -> Entry:
    if t.dtype not in DTYPE_NAMES:
        raise ValueError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
    t = t.detach().contiguous()
    nbytes = t.numel() * t.element_size()

    def write(fh, t=t):
        if nbytes:
            fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return Entry(key, DTYPE_NAMES[t.dtype], tuple(t.shape), nbytes, write)


def copy_entry(key: str, st: SafetensorsFile) -> Entry:
    """An entry copied byte for byte from an (already validated) source safetensors file, never decoded."""
    start, end = st.span(key)
    src = st.path

    def write(fh):
        with open(src, "rb") as s:
            copy_range(s, fh, start, end - start, what=f"{src} ({key!r})")
    return Entry(key, st.dtype_name(key), st.shape(key), end - start, write)


def copy_range(src, dst, offset: int, count: int, what: str) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to the current position of ``dst``: in the
    kernel (``copy_file_range``) where possible, else through a user-space buffer."""
    dst.flush()
    left = count
    if hasattr(os, "copy_file_range"):
        try:
            while left:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), offset + count - left)
                if n == 0:
                    raise ValueError(f"{what}: ended early; the file is truncated")
                left -= n
            dst.seek(0, os.SEEK_END)  # keep the buffered writer's idea of the position right
            return
        except OSError:  # another filesystem type, an old kernel: fall back to plain copies
            dst.seek(0, os.SEEK_END)
    src.seek(offset + count - left)
    while left:
        buf = src.read(min(CHUNK, left))
        if not buf:
            raise ValueError(f"{what}: ended early; the file is truncated")
        dst.write(buf)
        left -= len(buf)


def write_safetensors(path: Path, entries: list[Entry], metadata: dict | None = None) -> int:
    """Write ``entries`` in order; returns the bytes of tensor data written."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for e in entries:
        header[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for e in entries:
            before = fh.tell()
            e.write(fh)
            if fh.tell() - before != e.nbytes:
                raise ValueError(f"{path}: wrote {fh.tell() - before} bytes for {e.key!r}, expected {e.nbytes}")
    return off
