"""Streaming on-disk conversion of a checkpoint to another vocabulary.

Vocabulary-shaped tensors are read and written in row chunks (``stream.py``). Shards that hold none
are hard-linked (or copied) into the output; shards that hold some are rewritten with every other
tensor copied byte for byte (in the kernel where possible). The output folder is built in a temporary sibling and renamed into place; the source
is only ever read.

Outputs: HF folders and PEFT adapter folders keep their layout (file names, sharding, index,
``.bin`` stays ``.bin``). Single files, mmengine ``iter_N.pth`` and DeepSpeed folders become an HF
safetensors file (``model.safetensors``) plus, when the source had one, the remapped optimizer state
(``optimizer.pt``, loadable with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hf import config_rows, set_config_rows
from ..io import atomic_folder
from ..manifest import FILENAME as MANIFEST_FILE
from ..manifest import Manifest
from ..vocab import fingerprint
from .readers import Checkpoint, CheckpointError, open_checkpoint
from .optim import remap_optimizer_state
from .remap import (RemapError, RemapReport, _is_tied, build_row_map, check_explained, classify, infer_rows,
                    remap_state_dict, remap_tensor)
from .sources import SourceVocabError, resolve_source_vocab
from .safetensors import SafetensorsFile
from .stream import FileRows, streamable, write_remapped
from .stwriter import DTYPE_NAMES, Entry, copy_entry, tensor_entry, write_safetensors

TOKENIZER_OUT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "processor_config.json", "preprocessor_config.json", "tekken.json")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Target:
    folder: Path | None
    vocab: list
    rows: int | None
    tokenizer: object | None
    manifest: Manifest | None
    config: dict | None
    built: bool = False  # the tokenizer was built here (base + manifest tokens) and must be saved


def load_target(target, source_vocab_hint=None) -> Target:
    """A folder with a tokenizer (and maybe config.json / tokengraft.json)."""
    from ..vocab import vocab_of
    from .sources import load_tokenizer

    p = Path(target)
    if p.is_file() and p.suffix == ".json":
        return Target(None, None, None, None, Manifest.load(p), None)
    if p.is_dir() and (p / MANIFEST_FILE).is_file() and not any((p / f).is_file() for f in TOKENIZER_OUT[:5]):
        return Target(None, None, None, None, Manifest.load(p), None)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: target folder not found (expected a folder with a tokenizer)")
    try:
        tok = load_tokenizer(p)
    except SourceVocabError as e:
        raise CheckpointError(f"target {e}; the target must be a folder with tokenizer files") from None
    config = None
    if (p / "config.json").is_file():
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    manifest = Manifest.find(p)
    rows = config_rows(config) or (manifest.rows if manifest else None)
    return Target(p, vocab_of(tok), rows, tok, manifest, config)


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
        return "copied"


def convert(checkpoint, target, out, *, source_tokenizer=None, source_tokens=None, init: str = "auto",
            overwrite: bool = False, safetensors: bool = False, log=print) -> RemapReport:
    """Convert ``checkpoint`` to the vocabulary of ``target`` (a folder with a tokenizer, or a
    tokengraft.json), writing ``out``. ``safetensors``: write ``.bin`` shards as safetensors."""
    src = Path(checkpoint)
    out = Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise CheckpointError(f"{out}: the output must not be the source or inside it")
    ck = open_checkpoint(src)
    info = ck.info
    tgt = load_target(target)
    if tgt.vocab is None:
        _target_from_manifest(tgt, info, source_tokenizer)
    source_vocab, how = resolve_source_vocab(info, tgt.vocab, target_manifest=tgt.manifest,
                                             source_tokenizer=source_tokenizer, source_tokens=source_tokens)
    shapes = {k: ck.shape(k) for k in ck.keys()}
    rows = infer_rows(shapes)
    if rows is None and info.adapter_config is not None and source_vocab is not None:
        rows = len(source_vocab)  # an adapter with trainable tokens only: no vocabulary-shaped tensor
    if rows is None:
        raise CheckpointError(f"{src}: no embedding or output head found under a known name; nothing to convert")
    row_map = build_row_map(source_vocab, tgt.vocab, rows, tgt.rows)  # an assumption leads the report
    found = {k: classify(k, s, rows) for k, s in shapes.items()}
    if not row_map.is_identity():
        for k, s in shapes.items():
            if found[k] is None:
                check_explained(k, s, rows)
    vocab_keys = [k for k, v in found.items() if v is not None]
    tied = None
    cfg = info.config or tgt.config
    if cfg is not None:
        text = cfg.get("text_config") or cfg
        tied = bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
        if not any(found[k].side == "output" and found[k].kind == "weight" for k in vocab_keys):
            tied = tied or None  # no head saved: decide from the state dict

    streaming = (info.format == "hf-folder" and info.adapter_config is None
                 and all(f.endswith(".safetensors") for f in info.files))
    if streaming:
        # one vocabulary tensor in memory at a time, computed while its shard is being written
        report = RemapReport(row_map)
        tied = _is_tied(found) if tied is None else tied
        new = _LazyRemap(ck, found, row_map, report, init=init, tied=tied, tokenizer=tgt.tokenizer,
                         base_rows=len(source_vocab) if source_vocab is not None else rows)
    else:
        vocab_sd = {k: ck.get(k) for k in vocab_keys}
        new, report = remap_state_dict(vocab_sd, source_vocab, tgt.vocab, init=init, tokenizer=tgt.tokenizer,
                                       row_map=row_map, adapter_config=info.adapter_config, tied=tied)
        del vocab_sd
    report.source_how = how
    report.notes += info.notes
    if info.inert:
        report.notes.append(f"non-tensor objects left inert (never imported or run): {', '.join(info.inert[:6])}")
    if info.optimizer is not None:
        # moments are matched against the full state dict's order, so give it every key (data stays lazy)
        full_shapes = {k: _ShapeOnly(ck.shape(k)) for k in ck.keys()}
        report.optimizer = remap_optimizer_state(info.optimizer, full_shapes, found, row_map, None, report)

    with atomic_folder(out, overwrite=overwrite) as tmp:
        same = info.format in ("hf-folder", "peft") and all(f.endswith((".safetensors", ".bin")) for f in info.files)
        if same and safetensors and any(f.endswith(".bin") for f in info.files):
            _write_bin_as_safetensors(ck, tmp, new, report)
        elif same:
            _write_same_layout(ck, tmp, new, report)
            if report.optimizer is not None:  # a Trainer checkpoint: resume with the moments remapped
                torch.save(report.optimizer, tmp / "optimizer.pt")
        else:
            _write_safetensors_folder(ck, tmp, new, report)
        _write_metadata(info, tgt, tmp, row_map.target_rows, report, src)
    for line in report.lines():
        log(line)
    log(f"wrote {out}")
    return report


def _target_from_manifest(tgt: Target, info, source_tokenizer) -> None:
    """TARGET is a manifest alone: the target tokenizer is the checkpoint's (which must be the
    manifest's base vocabulary) plus the manifest's tokens at their ids."""
    from transformers import AddedToken, AutoTokenizer

    from ..vocab import vocab_of

    m = tgt.manifest
    tokdir = info.tokenizer_dir or (Path(source_tokenizer) if source_tokenizer else None)
    if tokdir is None:
        raise CheckpointError("a manifest as TARGET needs the checkpoint's tokenizer to build the target's: "
                              "pass --source-tokenizer DIR (or use a target folder with a tokenizer)")
    tok = AutoTokenizer.from_pretrained(tokdir)
    base = vocab_of(tok)
    if len(base) != m.base_size or fingerprint(base) != m.base_fingerprint:
        raise CheckpointError(f"{tokdir}: its vocabulary ({len(base)} tokens) is not the base the manifest was made "
                              f"on ({m.base_size} tokens, {m.base_fingerprint}); pass the target folder instead")
    for t in sorted(m.tokens, key=lambda t: t.id):
        tok.add_tokens([AddedToken(t.content, special=t.special, normalized=False)], special_tokens=t.special)
        if tok.convert_tokens_to_ids(t.content) != t.id:
            raise CheckpointError(f"manifest token {t.content!r} should have id {t.id} but lands at "
                                  f"{tok.convert_tokens_to_ids(t.content)}; the manifest has gaps tokengraft cannot rebuild")
    tgt.vocab, tgt.tokenizer, tgt.rows, tgt.built = vocab_of(tok), tok, m.rows, True


class _LazyRemap:
    """Vocabulary tensors remapped on demand, streamed from the source file to the output when their
    vocabulary dimension comes first (nothing kept, memory bounded by a few row chunks)."""

    def __init__(self, ck: Checkpoint, found: dict, rm, report: RemapReport, **kw):
        self.ck, self.rm, self.report, self.kw = ck, rm, report, kw
        self.vts = {k: v for k, v in found.items() if v is not None}
        self.gen = torch.Generator().manual_seed(0)

    def __contains__(self, k):
        return k in self.vts

    def __iter__(self):
        return iter(self.vts)

    def shape(self, k) -> tuple[int, ...]:
        s = list(self.ck.shape(k))
        s[self.vts[k].dim] = self.rm.target_rows
        return tuple(s)

    def __getitem__(self, k) -> torch.Tensor:
        return remap_tensor(self.ck.get(k), self.vts[k], self.rm, self.report, gen=self.gen, **self.kw)

    def write(self, k, fh) -> None:
        vt = self.vts[k]
        if not streamable(vt, self.ck.shape(k)):
            tensor_entry(k, self[k]).write(fh)
            return
        with SafetensorsFile(self.ck.info.root / self.ck.file_of(k)) as st:
            write_remapped(fh, FileRows(st, k), vt, self.rm, self.report, gen=self.gen, **self.kw)


class _ShapeOnly:
    """Stands in for a tensor when only its shape matters (optimizer matching by order and shape)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


def _write_same_layout(ck: Checkpoint, tmp: Path, new: dict, report: RemapReport) -> None:
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
            total = sum(_nbytes(ck, k, new) for k in ck.keys())
            data.setdefault("metadata", {})["total_size"] = total
            (tmp / idx).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if report.adapter_config is not None:
        (tmp / "adapter_config.json").write_text(json.dumps(report.adapter_config, indent=2) + "\n", encoding="utf-8")


def _new_shape(k: str, new, ck: Checkpoint) -> tuple[int, ...]:
    if k not in new:
        return ck.shape(k)
    return new.shape(k) if isinstance(new, _LazyRemap) else tuple(new[k].shape)


def _nbytes(ck: Checkpoint, k: str, new) -> int:
    n = 1
    for d in _new_shape(k, new, ck):
        n *= d
    return n * torch.empty((), dtype=ck.dtype(k)).element_size()


def _new_entry(k: str, new, ck: Checkpoint) -> Entry:
    """A safetensors entry whose tensor is computed only when the writer reaches it."""
    if not isinstance(new, _LazyRemap):
        return tensor_entry(k, new[k])
    shape = new.shape(k)

    def write(fh):
        new.write(k, fh)
    return Entry(k, DTYPE_NAMES[ck.dtype(k)], shape, _nbytes(ck, k, new), write)


def _safetensors_name(f: str) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors (HF's own naming)."""
    stem = f[: -len(".bin")]
    stem = "model" + stem[len("pytorch_model"):] if stem.startswith("pytorch_model") else stem
    return stem + ".safetensors"


def _write_bin_as_safetensors(ck: Checkpoint, tmp: Path, new, report: RemapReport) -> None:
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


def _write_safetensors_folder(ck: Checkpoint, tmp: Path, new: dict, report: RemapReport) -> None:
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


def _write_metadata(info, tgt: Target, tmp: Path, rows: int, report: RemapReport, src: Path) -> None:
    # the source's other files (config, generation config, README...) come along; weights and
    # tokenizer files do not (the target's tokenizer replaces the source's)
    # (a Trainer's scheduler.pt, rng_state.pth, trainer_state.json travel as they are: never loaded)
    if info.format in ("hf-folder", "peft"):
        skip = set(info.files) | set(INDEX_FILES) | set(TOKENIZER_OUT) | {MANIFEST_FILE, "adapter_config.json"}
        for p in sorted(info.path.iterdir()):
            if p.is_file() and p.name not in skip and not (tmp / p.name).exists():
                shutil.copy2(p, tmp / p.name)
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
    m = tgt.manifest
    if m is None:
        tied = any(r["side"] == "output" and r["kind"] == "weight" for r in report.remapped) is False
        m = Manifest(base_fingerprint=fingerprint(tgt.vocab), base_size=len(tgt.vocab), rows=rows, tied=tied)
        m.vocab_fingerprint = fingerprint(tgt.vocab)
    m.rows = rows
    s = report.row_map.summary()
    m.record("convert", source=str(src), source_vocabulary=report.source_how, assumed=report.assumed,
             rows_before=s["source_rows"], rows_after=s["target_rows"], kept=s["kept"], moved=s["moved"],
             new=s["new"], dropped=s["dropped"], remapped=[r["key"] for r in report.remapped], init=report.init)
    m.save(tmp)


__all__ = ["convert", "load_target", "CheckpointError", "RemapError", "SourceVocabError"]
