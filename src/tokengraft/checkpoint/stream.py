"""Remap one vocabulary tensor of a safetensors file straight from disk to disk.

Memory stays at a few row chunks whatever the tensor's size: statistics for new rows come from one
chunked pass over the source rows, and the output is produced chunk by chunk, each chunk gathered
from runs of consecutive source rows read with ``pread``. Only tensors whose vocabulary dimension
is the first (embeddings, heads, LoRA B) stream; others go through the in-memory path.
"""
from __future__ import annotations

import torch

from ..vocab import RowMap
from .errors import RemapError
from .layout import VocabTensor
from .newrows import CHUNK_ROWS, Rows, chunked_stats, new_rows
from .readers import Checkpoint
from .remap import remap_tensor
from .report import RemapReport, record
from .safetensors import SafetensorsFile
from .stwriter import tensor_entry

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
        raise RemapError(f"tensor {vt.key!r} is vocabulary-shaped but has dtype {src.dtype}; expected a float tensor")
    if tied:  # one matrix: both keys must get the same rows, random strategies included
        gen = torch.Generator().manual_seed(gen.initial_seed())
    fill, names = new_rows(src, vt, rm, init, tied, tokenizer, base_rows, gen)
    fill = fill.to(src.dtype)
    step = max(1, min(CHUNK_ROWS * 4, OUT_CHUNK_BYTES // max(1, src.row_bytes)))
    written = 0
    for a in range(0, rm.target_rows, step):
        rows = rm.apply_chunk(src.take, a, min(a + step, rm.target_rows), fill)
        data = memoryview(rows.contiguous().reshape(-1).view(torch.uint8).numpy())
        fh.write(data)
        written += len(data)
    record(report, vt, rm, names, tied, src.shape, (rm.target_rows, *src.shape[1:]))
    return written


class LazyRemap:
    """Vocabulary tensors remapped on demand, streamed from the source file to the output when their
    vocabulary dimension comes first (nothing kept, memory bounded by a few row chunks)."""

    def __init__(self, ck: Checkpoint, found: dict, rm, report: RemapReport, **kw):
        self.ck, self.rm, self.report, self.kw = ck, rm, report, kw
        self.vts = {k: v for k, v in found.items() if v is not None}
        self.gen = torch.Generator().manual_seed(0)

    def __contains__(self, k):
        return k in self.vts

    def __iter__(self):
        return iter(self.vts)

    def shape(self, k) -> tuple[int, ...]:
        s = list(self.ck.shape(k))
        s[self.vts[k].dim] = self.rm.target_rows
        return tuple(s)

    def __getitem__(self, k) -> torch.Tensor:
        return remap_tensor(self.ck.get(k), self.vts[k], self.rm, self.report, gen=self.gen, **self.kw)

    def write(self, k, fh) -> None:
        vt = self.vts[k]
        if not streamable(vt, self.ck.shape(k)):
            tensor_entry(k, self[k]).write(fh)
            return
        with SafetensorsFile(self.ck.info.root / self.ck.file_of(k)) as st:
            write_remapped(fh, FileRows(st, k), vt, self.rm, self.report, gen=self.gen, **self.kw)
