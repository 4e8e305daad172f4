"""A model folder's weights, read without building a model and without running anything.

The files are the ones transformers loads, in its order (:mod:`tokengraft.checkpoint.weight_files`:
a single ``model.safetensors`` wins over an index and shards left beside it). safetensors go
through the one validated reader, :class:`tokengraft.checkpoint.safetensors.SafetensorsFile`; ``pytorch_model.bin``
(single or sharded) goes through the restricted unpickler, which never executes the file.
Either way doctor sees the same small interface: keys, shape, dtype, rows(key, a, b).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TokengraftError
from ..checkpoint.weight_files import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE, weight_files


class WeightsMissing(TokengraftError):
    """The folder holds no weights, or its index names a shard that is not there."""


class FolderWeights:
    """Every tensor of a folder's weights, by key; only the requested rows are read."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._open: dict[str, object] = {}  # shard file -> SafetensorsFile or a dict of tensors
        f = self.folder
        found = weight_files(f, error=WeightsMissing)  # the files transformers loads, in its order
        if found is None:
            others = sorted(p.name for p in f.glob("*.safetensors")) + sorted(p.name for p in f.glob("*.bin"))
            hint = (f" ({', '.join(others[:3])} without {SAFE_INDEX})" if others else "")
            raise WeightsMissing(f"{f}: no weights: neither {SAFE_SINGLE} nor {SAFE_INDEX} nor {BIN_SINGLE} nor "
                                 f"{BIN_INDEX}{hint}; save the model with model.save_pretrained, or copy the weight "
                                 f"files too")
        self.name, self.kind, self.beside = found.entry, found.kind, found.beside
        self._where = dict(found.weight_map)
        for shard in found.files if not found.weight_map else ():
            self._where.update({k: shard for k in self._file(shard).keys()})
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
