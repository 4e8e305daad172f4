"""The one safetensors reader: a header validated against the file, then tensors, row ranges or
chosen rows read with ``pread`` (never mapped, never the whole file).

Everything the header claims is checked before any data is read, so a hostile or damaged file
fails with one line naming the file and the entry, never a traceback or a huge allocation:
the header's size (against a cap and the file), every dtype, ``prod(shape) * itemsize ==
end - begin``, offsets that are non-negative, inside the file and non-overlapping.

    with SafetensorsFile(path) as f:
        f.keys(); f.shape(k); f.dtype(k); f.metadata
        f.get(k); f.rows(k, a, b); f.take(k, [3, 4, 9])
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .errors import CheckpointError

# The safetensors format itself caps headers at 100 MB; a larger claim is refused before reading it.
HEADER_CAP = 100 * 2**20

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
DTYPES = {k: v for k, v in DTYPES.items() if v is not None}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


def _fail(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; re-download or re-save it")


def _nonneg_ints(v, n: int | None = None) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))


class SafetensorsFile:
    """One safetensors file, opened read-only; use as a context manager or call :meth:`close`."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such file") from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- header ---------------------------------------------------------------------------------
    def _pread(self, n: int, offset: int, what: str) -> bytearray:
        buf = bytearray(n)
        view, done = memoryview(buf), 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise _fail(self.path, f"ended early while reading {what}; the file is truncated")
            done += got
        return buf

    def _parse(self) -> None:
        p = self.path
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise _fail(p, f"truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(self._pread(8, 0, "the header length"), "little")
        if n > HEADER_CAP:
            raise CheckpointError(f"{p}: safetensors header is {n} bytes, over the cap of {HEADER_CAP} bytes; "
                                  f"tokengraft refuses such headers (the format allows at most {HEADER_CAP})")
        if n > size - 8:
            raise _fail(p, f"truncated safetensors file (header claims {n} bytes, the file has {size})")
        try:
            header = json.loads(self._pread(n, 8, "the header").decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _fail(p, "corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise _fail(p, "corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise _fail(p, "corrupt safetensors header (__metadata__ is not a map of strings)")
        self.metadata: dict | None = meta
        self.data_start = 8 + n
        data_size = size - self.data_start
        spans = []
        for k, v in header.items():
            if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
                raise _fail(p, f"corrupt safetensors header entry {k!r} (needs dtype, shape, data_offsets)")
            if v["dtype"] not in DTYPES:
                raise CheckpointError(f"{p}: tensor {k!r} has dtype {v['dtype']!r}, which tokengraft does not read")
            if not _nonneg_ints(v["shape"]):
                raise _fail(p, f"tensor {k!r} has shape {v['shape']!r}; expected non-negative integers")
            if not _nonneg_ints(v["data_offsets"], 2):
                raise _fail(p, f"tensor {k!r} has data_offsets {v['data_offsets']!r}; expected two non-negative "
                               f"integers")
            begin, end = v["data_offsets"]
            want = math.prod(v["shape"]) * ITEMSIZE[v["dtype"]]
            if end - begin != want:
                raise _fail(p, f"tensor {k!r}: shape {v['shape']} {v['dtype']} needs {want} bytes but its offsets "
                               f"[{begin}, {end}] hold {end - begin}; the header disagrees with itself")
            if end > data_size:
                raise _fail(p, f"tensor {k!r}: data offsets [{begin}, {end}] run past the end of the file "
                               f"({data_size} data bytes); the file is truncated or corrupt")
            spans.append((begin, end, k))
        spans.sort()
        for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise _fail(p, f"tensors {k0!r} and {k1!r} overlap (bytes [{b0}, {e0}] and [{b1}, {e1}])")
        end = spans[-1][1] if spans else 0
        if end != data_size:
            raise _fail(p, f"truncated or corrupt safetensors file: header describes {self.data_start + end} bytes, "
                           f"file has {size}")
        self.header: dict[str, dict] = header  # key -> {"dtype", "shape", "data_offsets"} (validated)

    # -- facts ----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, key) -> bool:
        return key in self.header

    def _entry(self, key: str) -> dict:
        try:
            return self.header[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in this file") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._entry(key)["dtype"]]

    def dtype_name(self, key: str) -> str:
        """The safetensors spelling, e.g. ``"BF16"``."""
        return self._entry(key)["dtype"]

    def span(self, key: str) -> tuple[int, int]:
        """Absolute byte range ``[start, end)`` of the tensor's data in the file."""
        b, e = self._entry(key)["data_offsets"]
        return self.data_start + b, self.data_start + e

    def nbytes(self, key: str) -> int:
        b, e = self.span(key)
        return e - b

    # -- data -----------------------------------------------------------------------------------
    def _read(self, key: str, offset: int, n: int, shape) -> torch.Tensor:
        dtype = self.dtype(key)
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            view, done = memoryview(buf.numpy()), 0
            while done < n:
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got <= 0:
                    raise _fail(self.path, f"ended early while reading {key!r}; the file is truncated")
                done += got
        return buf.view(dtype).reshape(shape)

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor (a fresh, writable tensor)."""
        start, end = self.span(key)
        return self._read(key, start, end - start, self.shape(key))

    def _row_bytes(self, key: str) -> tuple[tuple[int, ...], int]:
        shape = self.shape(key)
        if not shape:
            raise CheckpointError(f"{self.path}: tensor {key!r} is a scalar; it has no rows")
        return shape, math.prod(shape[1:]) * ITEMSIZE[self.dtype_name(key)]

    def rows(self, key: str, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` along the first dimension; only those bytes are read."""
        shape, rb = self._row_bytes(key)
        if not 0 <= a <= b <= shape[0]:
            raise CheckpointError(f"{self.path}: rows [{a}, {b}) of {key!r} are outside its {shape[0]} rows")
        return self._read(key, self.span(key)[0] + a * rb, (b - a) * rb, (b - a, *shape[1:]))

    def take(self, key: str, ids) -> torch.Tensor:
        """Rows ``ids`` in that order, read as runs of consecutive rows."""
        shape, _ = self._row_bytes(key)
        ids = [int(i) for i in ids]
        parts, i = [], 0
        while i < len(ids):
            j = i + 1
            while j < len(ids) and ids[j] == ids[j - 1] + 1:
                j += 1
            parts.append(self.rows(key, ids[i], ids[j - 1] + 1))
            i = j
        if not parts:
            return torch.empty((0, *shape[1:]), dtype=self.dtype(key))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


__all__ = ["SafetensorsFile", "DTYPES", "DTYPE_NAMES", "HEADER_CAP"]
