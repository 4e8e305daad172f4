"""The run folder rule: where a run may write, and what --overwrite may remove.

The output may not be, contain or be inside any input (outdir.check_output). ``--overwrite`` only
ever clears a folder that holds a run (its run.json), and then only the files a run writes. A run
folder that never reached its first checkpoint (a failed start, Ctrl-C) holds nothing worth keeping,
so a plain rerun restarts it without ``--overwrite``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..outdir import check_output
from .config import TrainConfig, TrainError
from .run import (
    ADAPTER_DIR,
    ADAPTER_FILE,
    FULL_FILE,
    PROJECTOR_FILE,
    ROWS_FILE,
    RUN_FILE,
    checkpoints,
    last_checkpoint,
)

# every file a run writes at its top level (checkpoint-N/, tensorboard/ and adapter/ are folders)
RUN_FILES = (RUN_FILE, ROWS_FILE, ADAPTER_FILE, "adapter_config.json", PROJECTOR_FILE, FULL_FILE, "metrics.jsonl",
             "new_tokens.png", "config.train.json", "tokengraft.json")


def inputs_of(cfg: TrainConfig) -> dict:
    return {"model": cfg.model, "data": cfg.data, "image folder": cfg.image_folder, "eval data": cfg.eval_data,
            "tokens file": cfg.tokens_file}


def is_run(folder: Path) -> bool:
    return (folder / RUN_FILE).is_file()


def unfinished_start(folder: Path) -> bool:
    """A run that wrote its run.json but no checkpoint and no final parts: safe to start again."""
    return is_run(folder) and last_checkpoint(folder) is None and not (folder / ROWS_FILE).is_file()


def prepare_run_folder(cfg: TrainConfig, *, resuming: bool, clear: bool) -> Path:
    """Check ``cfg.output_dir`` (``clear=False``: changes nothing) or also make it ready for a new
    run (``clear=True``: remove an earlier run's files when allowed, create the folder)."""
    run_dir = Path(cfg.output_dir)
    inputs = inputs_of(cfg)
    if resuming or unfinished_start(run_dir):
        check_output(run_dir, inputs, overwrite=True)  # containment and "is a file"; the run stays
        if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run(run_dir):
            raise TrainError(f"{run_dir}: --resume continues a run, but this folder holds no {RUN_FILE}; "
                             f"pass the run's own --output-dir")
        fresh = not resuming
    else:
        check_output(run_dir, inputs, overwrite=True)  # containment, "is a file", "not tokengraft's"
        if run_dir.is_dir() and any(run_dir.iterdir()):
            if not is_run(run_dir):
                raise TrainError(f"{run_dir}: holds no {RUN_FILE}, so it is not a training run; --overwrite only "
                                 f"replaces a run: choose another --output-dir")
            if not cfg.overwrite:
                raise TrainError(f"{run_dir}: already holds a run; pass --resume to continue it, --overwrite to "
                                 f"start over, or choose another --output-dir")
        fresh = True
    if clear:
        if fresh and run_dir.is_dir():
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run left: only the files and folders a run writes, never other files."""
    for ck in checkpoints(run_dir):
        shutil.rmtree(ck)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in ("tensorboard", ADAPTER_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)

