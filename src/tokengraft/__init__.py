"""tokengraft: add special tokens to LLaVA-style and causal LMs, and carry checkpoints across
vocabulary changes by token identity."""
__version__ = "0.1.0"

from .manifest import AddedToken, Manifest, ManifestError  # noqa: E402
from .vocab import RowMap, fingerprint, vocab_of  # noqa: E402
from .graft import TokenSpec, graft, parse_tokens  # noqa: E402  (torch only; transformers loads lazily)


def __getattr__(name):  # heavy (transformers-dependent) entry points load on first use
    import importlib

    if name in ("load_checkpoint", "remap_state_dict", "read_state_dict"):
        return getattr(importlib.import_module(".checkpoint", __name__), name)
    if name in ("export", "verify"):
        return getattr(importlib.import_module(".export", __name__), name)
    if name == "load_run":
        return importlib.import_module(".train.run", __name__).load_run
    raise AttributeError(name)


__all__ = ["AddedToken", "Manifest", "ManifestError", "RowMap", "fingerprint", "vocab_of",
           "graft", "TokenSpec", "parse_tokens", "load_checkpoint", "remap_state_dict",
           "read_state_dict", "export", "verify", "load_run"]
