"""A model folder's weights, read without building a model and without running anything.

safetensors (single file, or shards named by ``model.safetensors.index.json``) go through the one
validated reader, :class:`tokengraft.checkpoint.safetensors.SafetensorsFile`; ``pytorch_model.bin``
(single or sharded) goes through the restricted unpickler, which never executes the file.
Either way doctor sees the same small interface: keys, shape, dtype, rows(key, a, b).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import read_index

ST_INDEX, ST_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


class WeightsMissing(Exception):
    """The folder holds no weights, or its index names a shard that is not there."""


def _shards(folder: Path, index: str) -> dict[str, str]:
    """key -> shard file, from an index (a JSON error propagates to the caller's finding)."""
    wm = read_index(folder / index)
    for f in sorted(set(wm.values())):
        if not (folder / f).is_file():
            raise WeightsMissing(f"{folder / f}: shard named in {index} is missing; copy the complete checkpoint")
    return wm


class FolderWeights:
    """Every tensor of a folder's weights, by key; only the requested rows are read."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._open: dict[str, object] = {}  # shard file -> SafetensorsFile or a dict of tensors
        f = self.folder
        if (f / ST_INDEX).is_file():
            self.name, self.kind, self._where = ST_INDEX, "safetensors", _shards(f, ST_INDEX)
        elif (f / ST_SINGLE).is_file():
            self.name, self.kind = ST_SINGLE, "safetensors"
            self._where = {k: ST_SINGLE for k in self._file(ST_SINGLE).keys()}
        elif (f / BIN_INDEX).is_file():
            self.name, self.kind, self._where = BIN_INDEX, "pickle", _shards(f, BIN_INDEX)
        elif (f / BIN_SINGLE).is_file():
            self.name, self.kind = BIN_SINGLE, "pickle"
            self._where = {k: BIN_SINGLE for k in self._file(BIN_SINGLE)}
        else:
            others = sorted(p.name for p in f.glob("*.safetensors")) + sorted(p.name for p in f.glob("*.bin"))
            hint = (f" ({', '.join(others[:3])} without {ST_INDEX})" if others else "")
            raise WeightsMissing(f"{f}: no weights: neither {ST_SINGLE} nor {ST_INDEX} nor {BIN_SINGLE}{hint}; "
                                 f"save the model with model.save_pretrained, or copy the weight files too")
        for shard in sorted(set(self._where.values())):
            self._file(shard)  # open (and validate) every shard now: a damaged one is found up front

    def _file(self, shard: str):
        if shard not in self._open:
            path = self.folder / shard
            if self.kind == "safetensors":
                from ..checkpoint.safetensors import SafetensorsFile

                self._open[shard] = SafetensorsFile(path)
            else:
                from ..checkpoint.safe_pickle import placeholders_in, safe_load

                sd = safe_load(path)  # inert: globals become placeholders, never called
                code = placeholders_in(sd, limit=3)
                if code:  # a model's weights are tensors; a pickled callable is an attack or damage
                    raise ValueError(f"{path}: holds pickled objects that loading would call ({', '.join(code)}); "
                                     f"tokengraft never runs them: use a trusted copy saved as safetensors")
                if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
                    sd = sd["state_dict"]
                if not isinstance(sd, dict):
                    raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict")
                self._open[shard] = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return self._open[shard]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._file(self._where[key])
        return tuple(f.shape(key)) if self.kind == "safetensors" else tuple(f[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        f = self._file(self._where[key])
        return f.dtype(key) if self.kind == "safetensors" else f[key].dtype

    def rows(self, key: str, a: int, b: int) -> torch.Tensor:
        f = self._file(self._where[key])
        if self.kind == "safetensors":
            return f.rows(key, a, b) if self.shape(key) else f.get(key)
        t = f[key]
        return t[a:b] if t.dim() else t

    def close(self) -> None:
        for f in self._open.values():
            if hasattr(f, "close"):
                f.close()
        self._open.clear()
