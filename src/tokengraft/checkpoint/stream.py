"""Remap one vocabulary tensor of a safetensors file straight from disk to disk.

Memory stays at a few row chunks whatever the tensor's size: statistics for new rows come from one
chunked pass over the source rows, and the output is produced chunk by chunk, each chunk gathered
from runs of consecutive source rows read with ``pread``. Only tensors whose vocabulary dimension
is the first (embeddings, heads, LoRA B) stream; others go through the in-memory path.
"""
from __future__ import annotations

import torch

from ..vocab import NEW, RowMap
from .remap import CHUNK_ROWS, Rows, VocabTensor, chunked_stats, new_rows, record
from .safetensors import SafetensorsFile

OUT_CHUNK_BYTES = 32 * 2**20


class FileRows(Rows):
    """Rows of one tensor in a safetensors file, read on demand (never mapped, never all at once)."""

    def __init__(self, st: SafetensorsFile, key: str):
        self.st, self.key = st, key
        self.shape = st.shape(key)
        self.dtype = st.dtype(key)
        self.row_bytes = st.nbytes(key) // max(1, self.shape[0])

    def read(self, a: int, b: int) -> torch.Tensor:
        return self.st.rows(self.key, a, b)

    def take(self, rows: list[int]) -> torch.Tensor:
        return self.st.take(self.key, rows)

    def stats(self, base_rows: int):
        return chunked_stats(self.read, self.take, self.shape[0], base_rows)

    def all(self) -> torch.Tensor:  # only for strategies that need every row at once (hewitt, biases)
        return self.read(0, self.shape[0])


def streamable(vt: VocabTensor, shape) -> bool:
    return vt.dim == 0 and len(shape) >= 2 and vt.kind in ("weight", "lora_B")


def write_remapped(fh, src: FileRows, vt: VocabTensor, rm: RowMap, report, *, init="auto", tied=False,
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
