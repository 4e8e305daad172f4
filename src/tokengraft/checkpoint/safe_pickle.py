"""Read ``torch.save`` files without running any code from them.

``torch.load(path, weights_only=True)`` refuses real mmengine/XTuner ``iter_N.pth`` files: their
``message_hub`` and ``meta`` hold mmengine and numpy objects. This reader rebuilds what a
checkpoint's *weights* are made of (tensors, storages, plain containers, dtypes, sizes) and turns
every other global into an inert :class:`Placeholder` that records exactly what the pickle said
(the global's module and name, the call arguments, the state, appended items and set items).
A placeholder is never the named callable: ``os.system`` in a pickle becomes ``Placeholder('os',
'system')``, so a malicious ``__reduce__`` does nothing. Because the record is complete,
:func:`tokengraft.checkpoint.repickle.safe_save` can write the same globals back, so the output
loads in an environment that has mmengine/numpy exactly as the input did.

Limits (hostile files): storages are bounded by the sizes the pickle declares; a compressed zip
member is inflated in chunks, never past its declared size nor past a small total budget (a
deflate bomb cannot blow up memory); a tensor view must lie inside its storage with non-negative
offset, sizes and strides. Every violation is one :class:`UnsafeCheckpointError` line.

Storages are mapped copy-on-write from the file (``mmap.ACCESS_COPY``): tensors are read lazily
page by page and writing to them can never touch the source.
"""
from __future__ import annotations

import _compat_pickle
import collections
import mmap
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from ..errors import TokengraftError
from .inert import Placeholder, _DefaultDict, _placeholder_class, first_code_global, placeholder_global, placeholders_in

# the inert names are re-exported: readers import the reader and what it yields from one place
__all__ = ["safe_load", "check_inert", "UnsafeCheckpointError", "Placeholder", "placeholder_global", "placeholders_in"]

# Bytes a file may inflate from *compressed* members in total. torch.save never compresses, so
# only re-zipped files use this; a deflate bomb (1.5 MB -> GBs) stops here with one line.
COMPRESSED_BUDGET = 64 << 20
_CHUNK = 1 << 20


class UnsafeCheckpointError(TokengraftError):
    """The file cannot be read without executing code from it, or breaks a safety limit."""


def _bytearray(*args):
    # bytearray(10**12) would allocate; only the pickled form (data [, encoding]) is accepted
    if args and isinstance(args[0], int):
        raise UnsafeCheckpointError("bytearray(<int>) in the pickle (an allocation request), refused")
    return bytearray(*args)


class _Storage:
    """An untyped storage plus the dtype its tensors view it as, and its declared size."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype, key: str):
        self.untyped, self.dtype, self.key = untyped, dtype, key


def _ints(value, what: str) -> tuple[int, ...]:
    try:
        out = tuple(value)
    except TypeError:
        raise UnsafeCheckpointError(f"tensor {what} is not a sequence: {value!r:.60}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise UnsafeCheckpointError(f"tensor {what} holds non-integers: {out!r:.80}")
    return out


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None, dtype=None):
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"a tensor is rebuilt from {type(storage).__name__}, not from a storage")
    dtype = dtype if isinstance(dtype, torch.dtype) else storage.dtype
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool):
        raise UnsafeCheckpointError(f"tensor storage offset {storage_offset!r:.40} is not an integer")
    if len(size) != len(stride):
        raise UnsafeCheckpointError(f"tensor size {list(size)} and stride {list(stride)} disagree in length")
    if storage_offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise UnsafeCheckpointError(f"negative tensor offset/size/stride (offset {storage_offset}, size "
                                    f"{list(size)}, stride {list(stride)}) in storage {storage.key!r}")
    held = storage.untyped.nbytes() // dtype.itemsize
    # elements the view touches: the last one sits at offset + sum((size-1)*stride)
    need = storage_offset if 0 in size else storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if need > held:
        raise UnsafeCheckpointError(f"a tensor view (size {list(size)}, stride {list(stride)}, offset "
                                    f"{storage_offset}) needs {need} elements but storage {storage.key!r} "
                                    f"holds {held}: a view larger than its storage")
    t = torch.empty((0,), dtype=dtype)
    t.set_(storage.untyped, storage_offset, size, stride)
    return t


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype=dtype)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, *state):
    return data  # a Parameter's data is all a checkpoint reader needs


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


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
    ("builtins", "bytearray"): _bytearray,
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
        self.named: set[tuple[str, str]] = set()  # every global the pickle names (nothing imported)

    def find_class(self, module, name):
        # Python 2 names (protocol 2 writes `__builtin__ set`): the base find_class would map them,
        # overriding it skips that, so map here (a lookup table; nothing is imported)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        self.named.add((module, name))
        return _safe_global(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unknown persistent id {pid!r:.60}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise UnsafeCheckpointError(f"unknown storage type {stype!r}; tokengraft reads the standard tensor types only")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise UnsafeCheckpointError(f"storage {key!r} declares an invalid size {numel!r:.40}")
        return _Storage(self._storages(str(key), numel * stype.dtype.itemsize), stype.dtype, str(key))


def _member_offset(fh, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored (uncompressed) member's data inside the zip file."""
    fh.seek(info.header_offset)
    head = fh.read(30)
    if head[:4] != b"PK\x03\x04":
        raise UnsafeCheckpointError("corrupt zip member header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


class _Inflater:
    """Reads compressed members in chunks, never past a bound nor past the file's total budget."""

    def __init__(self, zf: zipfile.ZipFile, budget: int):
        self.zf, self.left = zf, budget

    def read(self, info: zipfile.ZipInfo, bound: int, what: str) -> bytearray:
        hint = ("(a zip bomb?); torch.save never compresses: re-save the checkpoint uncompressed in a "
                "trusted environment")
        if bound > self.left:
            raise UnsafeCheckpointError(f"{what} is compressed and declares {bound} bytes, over the "
                                        f"{COMPRESSED_BUDGET >> 20} MiB allowed for compressed members {hint}")
        if info.file_size > bound:
            raise UnsafeCheckpointError(f"{what} inflates to {info.file_size} bytes, more than the {bound} "
                                        f"it declares {hint}")
        out = bytearray()
        with self.zf.open(info) as f:  # zipfile stops at the header's size; the bound is kept anyway
            while chunk := f.read(min(_CHUNK, bound - len(out) + 1)):
                out += chunk
                if len(out) > bound:
                    raise UnsafeCheckpointError(f"{what} inflates past the {bound} bytes it declares {hint}")
        self.left -= len(out)
        return out


def safe_load(path, named: set | None = None) -> object:
    """Unpickle a ``torch.save`` file (zip format) without executing code from it.

    Tensors come back as tensors (copy-on-write views of the file), plain containers as
    themselves, and every other object as an inert :class:`Placeholder`. ``named``: a set that
    receives every ``(module, name)`` global the pickle names."""
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
    inflater = _Inflater(zf, COMPRESSED_BUDGET)

    def member(name: str, bound: int) -> bytes:
        info = infos[name]
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size > size:
                raise UnsafeCheckpointError(f"{name} claims {info.file_size} bytes, more than the whole file")
            return zf.read(info)
        return bytes(inflater.read(info, min(bound, inflater.left), name))

    fh = None
    try:
        order = "little"
        if prefix + "byteorder" in infos:
            order = member(prefix + "byteorder", 64).decode(errors="replace").strip()
        if order != "little":
            raise UnsafeCheckpointError("big-endian checkpoints are not supported")
        fh = open(path, "rb")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        cache: dict[str, torch.UntypedStorage] = {}

        def storage(key: str, nbytes: int) -> torch.UntypedStorage:
            if key in cache:
                if cache[key].nbytes() != nbytes:
                    raise UnsafeCheckpointError(f"storage {key!r} is declared with two different sizes")
                return cache[key]
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise UnsafeCheckpointError(f"storage {key!r} is missing from the file; is it truncated?")
            if info.compress_type != zipfile.ZIP_STORED:
                data = inflater.read(info, nbytes, f"storage {key!r}")
            else:
                data = None
                if info.file_size > size:
                    raise UnsafeCheckpointError(f"storage {key!r} claims {info.file_size} bytes, more than the file")
            have = len(data) if data is not None else info.file_size
            if have < nbytes:  # like torch.load: a record shorter than its declared storage is corrupt
                raise UnsafeCheckpointError(f"storage {key!r} declares {nbytes} bytes but the file holds {have}; "
                                            f"the file is truncated or corrupt")
            if nbytes == 0:
                cache[key] = torch.UntypedStorage(0)
            elif data is not None:
                cache[key] = torch.frombuffer(data, dtype=torch.uint8, count=nbytes).untyped_storage()
            else:
                off = _member_offset(fh, info)
                if off + nbytes > size:
                    raise UnsafeCheckpointError(f"storage {key!r} runs past the end of the file; the file is truncated")
                cache[key] = torch.frombuffer(mm, dtype=torch.uint8, offset=off, count=nbytes).untyped_storage()
            return cache[key]

        unpickler = _Unpickler(member(pkl[0], COMPRESSED_BUDGET), storage)
        try:
            obj = unpickler.load()
        finally:
            if named is not None:
                named.update(unpickler.named)
    except UnsafeCheckpointError as e:
        if str(path) in str(e):
            raise
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RuntimeError, MemoryError, RecursionError, OverflowError) as e:
        raise UnsafeCheckpointError(f"{path}: cannot unpickle safely ({type(e).__name__}: {e})"[:400]) from None
    finally:
        if fh is not None:
            fh.close()  # the mmap keeps its own reference to the file
    return obj


def check_inert(path, what: str = "hand it on") -> object:
    """``safe_load(path)``, refusing (one line naming the global) a file that names any global not
    known to be inert: call before a file is copied into an output or given to a library that
    unpickles with ``weights_only=False`` (DeepSpeed's engine), so that loading runs nothing."""
    named: set = set()
    obj = safe_load(path, named)
    bad = first_code_global(named)
    if bad is not None:
        raise UnsafeCheckpointError(f"{path}: names {bad}, a global not known to be inert when the file is loaded "
                                    f"(it could run code); tokengraft will not {what}. Remove that object or "
                                    f"re-save the file in an environment you trust")
    return obj
