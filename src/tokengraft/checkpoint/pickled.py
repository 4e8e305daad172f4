"""Same format in, same format out, for pickled trainer checkpoints.

A single ``torch.save`` file (an mmengine/XTuner ``iter_N.pth`` with ``meta``, ``state_dict``,
``optimizer``, ``param_schedulers``, ``message_hub``...; or a plain state dict) is written back as
ONE file of the same structure: the state dict's vocabulary tensors and the optimizer's moments
remapped, everything else as it was, inert objects (mmengine ``HistoryBuffer``, numpy scalars)
written back as the same globals without importing them (:func:`.repickle.safe_save`). So the
trainer resumes from it (mmengine ``Runner(resume=True)``, XTuner ``pretrained_pth``).

A DeepSpeed checkpoint folder stays a DeepSpeed folder: the model states file is rewritten the
same way (``module`` remapped, ``param_shapes`` updated), ZeRO-1/2 optimizer partitions are
remapped exactly (:mod:`.deepspeed`: fp32 masters and moments, re-partitioned for the same world
size), every other file is copied. Partitions that layout does not cover (ZeRO-3, tensor
parallel) are dropped with a note: the optimizer restarts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..vocab import RowMap
from .deepspeed import NotRepresentable, remap_partitions
from .readers import Checkpoint
from .repickle import copy_inert, safe_save
from .report import RemapReport
from .safe_pickle import safe_load

OPTIM_PARTITIONS = "*_optim_states.pt"


def is_pickle_file(ck: Checkpoint) -> bool:
    """A single pickled file (not safetensors, not a folder): written back as one file."""
    p = ck.info.path
    return p.is_file() and p.suffix != ".safetensors" and ck.info.format in ("mmengine", "torch", "deepspeed")


def is_deepspeed_folder(ck: Checkpoint) -> bool:
    return ck.info.path.is_dir() and ck.info.format == "deepspeed" and ck.info.container is not None


def _remapped(obj, state_key: str | None, new: dict, report: RemapReport):
    """``obj`` with its state dict's vocabulary tensors replaced and its optimizer remapped; other
    entries (and their order) unchanged."""
    if state_key is None:
        return {k: (new[k] if k in new else v) for k, v in obj.items()}
    out = dict(obj)
    out[state_key] = {k: (new[k] if k in new else v) for k, v in obj[state_key].items()}
    if report.optimizer is not None and isinstance(obj.get("optimizer"), dict):
        out["optimizer"] = report.optimizer
    return out


def write_pickle_file(ck: Checkpoint, new: dict, report: RemapReport, out: Path) -> None:
    """One file at ``out`` with the source file's structure (see the module docstring)."""
    info = ck.info
    obj = info.container if info.container is not None else safe_load(info.path)
    safe_save(_remapped(obj, info.state_key, new, report), out)
    report.notes.append(f"{info.format} file written back as one file of the same structure ({out.name})")


def _param_shapes(ps, new: dict):
    """DeepSpeed's ``param_shapes`` (a list of {name: Size} per group) with the new vocabulary shapes."""
    if isinstance(ps, dict):  # frozen_param_shapes: one {name: Size}
        return _param_shapes([ps], new)[0]
    if not isinstance(ps, list):
        return ps
    return [{k: (torch.Size(new[k].shape) if k in new else v) for k, v in g.items()} if isinstance(g, dict) else g
            for g in ps]


def write_deepspeed_folder(ck: Checkpoint, new: dict, report: RemapReport, tmp: Path,
                           row_map: RowMap | None = None, vocab_dims: dict | None = None) -> None:
    """``tmp`` becomes a DeepSpeed folder like the source (``latest`` and tag folder kept).
    ``vocab_dims``: vocabulary tensor name -> its vocabulary dim (for the ZeRO partitions)."""
    info = ck.info
    src_root = info.path  # the folder the user named; the model states may sit in a tag subfolder
    states = info.root / "mp_rank_00_model_states.pt"
    dropped = []
    for p in sorted(src_root.rglob("*")):
        rel = p.relative_to(src_root)
        if p.is_dir() or p.is_symlink():
            continue
        if p == states:
            continue
        if p.match(OPTIM_PARTITIONS):
            dropped.append(str(rel))
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        note = copy_inert(p, tmp / rel)
        if note:
            report.notes.append(note)
    obj = _remapped(info.container, info.state_key, new, report)
    for k in ("param_shapes", "frozen_param_shapes"):
        if k in obj:
            obj[k] = _param_shapes(obj[k], new)
    target = tmp / states.relative_to(src_root)
    target.parent.mkdir(parents=True, exist_ok=True)
    safe_save(obj, target)
    report.notes.append(f"DeepSpeed folder kept: {states.relative_to(src_root)} remapped")
    if dropped and row_map is not None:
        try:
            written = remap_partitions(info.root, target.parent, info.container.get("param_shapes"),
                                       obj.get("param_shapes"), dict(vocab_dims or {}),
                                       {k: v.float() for k, v in new.items()}, row_map)
        except NotRepresentable as e:
            report.notes.append(f"ZeRO partitions not remapped ({e}); dropping them")
        else:
            report.notes.append(f"{len(written)} ZeRO-1/2 optimizer partition(s) remapped exactly (fp32 masters: old "
                                f"rows kept, new rows = their initial rows; moments: new rows zero; re-partitioned "
                                f"for {len(written)} rank(s))")
            dropped = []
    if dropped:
        report.notes.append(f"dropped {len(dropped)} ZeRO optimizer partition(s) ({dropped[0]}...): not a ZeRO-1/2 "
                            f"layout tokengraft rebuilds exactly; the weights load (XTuner pretrained_pth), the "
                            f"optimizer restarts")
