"""Write back what :func:`safe_load` read: same format in, same format out.

``safe_save(obj, path)`` writes ``obj`` as a torch zip checkpoint exactly like ``torch.save``
(torch's own writer lays out the storages), but with a pickler that writes every inert
:class:`~tokengraft.checkpoint.safe_pickle.Placeholder` back as the *same* global with the same
arguments, state, appended and set items. The named modules (mmengine, numpy, ...) are never
imported: the global is written as text. So a converted mmengine ``iter_N.pth`` loads with
``torch.load(out, weights_only=False)`` in an environment that has mmengine, rebuilding the same
``HistoryBuffer``/numpy objects the input held -- and nothing from the input ran here.

Only globals known to be inert when loaded are written (:data:`.inert.INERT_GLOBALS`: torch's
rebuild functions and storages, plain containers, numpy arrays/scalars/dtypes, dates, mmengine's
``HistoryBuffer``/``ConfigDict``, DeepSpeed's ZeRO records). Anything else -- ``os.system``, but also
the callables a payload chains (``builtins.getattr``, ``operator.attrgetter``, ``functools.partial``,
``pkgutil.resolve_name``, ``logging.config.*``) or an unknown class -- is refused with one line
naming the global: tokengraft never ran it, and will not hand it on inside a converted file.

Caveat: tensors come back as plain tensors (``nn.Parameter`` wrappers are not kept); checkpoints
hold state dicts, whose tensors are plain already.
"""
from __future__ import annotations

import pickle
import types
from pathlib import Path

import torch

from ..outdir import atomic_file
from .inert import Placeholder, is_inert_getattr, is_inert_global, placeholder_global
from .safe_pickle import UnsafeCheckpointError, check_inert


def _refuse_unless_inert(module: str, name: str) -> None:
    if not is_inert_global(module, name):
        raise UnsafeCheckpointError(
            f"refusing to write back {module}.{name}: the input names a global that is not known to be inert "
            f"when the checkpoint is loaded (it could run code; tokengraft never ran it); do not torch.load the "
            f"input either, or re-save it without that object in an environment you trust")


class _Pickler(pickle._Pickler):
    """The pure-Python pickler (its ``save_global`` can be overridden; the C one cannot): a
    placeholder class is written as its recorded global without importing the module."""

    _getattr_ok = False  # set while writing one allowlisted getattr(cls, name) record

    def reducer_override(self, obj):
        # builtins.getattr is inert only as the exact (class, method) lookups real records pickle; every
        # record is checked here (its global is memoized after the first one, so save_global sees it once)
        if isinstance(obj, Placeholder) and (obj.module, obj.name) == ("builtins", "getattr"):
            if not is_inert_getattr(obj):
                _refuse_unless_inert("builtins", "getattr")
            self._getattr_ok = True
        return NotImplemented

    def save_global(self, obj, name=None):
        ref = placeholder_global(obj)
        if ref is None:
            qualname = name or getattr(obj, "__qualname__", None) or obj.__name__
            module = pickle.whichmodule(obj, qualname)
            _refuse_unless_inert(module, qualname)
            return super().save_global(obj, name)
        module, qualname = ref
        if not (ref == ("builtins", "getattr") and self._getattr_ok):
            _refuse_unless_inert(module, qualname)
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + module.encode("utf-8") + b"\n" + qualname.encode("utf-8") + b"\n")
        self.memoize(obj)


# torch.save(pickle_module=...) only needs a module-like object whose Pickler it subclasses
_pickle_module = types.SimpleNamespace(Pickler=_Pickler, __name__="tokengraft_repickle")


def safe_save(obj, path, protocol: int = 2) -> Path:
    """Write ``obj`` (as returned by :func:`safe_load`, possibly edited) to ``path`` atomically.

    The file is written beside ``path`` and renamed into place, so a failure never leaves a
    half-written checkpoint, and a reader of the old file (a copy-on-write mapping) is unaffected."""
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp, pickle_module=_pickle_module, pickle_protocol=protocol)
    return path


def looks_pickled(path: Path) -> bool:
    """A torch zip checkpoint or a raw pickle (protocol 2+), judged by its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def copy_inert(src: Path, dst: Path) -> str | None:
    """Copy ``src`` into an output unless it is a pickle that names a global not known to be inert
    (a Trainer's ``training_args.bin``, a planted payload): then leave it out and return the note
    saying which global; loading what tokengraft writes never runs code, whatever is installed."""
    import shutil

    if looks_pickled(src):
        try:
            check_inert(src, "copy it into the output")
        except UnsafeCheckpointError as e:
            return f"{src.name} left out of the output: {str(e).split(': ', 1)[-1]}"
    shutil.copy2(src, dst)
    return None
