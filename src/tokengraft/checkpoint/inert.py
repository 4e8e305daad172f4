"""Inert stand-ins for the globals a checkpoint names but tokengraft refuses to import or call.

:mod:`safe_pickle` builds these while reading; :mod:`repickle` writes them back as the same
globals, arguments and state, so a same-format output loads wherever the input did. Nothing here
ever runs code from a file.
"""
from __future__ import annotations

import collections
import pickle

_NO_STATE = object()

# Globals known to be inert when a pickle naming them is loaded with ``torch.load(weights_only=False)``
# where their library is installed: constructors of data (tensors, storages, containers, numpy
# arrays/scalars/dtypes, dates) and the record classes real trainers write (checked on real files:
# mmengine 0.10.6 / XTuner 0.2.0 iter_N.pth, DeepSpeed 0.16/0.19 ZeRO-2/3 partitions, transformers
# Trainer rng_state.pth). Anything else -- a callable a payload could chain (getattr, attrgetter,
# partial, resolve_name, logging.config, os.*) or an unknown class -- is refused where a file would
# be handed on or handed to a library that unpickles freely.
INERT_GLOBALS = frozenset({
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "deque"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bool"),
    ("_codecs", "encode"),  # protocol 2 writes bytes as _codecs.encode(text, "latin1")
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"), ("datetime", "timedelta"),
    ("datetime", "timezone"),
    ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *(("numpy.random._pickle", n) for n in ("__randomstate_ctor", "__bit_generator_ctor", "__generator_ctor")),
    ("numpy.random.mtrand", "RandomState"), ("numpy.random._mt19937", "MT19937"),
    ("mmengine.logging.history_buffer", "HistoryBuffer"), ("mmengine.config.config", "ConfigDict"),
    ("mmengine.config", "ConfigDict"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"), ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"), ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
})
# ``builtins.getattr(<class>, <name>)`` the records above really pickle: mmengine's HistoryBuffer keeps
# its statistics methods (``statistics_methods = {'min': HistoryBuffer.min, ...}``), pickled as
# getattr(HistoryBuffer, 'min'). Only these exact lookups of plain methods are written back.
INERT_ATTRIBUTES = {
    ("mmengine.logging.history_buffer", "HistoryBuffer"): frozenset({"min", "max", "current", "mean"}),
}
_STORAGES = frozenset(f"{k}Storage" for k in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                                              "Byte", "Bool", "ComplexFloat", "ComplexDouble", "Untyped"))
_DTYPES = frozenset(("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                     "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32",
                     "uint64", "double", "float", "half", "long", "int", "short"))


def is_inert_global(module: str, name: str) -> bool:
    """Whether a pickle may name ``module.name`` in a file tokengraft hands on (see INERT_GLOBALS)."""
    if (module, name) in INERT_GLOBALS:
        return True
    return module in ("torch", "torch.cuda") and (name in _STORAGES or (module == "torch" and name in _DTYPES))


def is_inert_getattr(obj) -> bool:
    """Whether ``obj`` is an inert record of ``builtins.getattr(cls, name)`` with ``(cls, name)`` in
    INERT_ATTRIBUTES (a method looked up on an allowlisted class; nothing is called)."""
    if not (isinstance(obj, Placeholder) and (obj.module, obj.name) == ("builtins", "getattr")):
        return False
    if obj.via != "reduce" or obj.kwargs or len(obj.args) != 2 or obj.has_state:
        return False
    owner, attr = placeholder_global(obj.args[0]), obj.args[1]
    return owner in INERT_ATTRIBUTES and isinstance(attr, str) and attr in INERT_ATTRIBUTES[owner]


def first_code_global(named) -> str | None:
    """The first ``module.name`` in ``named`` that is not known to be inert (sorted), else None."""
    bad = sorted(f"{m}.{n}" for m, n in named if not is_inert_global(m, n))
    return bad[0] if bad else None


class Placeholder:
    """Stands in for a global the checkpoint names but we refuse to import or call.

    An instance records how the pickle built it, so it can be written back unchanged:
    ``module``/``name`` (class attributes), ``args``, ``kwargs``, ``via`` ("reduce": the pickle
    called the global; "newobj": it called ``global.__new__``), ``state`` (BUILD), ``listitems``
    (APPEND/APPENDS) and ``dictitems`` (SETITEM/SETITEMS, in order). Nothing else ever happens."""

    module = "?"
    name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        d = obj.__dict__
        d["args"], d["kwargs"], d["via"] = args, kwargs, "newobj"
        d["state"], d["listitems"], d["dictitems"] = _NO_STATE, [], []
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls the global: __new__ then __init__
        self.__dict__["via"] = "reduce"

    def __setstate__(self, state):  # BUILD
        self.__dict__["state"] = state

    def __call__(self, *args, **kwargs):  # a placeholder instance used as a function (REDUCE)
        return _InertCall(self, args)

    def __setitem__(self, key, value):  # SETITEM(S)
        self.dictitems.append((key, value))

    def append(self, value):  # APPEND(S)
        self.listitems.append(value)

    def extend(self, values):
        self.listitems.extend(values)

    @property
    def has_state(self) -> bool:
        return self.state is not _NO_STATE

    def __reduce_ex__(self, protocol):
        """The recorded global, arguments and state: pickling writes back what was read."""
        state = self.state if self.has_state else None
        items = iter(self.listitems) if self.listitems else None
        pairs = iter(self.dictitems) if self.dictitems else None
        if self.via == "reduce":
            return (type(self), self.args, state, items, pairs)
        if self.kwargs:
            import copyreg

            if protocol < 4:
                raise pickle.PicklingError(f"{self!r} was built with NEWOBJ_EX; write with protocol 4")
            return (copyreg.__newobj_ex__, (type(self), self.args, self.kwargs), state, items, pairs)
        import copyreg

        return (copyreg.__newobj__, (type(self), *self.args), state, items, pairs)

    def __repr__(self):
        return f"<inert {self.module}.{self.name}>"


class _InertCall(Placeholder):
    """The result of calling a placeholder *instance* (e.g. a pickled bound method)."""

    def __new__(cls, func, args):
        obj = Placeholder.__new__(cls)
        obj.__dict__.update(func=func, args=args, via="reduce")
        obj.module, obj.name = func.module, func.name
        return obj

    def __init__(self, *args):
        pass

    def __reduce_ex__(self, protocol):
        state = self.state if self.has_state else None
        return (self.func, self.args, state, iter(self.listitems) if self.listitems else None,
                iter(self.dictitems) if self.dictitems else None)


_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def _placeholder_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(f"Inert_{name}", (Placeholder,), {"module": module, "name": name})
    return _PLACEHOLDERS[key]


def placeholder_global(obj) -> tuple[str, str] | None:
    """``(module, name)`` when ``obj`` is a placeholder *class* (a global reference), else None."""
    if isinstance(obj, type) and issubclass(obj, Placeholder) and obj not in (Placeholder, _InertCall):
        return obj.module, obj.name
    return None


class _DefaultDict(dict):
    """``collections.defaultdict`` without calling its factory (which would be code from the file);
    the factory is kept (inert) so writing back rebuilds the same defaultdict."""

    def __init__(self, factory=None, *args, **kwargs):
        super().__init__()
        self.factory = factory

    def __reduce_ex__(self, protocol):
        return (collections.defaultdict, (self.factory,), None, None, iter(self.items()))

    def __deepcopy__(self, memo):
        import copy

        new = memo[id(self)] = _DefaultDict(self.factory)
        new.update((copy.deepcopy(k, memo), copy.deepcopy(v, memo)) for k, v in self.items())
        return new


def placeholders_in(obj, limit: int = 20) -> list[str]:
    """Names of inert placeholders found in ``obj`` (for reports): what was *not* rebuilt."""
    found: list[str] = []
    seen = set()

    def walk(o, depth=0):
        if len(found) >= limit or depth > 12 or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, Placeholder):
            n = f"{o.module}.{o.name}"
            if n not in found:
                found.append(n)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                walk(v, depth + 1)

    walk(obj)
    return found
