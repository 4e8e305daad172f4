"""tokengraft: add special tokens to LLaVA-style and causal LMs, and carry checkpoints across
vocabulary changes by token identity.

This ``__init__`` imports nothing heavy: ``import tokengraft.manifest`` (or ``vocab``, ``init``) must
not load transformers or the checkpoint converters (torch is fine). Entry points load on first use.
"""
from ._version import __version__  # noqa: F401
# `tokengraft.graft` is both a module and its main function: bind the function eagerly, or the submodule
# (set on the package by any `from .graft import ...`) would shadow it. graft.py needs torch only.
from .graft import TokenSpec, graft, parse_tokens  # noqa: E402,F401

_LAZY = {  # public name -> module that defines it
    "AddedToken": "manifest", "Manifest": "manifest", "ManifestError": "manifest",
    "RowMap": "vocab", "fingerprint": "vocab", "vocab_of": "vocab",
    "load_checkpoint": "checkpoint", "remap_state_dict": "checkpoint", "read_state_dict": "checkpoint",
    "export": "export", "verify": "export",
    "load_run": "train.run",
    "TokengraftError": "errors",
}


def __getattr__(name):
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'tokengraft' has no attribute {name!r}")
    mod = importlib.import_module(f".{_LAZY[name]}", __name__)
    return getattr(mod, name)


__all__ = sorted([*_LAZY, "TokenSpec", "graft", "parse_tokens"])
