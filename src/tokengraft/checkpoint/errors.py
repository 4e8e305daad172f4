"""The checkpoint package's error classes, in a leaf module so every other module can raise them
without importing each other (readers, remap, the safetensors reader, optimizer moments)."""
from __future__ import annotations

from ..errors import TokengraftError


class CheckpointError(TokengraftError):
    """A checkpoint that cannot be read as it is: says what is wrong, where, and what to do."""


class RemapError(TokengraftError):
    """Rows that cannot be carried to the target vocabulary as asked."""


class XTunerError(CheckpointError):
    """A bad or unsupported XTuner artifact: says what, where, and what to do."""


class LoraError(CheckpointError):
    """LoRA factors that cannot be merged into their base weights as they are."""
