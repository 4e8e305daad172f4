"""Which weight files of a model folder transformers loads: one list of names, one order.

transformers (``modeling_utils._get_resolved_checkpoint_files``, local folder, no variant) takes
the first of ``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin``,
``pytorch_model.bin.index.json`` that exists. A single file wins over an index and shards left
beside it, safetensors over pickles. Every reader here (doctor, the checkpoint readers) follows
the same order, so the rows checked are the rows the model gets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..files import read_index
from .errors import CheckpointError

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
PRECEDENCE = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)  # transformers' order
INDEX_FILES = (SAFE_INDEX, BIN_INDEX)


@dataclass
class WeightFiles:
    """The weights transformers reads from a folder."""

    entry: str  # the file transformers picks: a single weight file or an index
    kind: str  # "safetensors" | "pickle"
    files: list[str]  # the weight files read (the single file, or the index's shards)
    weight_map: dict[str, str] = field(default_factory=dict)  # key -> shard, from the index (empty: single file)
    beside: list[str] = field(default_factory=list)  # other weight entries present that transformers ignores


def weight_files(folder, error: type[Exception] = CheckpointError) -> WeightFiles | None:
    """The folder's weights in transformers' order, or None when it has none of the four names.
    An index whose shards are missing raises ``error`` with one line."""
    folder = Path(folder)
    for name in PRECEDENCE:
        if not (folder / name).is_file():
            continue
        kind = "safetensors" if name.startswith("model.safetensors") else "pickle"
        beside = [n for n in PRECEDENCE if n != name and (folder / n).is_file()]
        if name not in INDEX_FILES:
            return WeightFiles(name, kind, [name], beside=beside)
        wm = read_index(folder / name, error=error)
        files = sorted(set(wm.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise error(f"{folder / name}: points at missing shard(s) {', '.join(missing[:3])}; the download is "
                        f"incomplete: copy the complete checkpoint")
        return WeightFiles(name, kind, files, wm, beside)
    return None


__all__ = ["BIN_INDEX", "BIN_SINGLE", "INDEX_FILES", "PRECEDENCE", "SAFE_INDEX", "SAFE_SINGLE", "WeightFiles",
           "weight_files"]
