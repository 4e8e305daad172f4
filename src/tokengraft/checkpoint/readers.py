"""Lazy, safe readers for every checkpoint format users have.

``open_checkpoint(path)`` recognizes the format and returns a :class:`Checkpoint` that lists keys,
shapes and dtypes without reading tensor data, and reads tensors (or whole files) on demand.
``read_state_dict(path)`` is the eager shortcut: every tensor plus an info record.

Formats: Hugging Face folders (single or sharded safetensors with index, ``.bin`` likewise), single
``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` files, XTuner/mmengine ``iter_N.pth`` files (a dict
with ``state_dict`` and ``optimizer``), XTuner DeepSpeed folders (``mp_rank_00_model_states.pt``
holding ``module``; ZeRO-2/3 partitions consolidated by :func:`.deepspeed.consolidate`, which reads
them as DeepSpeed's ``zero_to_fp32`` does but through the restricted unpickler), PEFT adapter folders.
No code from any file runs: safetensors, or :func:`safe_pickle.safe_load`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import read_json
from ..manifest import FILENAME as MANIFEST_FILE
from ..manifest import Manifest
from .errors import CheckpointError
from .safe_pickle import UnsafeCheckpointError, check_inert, placeholders_in, safe_load
from .safetensors import SafetensorsFile
from .weight_files import weight_files


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tekken.json")


@dataclass
class CheckpointInfo:
    """What a checkpoint is, beside its tensors."""

    path: Path
    format: str  # hf-folder | safetensors | torch | mmengine | deepspeed | peft
    files: dict[str, list[str]] = field(default_factory=dict)  # file (relative to root) -> its keys
    root: Path | None = None  # folder the files live in
    config: dict | None = None  # config.json of an HF folder
    adapter_config: dict | None = None  # adapter_config.json of a PEFT folder
    optimizer: dict | None = None  # a torch optimizer state_dict (mmengine / DeepSpeed, when present)
    tokenizer_dir: Path | None = None  # a folder holding the checkpoint's own tokenizer
    manifest: Manifest | None = None  # the checkpoint's own tokengraft.json
    container: dict | None = None  # the unpickled top-level dict (mmengine / DeepSpeed), tensors lazy
    state_key: str | None = None  # where the state dict sits in ``container``
    inert: list[str] = field(default_factory=list)  # globals turned into placeholders while reading
    notes: list[str] = field(default_factory=list)


# -- the lazy checkpoint ---------------------------------------------------------------------------

class Checkpoint:
    """Keys, shapes and dtypes up front; tensor data on demand."""

    def __init__(self, info: CheckpointInfo, meta: dict[str, tuple[tuple[int, ...], torch.dtype, str]],
                 eager: dict[str, torch.Tensor] | None = None):
        self.info = info
        self._meta = meta  # key -> (shape, dtype, file)
        self._eager = eager  # pickle formats: tensors already mapped (lazily, copy-on-write)

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def file_of(self, key: str) -> str:
        return self._meta[key][2]

    def get(self, key: str) -> torch.Tensor:
        if self._eager is not None:
            return self._eager[key]
        with SafetensorsFile(self.info.root / self.file_of(key)) as f:
            return f.get(key)

    def equal(self, a: str, b: str, chunk_rows: int = 4096) -> bool:
        """Whether keys ``a`` and ``b`` hold bit-identical tensors (safetensors: compared in row chunks)."""
        if self.shape(a) != self.shape(b) or self.dtype(a) != self.dtype(b):
            return False
        if self._eager is not None:
            x, y = self._eager[a], self._eager[b]
            return x.data_ptr() == y.data_ptr() or torch.equal(x, y)
        if not self.shape(a):
            return torch.equal(self.get(a), self.get(b))
        with SafetensorsFile(self.info.root / self.file_of(a)) as fa, \
                SafetensorsFile(self.info.root / self.file_of(b)) as fb:
            n = self.shape(a)[0]
            return all(torch.equal(fa.rows(a, i, min(i + chunk_rows, n)), fb.rows(b, i, min(i + chunk_rows, n)))
                       for i in range(0, n, chunk_rows))

    def read_file(self, file: str) -> dict[str, torch.Tensor]:
        """Every tensor of one file (one shard)."""
        keys = self.info.files[file]
        if self._eager is not None:
            return {k: self._eager[k] for k in keys}
        with SafetensorsFile(self.info.root / file) as f:
            return {k: f.get(k) for k in keys}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in self.info.files:
            out.update(self.read_file(f))
        return out


def read_state_dict(path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Every tensor of a checkpoint in any supported format, and what else it holds."""
    ck = open_checkpoint(path)
    return ck.state_dict(), ck.info


def open_checkpoint(path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path)
    return _open_file(path, root=path.parent, info=None)


def _tokenizer_dir(folder: Path) -> Path | None:
    return folder if any((folder / f).is_file() for f in TOKENIZER_FILES) else None


def _read_json(p: Path) -> dict:
    return read_json(p, "a JSON object", error=CheckpointError, kind=dict)


def _open_folder(folder: Path) -> Checkpoint:
    info = CheckpointInfo(path=folder, format="hf-folder", root=folder, tokenizer_dir=_tokenizer_dir(folder))
    if (folder / MANIFEST_FILE).is_file():
        info.manifest = Manifest.load(folder / MANIFEST_FILE)
    if (folder / "config.json").is_file():
        info.config = _read_json(folder / "config.json")

    if (folder / "adapter_config.json").is_file():
        info.format = "peft"
        info.adapter_config = _read_json(folder / "adapter_config.json")
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (folder / name).is_file():
                return _open_files(info, [name])
        raise CheckpointError(f"{folder}: PEFT adapter folder without adapter_model.safetensors or .bin")

    from .deepspeed import model_state_files

    if model_state_files(folder):
        return _open_deepspeed(folder, info)
    latest = folder / "latest"
    if latest.is_file():  # DeepSpeed's own layout: latest -> global_stepN/
        sub = folder / latest.read_text(errors="replace").strip()
        if sub.resolve().parent == folder.resolve() and model_state_files(sub):
            return _open_deepspeed(sub, info)

    if (folder / "optimizer.pt").is_file():  # a transformers Trainer checkpoint-N folder
        opt = check_inert(folder / "optimizer.pt", "read it as an optimizer state")
        if isinstance(opt, dict) and isinstance(opt.get("state"), dict):
            info.optimizer = opt
            info.notes.append("optimizer.pt: torch optimizer state (moments remapped with the weights)")
    found = weight_files(folder)  # what transformers loads, in its order (a single file wins over an index)
    if found is not None:
        ck = _open_files(info, found.files)
        if found.beside:
            info.notes.append(f"{found.entry} read, as transformers does; {', '.join(found.beside)} beside it ignored")
        not_found = [k for k in found.weight_map if k not in ck._meta]
        if not_found:
            raise CheckpointError(f"{folder / found.entry}: {len(not_found)} key(s) listed in the index are not "
                                  f"in their shards (first: {not_found[0]!r}); the checkpoint is corrupt")
        return ck
    sts = sorted(p.name for p in folder.glob("*.safetensors"))
    if sts:
        return _open_files(info, sts)
    raise CheckpointError(f"{folder}: no model weights found (expected model.safetensors, a sharded index, "
                          f"pytorch_model.bin, mp_rank_00_model_states.pt or an adapter folder)")


def _open_files(info: CheckpointInfo, files: list[str]) -> Checkpoint:
    """A folder's weight files: all safetensors (lazy) or all pickles (mapped)."""
    meta: dict = {}
    if all(f.endswith(".safetensors") for f in files):
        for f in files:
            with SafetensorsFile(info.root / f) as st:  # validates the header against the file
                keys = st.keys()
                for k in keys:
                    if k in meta:
                        raise CheckpointError(f"{info.root}: key {k!r} is in both {meta[k][2]} and {f}")
                    meta[k] = (st.shape(k), st.dtype(k), f)
            info.files[f] = keys
        return Checkpoint(info, meta)
    eager: dict = {}
    for f in files:
        # a folder's weight shards are state dicts: a global that is not inert is damage or an attack, and
        # an untouched shard is linked into convert's output as it is
        sd = _tensors_of(check_inert(info.root / f, "read it as weights"), info.root / f, info)
        info.files[f] = list(sd)
        for k, t in sd.items():
            meta[k] = (tuple(t.shape), t.dtype, f)
        eager.update(sd)
    return Checkpoint(info, meta, eager)


def _open_file(path: Path, root: Path, info: CheckpointInfo | None) -> Checkpoint:
    info = info or CheckpointInfo(path=path, format="safetensors", root=root)
    if path.suffix == ".safetensors":
        return _open_files(info, [path.name])
    obj = safe_load(path)
    info.format = "torch"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info.format, info.state_key = "mmengine", "state_dict"
    elif isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        info.format, info.state_key = "deepspeed", "module"
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and _all_tensors(obj["model"]):
        info.state_key = "model"
    if info.state_key:
        info.container = obj
        opt = obj.get("optimizer")
        if isinstance(opt, dict) and isinstance(opt.get("state"), dict):
            info.optimizer = opt
    sd = _tensors_of(obj, path, info)
    info.files[path.name] = list(sd)
    meta = {k: (tuple(t.shape), t.dtype, path.name) for k, t in sd.items()}
    return Checkpoint(info, meta, sd)


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _tensors_of(obj, path: Path, info: CheckpointInfo) -> dict[str, torch.Tensor]:
    sd = obj[info.state_key] if info.state_key else obj
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    inert = placeholders_in(obj)
    info.inert += [n for n in inert if n not in info.inert]
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    others = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not tensors:
        top = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: found no tensors (top-level keys: {top}); expected a state dict, "
                              f"an mmengine dict with 'state_dict' or a DeepSpeed dict with 'module'")
    if others:
        info.notes.append(f"{path.name}: skipped {len(others)} non-tensor entr{'y' if len(others) == 1 else 'ies'} "
                          f"in the state dict (first: {others[0]!r})")
    return tensors


# -- DeepSpeed ---------------------------------------------------------------------------------------

def _open_deepspeed(folder: Path, info: CheckpointInfo) -> Checkpoint:
    info.format, info.root = "deepspeed", folder
    from .deepspeed import model_state_files

    model_file = model_state_files(folder)[0]
    obj = safe_load(model_file)
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        raise CheckpointError(f"{model_file}: expected a dict with 'module' (DeepSpeed model states)")
    module = obj["module"]
    zero_shards = sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"))
    partitioned = not module or any(isinstance(v, torch.Tensor) and v.numel() == 0 for v in module.values())
    if partitioned and zero_shards:
        return _consolidate_zero(folder, info, zero_shards)
    info.container, info.state_key = obj, "module"
    sd = _tensors_of(obj, model_file, info)
    rel = model_file.name
    info.files[rel] = list(sd)
    if zero_shards:
        info.notes.append(f"{folder.name}: weights read from {rel}; its {len(zero_shards)} ZeRO optimizer shard(s) "
                          f"are read only by convert (ZeRO-1/2 partitions remapped)")
    return Checkpoint(info, {k: (tuple(t.shape), t.dtype, rel) for k, t in sd.items()}, sd)


def _consolidate_zero(folder: Path, info: CheckpointInfo, shards) -> Checkpoint:
    from .deepspeed import NotRepresentable, consolidate

    try:
        sd, stage, world = consolidate(folder)
    except NotRepresentable as e:
        raise CheckpointError(f"{folder}: ZeRO partitions that do not add up ({e}); consolidate them with "
                              f"DeepSpeed's zero_to_fp32.py in an environment you trust, then convert the result") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder}: malformed ZeRO partitions ({type(e).__name__}: {e})"[:300]) from None
    info.notes.append(f"{folder.name}: ZeRO-{stage} partitions of {world} rank(s) consolidated to fp32 as DeepSpeed's "
                      f"zero_to_fp32 does, read with the restricted unpickler (nothing from the files ran)")
    rel = "consolidated"
    info.files[rel] = list(sd)
    return Checkpoint(info, {k: (tuple(t.shape), t.dtype, rel) for k, t in sd.items()}, sd)


__all__ = ["Checkpoint", "CheckpointError", "CheckpointInfo", "UnsafeCheckpointError", "open_checkpoint",
           "read_state_dict", "safe_load"]
