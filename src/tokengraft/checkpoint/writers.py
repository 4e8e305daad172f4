"""Writing a converted checkpoint: the same layout as the source (file names, sharding, index,
``.bin`` stays ``.bin``), ``.bin`` shards as safetensors, or one ``model.safetensors``; then the
metadata (config rows, the target's tokenizer files, tokengraft.json). Vocabulary tensors come
from ``new`` (a dict, or a :class:`~.stream.LazyRemap` that streams them); every other tensor is
linked, or copied byte for byte."""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch

from ..hf import set_config_rows
from ..manifest import FILENAME as MANIFEST_FILE
from ..manifest import Manifest
from ..portable import make_portable
from ..vocab import fingerprint
from .errors import CheckpointError
from .readers import Checkpoint
from .repickle import copy_inert
from .weight_files import INDEX_FILES
from .report import RemapReport
from .safetensors import SafetensorsFile
from .stream import LazyRemap
from .stwriter import DTYPE_NAMES, Entry, copy_entry, tensor_entry, write_safetensors
from .target import TOKENIZER_OUT, Target



def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
        return "copied"


def write_same_layout(ck: Checkpoint, tmp: Path, new: dict, report: RemapReport) -> None:
    info = ck.info
    dirty = {ck.file_of(k) for k in new}
    for f, keys in info.files.items():
        dst = tmp / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f not in dirty:
            report.notes.append(f"{f}: {_link_or_copy(info.root / f, dst)} (no vocabulary tensor)")
            continue
        if f.endswith(".safetensors"):
            with SafetensorsFile(info.root / f) as st:
                order = sorted(keys, key=lambda k: st.span(k)[0])
                entries = [_new_entry(k, new, ck) if k in new else copy_entry(k, st) for k in order]
                write_safetensors(dst, entries, st.metadata)
        else:  # a .bin shard: same format out (plain tensors only, loadable with weights_only=True)
            sd = ck.read_file(f)
            torch.save({k: (new[k] if k in new else v).clone() for k, v in sd.items()}, dst)
        report.notes.append(f"{f}: rewritten ({sum(1 for k in keys if k in new)} vocabulary tensor(s))")
    for idx in INDEX_FILES:
        if (info.root / idx).is_file():
            data = json.loads((info.root / idx).read_text(encoding="utf-8"))
            if not set(data.get("weight_map", {}).values()) <= set(info.files):
                continue  # an index left beside the single file transformers (and the reader) loads
            total = sum(_nbytes(ck, k, new) for k in ck.keys())
            data.setdefault("metadata", {})["total_size"] = total
            (tmp / idx).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if report.adapter_config is not None:
        (tmp / "adapter_config.json").write_text(json.dumps(report.adapter_config, indent=2) + "\n", encoding="utf-8")


def _new_shape(k: str, new, ck: Checkpoint) -> tuple[int, ...]:
    if k not in new:
        return ck.shape(k)
    return new.shape(k) if isinstance(new, LazyRemap) else tuple(new[k].shape)


def _nbytes(ck: Checkpoint, k: str, new) -> int:
    n = 1
    for d in _new_shape(k, new, ck):
        n *= d
    return n * torch.empty((), dtype=ck.dtype(k)).element_size()


def _new_entry(k: str, new, ck: Checkpoint) -> Entry:
    """A safetensors entry whose tensor is computed only when the writer reaches it."""
    if not isinstance(new, LazyRemap):
        return tensor_entry(k, new[k])
    # new.write itself is the callback: the writer calls the remap directly (no hop back through here)
    return Entry(k, DTYPE_NAMES[ck.dtype(k)], new.shape(k), _nbytes(ck, k, new), functools.partial(new.write, k))


def _safetensors_name(f: str) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors (HF's own naming)."""
    stem = f[: -len(".bin")]
    stem = "model" + stem[len("pytorch_model"):] if stem.startswith("pytorch_model") else stem
    return stem + ".safetensors"


def write_bin_as_safetensors(ck: Checkpoint, tmp: Path, new, report: RemapReport) -> None:
    """An HF folder of .bin shards written as safetensors shards, sharded the same way."""
    names = {f: _safetensors_name(f) for f in ck.info.files}
    for f, keys in ck.info.files.items():
        entries = []
        for k in keys:
            if k in new:
                entries.append(_new_entry(k, new, ck))
            else:
                entries.append(tensor_entry(k, ck.get(k)))
        write_safetensors(tmp / names[f], entries, {"format": "pt"})
    idx = ck.info.root / "pytorch_model.bin.index.json"
    if idx.is_file():
        data = json.loads(idx.read_text(encoding="utf-8"))
        data["weight_map"] = {k: names[v] for k, v in data["weight_map"].items()}
        data.setdefault("metadata", {})["total_size"] = sum(_nbytes(ck, k, new) for k in ck.keys())
        (tmp / "model.safetensors.index.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if report.adapter_config is not None:
        (tmp / "adapter_config.json").write_text(json.dumps(report.adapter_config, indent=2) + "\n", encoding="utf-8")
    report.notes.append(f".bin shards written as safetensors: {', '.join(names.values())}")


def write_safetensors_folder(ck: Checkpoint, tmp: Path, new: dict, report: RemapReport) -> None:
    """Any other source: one HF safetensors file, written one tensor at a time."""
    entries = []
    for k in ck.keys():
        if k in new:
            entries.append(_new_entry(k, new, ck))
            continue
        if ck.dtype(k) not in DTYPE_NAMES:
            raise CheckpointError(f"{ck.info.path}: tensor {k!r} has dtype {ck.dtype(k)}, which safetensors cannot store")

        def write(fh, k=k):  # read when the writer reaches it: one tensor in memory at a time
            tensor_entry(k, ck.get(k)).write(fh)
        entries.append(Entry(k, DTYPE_NAMES[ck.dtype(k)], ck.shape(k), _nbytes(ck, k, {}), write))
    write_safetensors(tmp / "model.safetensors", entries, {"format": "pt"})
    report.notes.append(f"{ck.info.format} source written as model.safetensors ({len(entries)} tensors)")
    if report.optimizer is not None:
        torch.save(report.optimizer, tmp / "optimizer.pt")
        report.notes.append("optimizer state (remapped moments) written as optimizer.pt")
    if ck.info.adapter_config is not None or report.adapter_config is not None:
        (tmp / "adapter_config.json").write_text(json.dumps(report.adapter_config or ck.info.adapter_config,
                                                            indent=2) + "\n", encoding="utf-8")


def write_metadata(info, tgt: Target, tmp: Path, rows: int, report: RemapReport, src: Path) -> None:
    # the source's other files (config, generation config, README...) come along; weights and
    # tokenizer files do not (the target's tokenizer replaces the source's)
    # (a Trainer's scheduler.pt, rng_state.pth, trainer_state.json travel as they are: never loaded)
    if info.format in ("hf-folder", "peft"):
        skip = set(info.files) | set(INDEX_FILES) | set(TOKENIZER_OUT) | {MANIFEST_FILE, "adapter_config.json"}
        for p in sorted(info.path.iterdir()):
            if p.is_file() and p.name not in skip and not (tmp / p.name).exists():
                note = copy_inert(p, tmp / p.name)  # a pickle naming a non-inert global is left out
                if note:
                    report.notes.append(note)
    if (tmp / "config.json").is_file():
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        (tmp / "config.json").write_text(json.dumps(set_config_rows(cfg, rows, tgt.config), indent=2) + "\n",
                                         encoding="utf-8")
    # the target's tokenizer files, and its generation config (its token ids are the target's)
    if tgt.built:
        tgt.tokenizer.save_pretrained(tmp)
    for name in TOKENIZER_OUT + ("generation_config.json",):
        if tgt.folder is not None and (tgt.folder / name).is_file():
            shutil.copy2(tgt.folder / name, tmp / name)
    make_portable(tmp)  # the config and tokenizer files as every supported transformers reads them
    m = tgt.manifest
    if m is None:
        m = Manifest(base_fingerprint=fingerprint(tgt.vocab), base_size=len(tgt.vocab), rows=rows,
                     tied=bool(report.tied))
        m.vocab_fingerprint = fingerprint(tgt.vocab)
    m.rows = rows
    s = report.row_map.summary()
    m.record("convert", source=str(src), source_vocabulary=report.source_how, assumed=report.assumed,
             rows_before=s["source_rows"], rows_after=s["target_rows"], kept=s["kept"], moved=s["moved"],
             new=s["new"], dropped=s["dropped"], remapped=[r["key"] for r in report.remapped], init=report.init)
    m.save(tmp)
