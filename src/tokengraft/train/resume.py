"""Resuming a run: check a checkpoint folder before transformers reads it, and carry the new rows'
optimizer moments through a token change with the checkpoint package's one moment remap."""
from __future__ import annotations

import zipfile
from pathlib import Path

from ..files import field as read_field
from ..files import read_json
from ..vocab import RowMap
from .config import TrainError
from .params import NewRows
from .run import ROWS_FILE, RUN_FILE

# transformers' files in a checkpoint-N folder that torch.load reads (zip archives since torch 1.6)
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")


def check_checkpoint(ckpt: Path) -> None:
    """One-line errors for a checkpoint that cannot resume, before transformers reads it (a corrupt
    ``optimizer.pt`` would otherwise surface as a traceback from deep inside ``torch.load``)."""
    if not ckpt.is_dir():
        raise TrainError(f"--resume {ckpt}: no such checkpoint folder")
    for name in (RUN_FILE, ROWS_FILE, "trainer_state.json"):
        if not (ckpt / name).is_file():
            raise TrainError(f"{ckpt}: no {name}; not a complete tokengraft checkpoint (was it cut off while "
                             f"saving?); resume from an earlier checkpoint-N with --resume PATH")
    state = ckpt / "trainer_state.json"
    read_field(read_json(state, "a Trainer state (resume from an earlier checkpoint-N with --resume PATH)",
                         error=TrainError, kind=dict), "global_step", int, str(state), lo=0, error=TrainError)
    for path in [ckpt / n for n in TORCH_FILES] + sorted(ckpt.glob("rng_state*.pth")):
        if path.is_file():
            _check_zip(path)
            from ..checkpoint.safe_pickle import check_inert

            # transformers loads these with weights_only=True; an unknown global is named here, in one line
            check_inert(path, "resume from it")


def _check_zip(path: Path) -> None:
    """A torch save is a zip archive with a CRC per member: verify them without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise TrainError(f"{path}: corrupt or truncated ({e}); resume from an earlier checkpoint-N with "
                         f"--resume PATH, or delete this checkpoint folder") from None
    if bad is not None:
        raise TrainError(f"{path}: corrupt (member {bad} fails its checksum); resume from an earlier "
                         f"checkpoint-N with --resume PATH, or delete this checkpoint folder")


def remap_moments(optimizer, rows: NewRows, rm: RowMap) -> None:
    """Move the new rows' Adam moments (k_old x hidden) onto the current token list (k_new x hidden)
    by token identity, in place. Only the rows' own entries are handed to the remap, so no other
    parameter's state can be mistaken for a vocabulary-sized one."""
    from ..checkpoint.layout import VocabTensor
    from ..checkpoint.optim import remap_optimizer_state

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    sd = opt.state_dict()
    mine = {id(p): name for name, p in rows.named_parameters()}
    flat = [p for g in opt.param_groups for p in g["params"]]  # state_dict numbers params in this order
    index = {i: mine[id(p)] for i, p in enumerate(flat) if id(p) in mine}
    picked = {i: st for i, st in sd["state"].items() if i in index and _rows_of(st) == rm.source_rows}
    if not picked:
        return
    hidden = rows.embed.shape[1]
    shapes = {name: _Shape((rm.source_rows, hidden)) for name in index.values()}
    found = {name: VocabTensor(name, "input" if name == "embed" else "output", "weight", 0, "tokengraft_rows")
             for name in index.values()}
    order = sorted(picked)
    part = {"state": picked, "param_groups": [{"params": order}]}
    moved = remap_optimizer_state(part, shapes, found, rm, [index[i] for i in order])
    sd["state"].update(moved["state"])
    opt.load_state_dict(sd)


class _Shape:
    """Stands in for a tensor where the remap only asks for ``.shape``."""

    def __init__(self, shape):
        self.shape = shape


def _rows_of(st: dict) -> int | None:
    import torch

    return next((v.shape[0] for v in st.values() if torch.is_tensor(v) and v.ndim == 2), None)
