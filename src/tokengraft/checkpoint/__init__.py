"""Checkpoints across vocabulary changes: safe lazy readers for every format, remap of every
vocabulary-shaped tensor by token identity, and streaming on-disk conversion.

Stable entry points: ``read_state_dict(path) -> (tensors, info)``, ``safe_load(path)``,
``remap_state_dict(...)``, ``load_checkpoint(model, path, ...)``, ``convert(...)``.
"""
from .readers import (Checkpoint, CheckpointError, CheckpointInfo, open_checkpoint, read_state_dict,
                      safetensors_header)
from .safe_pickle import Placeholder, UnsafeCheckpointError, safe_load


def __getattr__(name):  # remap/convert pull in more (tokenizers); load them on first use
    import importlib

    if name in ("remap_state_dict", "RemapReport", "RemapError", "load_checkpoint", "remap_optimizer_state"):
        return getattr(importlib.import_module(".remap", __name__), name)
    if name in ("convert",):
        return getattr(importlib.import_module(".convert", __name__), name)
    raise AttributeError(name)


__all__ = ["Checkpoint", "CheckpointError", "CheckpointInfo", "Placeholder", "UnsafeCheckpointError",
           "open_checkpoint", "read_state_dict", "safe_load", "safetensors_header", "remap_state_dict",
           "load_checkpoint", "remap_optimizer_state", "RemapReport", "RemapError", "convert"]
