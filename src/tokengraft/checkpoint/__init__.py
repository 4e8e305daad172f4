"""Checkpoints across vocabulary changes: safe lazy readers for every format, remap of every
vocabulary-shaped tensor by token identity, and streaming on-disk conversion.

Stable entry points: ``read_state_dict(path) -> (tensors, info)``, ``safe_load(path)``,
``remap_state_dict(...)``, ``load_checkpoint(model, path, ...)``, ``convert(...)``.
Everything here needs torch and safetensors only (transformers is imported on demand, for
tokenizers without a ``tokenizer.json``).
"""
from .convert import convert
from .errors import CheckpointError, RemapError
from .readers import Checkpoint, CheckpointInfo, open_checkpoint, read_state_dict
from .load import load_checkpoint
from .optim import remap_optimizer_state
from .remap import RemapReport, classify, remap_state_dict
from .safetensors import SafetensorsFile
from .safe_pickle import Placeholder, UnsafeCheckpointError, safe_load
from .sources import SourceVocabError

__all__ = ["Checkpoint", "CheckpointError", "CheckpointInfo", "Placeholder", "UnsafeCheckpointError",
           "open_checkpoint", "read_state_dict", "safe_load", "SafetensorsFile", "remap_state_dict",
           "load_checkpoint", "remap_optimizer_state", "RemapReport", "RemapError", "SourceVocabError",
           "classify", "convert"]
