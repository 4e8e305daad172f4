"""Remap one vocabulary tensor of a safetensors file straight from disk to disk.

Memory stays at a few row chunks whatever the tensor's size: statistics for new rows come from one
chunked pass over the source rows, and the output is produced chunk by chunk, each chunk gathered
from runs of consecutive source rows read with ``pread``. Only tensors whose vocabulary dimension
is the first (embeddings, heads, LoRA B) stream; others go through the in-memory path.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..vocab import NEW, RowMap
from .readers import SAFETENSORS_DTYPES
from .remap import CHUNK_ROWS, Rows, VocabTensor, chunked_stats, new_rows, record

OUT_CHUNK_BYTES = 32 * 2**20


class SafetensorsRows(Rows):
    """Rows of one tensor in a safetensors file, read on demand (never mapped, never all at once)."""

    def __init__(self, path: Path, header: dict, data_start: int, key: str):
        h = header[key]
        self.path, self.key = Path(path), key
        self.shape = tuple(h["shape"])
        self.dtype = SAFETENSORS_DTYPES[h["dtype"]]
        self.row_elems = 1
        for d in self.shape[1:]:
            self.row_elems *= d
        self.row_bytes = self.row_elems * torch.empty((), dtype=self.dtype).element_size()
        self.base = data_start + h["data_offsets"][0]
        self.fd = os.open(self.path, os.O_RDONLY)

    def close(self):
        os.close(self.fd)

    def read(self, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)``."""
        n = (b - a) * self.row_bytes
        buf = torch.empty(n, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < n:
            got = os.preadv(self.fd, [view[done:]], self.base + a * self.row_bytes + done)
            if got <= 0:
                raise ValueError(f"{self.path}: ended early while reading {self.key!r}; the file is truncated")
            done += got
        return buf.view(self.dtype).reshape(b - a, *self.shape[1:])

    def take(self, rows: list[int]) -> torch.Tensor:
        """Rows in the given order, read as runs of consecutive rows."""
        parts, i = [], 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            parts.append(self.read(rows[i], rows[j - 1] + 1))
            i = j
        if not parts:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def stats(self, base_rows: int):
        return chunked_stats(self.read, self.take, self.shape[0], base_rows)

    def all(self) -> torch.Tensor:  # only for strategies that need every row at once (hewitt, biases)
        return self.read(0, self.shape[0])


def streamable(vt: VocabTensor, shape) -> bool:
    return vt.dim == 0 and len(shape) >= 2 and vt.kind in ("weight", "lora_B")


def write_remapped(fh, src: SafetensorsRows, vt: VocabTensor, rm: RowMap, report, *, init="auto", tied=False,
                   tokenizer=None, base_rows=None, gen=None) -> int:
    """Write the remapped tensor's bytes to ``fh`` in row chunks; returns the bytes written."""
    base_rows = rm.source_rows if base_rows is None else base_rows
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    if not src.dtype.is_floating_point:
        from .remap import RemapError

        raise RemapError(f"tensor {vt.key!r} is vocabulary-shaped but has dtype {src.dtype}; expected a float tensor")
    fill, names = new_rows(src, vt, rm, init, tied, tokenizer, base_rows, gen)
    fill_at = {t: i for i, t in enumerate(rm.new_rows)}
    fill = fill.to(src.dtype)
    step = max(1, min(CHUNK_ROWS * 4, OUT_CHUNK_BYTES // max(1, src.row_bytes)))
    written = 0
    for a in range(0, rm.target_rows, step):
        b = min(a + step, rm.target_rows)
        idx = list(rm.source[a:b])
        keep = [s for s in idx if s != NEW]
        rows = src.take(keep)
        if len(keep) != len(idx):  # place new rows between the gathered ones
            out = torch.empty((b - a, *src.shape[1:]), dtype=src.dtype)
            pos = torch.tensor([i for i, s in enumerate(idx) if s != NEW], dtype=torch.long)
            if len(pos):
                out[pos] = rows
            for i, s in enumerate(idx):
                if s == NEW:
                    out[i] = fill[fill_at[a + i]].reshape(src.shape[1:])
            rows = out
        data = memoryview(rows.contiguous().reshape(-1).view(torch.uint8).numpy())
        fh.write(data)
        written += len(data)
    record(report, vt, rm, names, tied, src.shape, (rm.target_rows, *src.shape[1:]))
    return written
