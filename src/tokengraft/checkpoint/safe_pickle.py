"""Read ``torch.save`` files without running any code from them.

``torch.load(path, weights_only=True)`` refuses real mmengine/XTuner ``iter_N.pth`` files: their
``message_hub`` and ``meta`` hold mmengine and numpy objects. This reader rebuilds what a
checkpoint's *weights* are made of (tensors, storages, plain containers, dtypes, sizes) and turns
every other global into an inert :class:`Placeholder` that records its name and arguments. A
placeholder is never the named callable: ``os.system`` in a pickle becomes ``Placeholder('os',
'system')``, so a malicious ``__reduce__`` does nothing.

Storages are mapped copy-on-write from the file (``mmap.ACCESS_COPY``): tensors are read lazily
page by page and writing to them can never touch the source.
"""
from __future__ import annotations

import collections
import mmap
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from ..errors import TokengraftError


class UnsafeCheckpointError(TokengraftError):
    """The file cannot be read without executing code from it (or is not a torch file)."""


class Placeholder:
    """Stands in for a global the checkpoint names but we refuse to import or call.

    Instances record ``module``, ``name``, the call ``args`` and any ``state``; nothing else."""

    module = "?"
    name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):  # never does anything: the real class is not imported
        pass

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # a placeholder used as a function (REDUCE on an instance)
        return _placeholder_class(self.module, self.name)(*args)

    # BUILD may also set items/attributes; be a permissive inert sink for them
    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("items", []).append(value)

    def extend(self, values):
        for v in values:
            self.append(v)

    def __repr__(self):
        return f"<inert {self.module}.{self.name}>"


_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def _placeholder_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(f"Inert_{name}", (Placeholder,), {"module": module, "name": name})
    return _PLACEHOLDERS[key]


class _DefaultDict(dict):
    """``collections.defaultdict`` without its factory (which would be code from the file)."""

    def __init__(self, *args, **kwargs):
        super().__init__()


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    t = torch.empty((0,), dtype=storage.dtype)
    t.set_(storage.untyped, storage_offset, tuple(size), tuple(stride))
    return t


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, *state):
    return data  # a Parameter's data is all a checkpoint reader needs


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


class _Storage:
    """An untyped storage plus the dtype its tensors view it as."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype):
        self.untyped, self.dtype = untyped, dtype


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


_SAFE = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): _DefaultDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor"): lambda s, o, size, stride: _rebuild_tensor(s, o, size, stride),
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): lambda data=None, requires_grad=True: data,
}


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


def _safe_global(module: str, name: str):
    if (module, name) in _SAFE:
        return _SAFE[(module, name)]
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:  # old files say torch.cuda.HalfStorage
        return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype):
            return obj
    return _placeholder_class(module, name)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages):
        import io

        super().__init__(io.BytesIO(data))
        self._storages = storages

    def find_class(self, module, name):
        return _safe_global(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unknown persistent id {pid!r:.60}")
        _, stype, key, _location, _numel = pid
        if not isinstance(stype, _StorageType):
            raise UnsafeCheckpointError(f"unknown storage type {stype!r}; tokengraft reads the standard tensor types only")
        dtype = stype.dtype
        return _Storage(self._storages(str(key)), dtype)


def _member_offset(fh, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored (uncompressed) member's data inside the zip file."""
    fh.seek(info.header_offset)
    head = fh.read(30)
    if head[:4] != b"PK\x03\x04":
        raise UnsafeCheckpointError("corrupt zip member header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def safe_load(path) -> object:
    """Unpickle a ``torch.save`` file (zip format) without executing code from it.

    Tensors come back as tensors (copy-on-write views of the file), plain containers as
    themselves, and every other object as an inert :class:`Placeholder`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80":
            raise UnsafeCheckpointError(
                f"{path}: a legacy (pre-1.6, non-zip) torch pickle; tokengraft reads only the zip format. "
                f"Re-save it in a trusted environment with torch.save(torch.load(path), new_path)")
        raise UnsafeCheckpointError(f"{path}: not a torch checkpoint (neither zip nor pickle); is the file truncated?")
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafeCheckpointError(f"{path}: corrupt torch zip file ({e}); is it truncated?") from None
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise UnsafeCheckpointError(f"{path}: expected one data.pkl inside the torch zip file, found {len(pkl)}")
    prefix = pkl[0][: -len("data.pkl")]
    infos = {i.filename: i for i in zf.infolist()}
    order = "little"
    if prefix + "byteorder" in infos:
        order = zf.read(prefix + "byteorder").decode().strip()
    if order != "little":
        raise UnsafeCheckpointError(f"{path}: big-endian checkpoints are not supported")
    fh = open(path, "rb")
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    cache: dict[str, torch.UntypedStorage] = {}

    def storage(key: str) -> torch.UntypedStorage:
        if key not in cache:
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise UnsafeCheckpointError(f"{path}: storage {key!r} is missing from the file; is it truncated?")
            if info.compress_type != zipfile.ZIP_STORED:
                data = bytearray(zf.read(info))
                cache[key] = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
            else:
                off = _member_offset(fh, info)
                if off + info.file_size > size:
                    raise UnsafeCheckpointError(f"{path}: storage {key!r} runs past the end of the file; "
                                                f"the file is truncated")
                if info.file_size == 0:
                    cache[key] = torch.UntypedStorage(0)
                else:
                    cache[key] = torch.frombuffer(mm, dtype=torch.uint8, offset=off,
                                                  count=info.file_size).untyped_storage()
        return cache[key]

    try:
        obj = _Unpickler(zf.read(pkl[0]), storage).load()
    except UnsafeCheckpointError as e:
        if str(path) in str(e):
            raise
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError) as e:
        raise UnsafeCheckpointError(f"{path}: cannot unpickle safely ({type(e).__name__}: {e})") from None
    finally:
        fh.close()  # the mmap keeps its own reference to the file
    return obj


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
