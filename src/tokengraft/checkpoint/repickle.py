"""Write back what :func:`safe_load` read: same format in, same format out.

``safe_save(obj, path)`` writes ``obj`` as a torch zip checkpoint exactly like ``torch.save``
(torch's own writer lays out the storages), but with a pickler that writes every inert
:class:`~tokengraft.checkpoint.safe_pickle.Placeholder` back as the *same* global with the same
arguments, state, appended and set items. The named modules (mmengine, numpy, ...) are never
imported: the global is written as text. So a converted mmengine ``iter_N.pth`` loads with
``torch.load(out, weights_only=False)`` in an environment that has mmengine, rebuilding the same
``HistoryBuffer``/numpy objects the input held -- and nothing from the input ran here.

A global that runs code or touches files when loaded (``os.system``, ``builtins.eval``,
``subprocess.*``, ...) is refused with one line instead of being handed on.

Caveat: tensors come back as plain tensors (``nn.Parameter`` wrappers are not kept); checkpoints
hold state dicts, whose tensors are plain already.
"""
from __future__ import annotations

import pickle
import types
from pathlib import Path

import torch

from ..outdir import atomic_file
from .inert import placeholder_global
from .safe_pickle import UnsafeCheckpointError

# Globals that run code, touch files or the network when a pickle is loaded. A checkpoint naming
# one is hostile: tokengraft never ran it, and will not hand it on inside a file that looks
# converted (a guard against the classic payloads, not a proof of safety: see docs).
_CODE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
                 "code", "codeop", "ctypes", "pickle", "_pickle", "marshal", "pathlib", "io", "_io", "codecs",
                 "tempfile", "glob", "zipfile", "tarfile", "urllib", "http", "ftplib", "smtplib", "telnetlib",
                 "webbrowser", "multiprocessing", "threading", "asyncio", "signal", "requests", "commands",
                 "platform", "pdb", "timeit", "cProfile", "profile", "trace", "site"}
_CODE_BUILTINS = {"eval", "exec", "compile", "__import__", "open", "input", "breakpoint", "globals", "locals",
                  "vars", "setattr", "delattr", "exit", "quit", "help", "memoryview"}


def _runs_code(module: str, name: str) -> bool:
    top = module.split(".")[0]
    return top in _CODE_MODULES or (top in ("builtins", "__builtin__") and name in _CODE_BUILTINS)


class _Pickler(pickle._Pickler):
    """The pure-Python pickler (its ``save_global`` can be overridden; the C one cannot): a
    placeholder class is written as its recorded global without importing the module."""

    def save_global(self, obj, name=None):
        ref = placeholder_global(obj)
        if ref is None:
            return super().save_global(obj, name)
        module, qualname = ref
        if _runs_code(module, qualname):
            raise UnsafeCheckpointError(
                f"refusing to write back {module}.{qualname}: the input names a global that runs code or "
                f"touches files when the checkpoint is loaded (tokengraft never ran it); do not torch.load "
                f"the input either")
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
