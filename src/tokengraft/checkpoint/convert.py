"""Streaming on-disk conversion of a checkpoint to another vocabulary.

Vocabulary-shaped tensors are read and written in row chunks (``stream.py``). Shards that hold none
are hard-linked (or copied) into the output; shards that hold some are rewritten with every other
tensor copied byte for byte (in the kernel where possible). The output folder is built in a temporary sibling and renamed into place; the source
is only ever read.

Same format in, same format out: HF folders and PEFT adapter folders keep their layout (file names,
sharding, index, ``.bin`` stays ``.bin``); a pickled file (mmengine/XTuner ``iter_N.pth``, a
``.pt``/``.bin`` state dict) is written back as one file of the same structure, and a DeepSpeed
folder stays a DeepSpeed folder (``pickled.py``). A single ``.safetensors`` file becomes a folder
with ``model.safetensors`` and the target's tokenizer and manifest.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..hf import IMAGE_TOKEN_KEYS, TEXT_CONFIG_KEYS
from ..outdir import atomic_folder, check_file_output
from .errors import CheckpointError, RemapError
from .layout import check_explained, classify, identical_pairs, infer_rows, tied_by_layout
from .optim import remap_optimizer_state
from .pickled import is_deepspeed_folder, is_pickle_file, write_deepspeed_folder, write_pickle_file
from .readers import open_checkpoint
from .remap import build_row_map, remap_state_dict
from .report import RemapReport
from .sources import SourceVocabError, resolve_source_vocab
from .stream import LazyRemap
from .target import load_target, target_from_manifest
from .writers import write_bin_as_safetensors, write_metadata, write_safetensors_folder, write_same_layout

# pickle containers whose dict order is the save order, so optimizer moments match parameters by order
ORDERED_FORMATS = ("mmengine", "deepspeed", "torch")


class _ShapeOnly:
    """Stands in for a tensor when only its shape matters (optimizer matching by order and shape)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


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
        target_from_manifest(tgt, info, source_tokenizer)
    source_vocab, how = resolve_source_vocab(info, tgt.vocab, target_manifest=tgt.manifest,
                                             source_tokenizer=source_tokenizer, source_tokens=source_tokens)
    shapes = {k: ck.shape(k) for k in ck.keys()}
    rows = infer_rows(shapes)
    if rows is None and info.adapter_config is not None and source_vocab is not None:
        rows = len(source_vocab)  # an adapter with trainable tokens only: no vocabulary-shaped tensor
    if rows is None:
        raise CheckpointError(f"{src}: no embedding or output head found under a known name; nothing to convert")
    if source_vocab is None:
        _check_rows_explained(src, shapes, rows, tgt)
    row_map = build_row_map(source_vocab, tgt.vocab, rows, tgt.rows)  # an assumption leads the report
    _check_image_token(src, info.config, source_vocab, row_map)
    found = {k: classify(k, s, rows) for k, s in shapes.items()}
    if not row_map.is_identity():
        for k, s in shapes.items():
            if found[k] is None:
                check_explained(k, s, rows)
    vocab_keys = [k for k, v in found.items() if v is not None]
    # Tied: one matrix is both the embedding and the head. Seen as two keys holding bit-identical
    # tensors (XTuner saves a tied LLM's embed_tokens and lm_head both), a config that says so
    # (the source's or the target's), or no head saved at all. Then both keys get one row per token.
    pairs = identical_pairs(found, ck.equal)
    tied = bool(pairs) or _config_tied(info.config) or _config_tied(tgt.config) or tied_by_layout(found)

    streaming = (info.format == "hf-folder" and info.adapter_config is None
                 and all(f.endswith(".safetensors") for f in info.files))
    if streaming:
        # one vocabulary tensor in memory at a time, computed while its shard is being written
        report = RemapReport(row_map)
        new = LazyRemap(ck, found, row_map, report, init=init, tied=tied, tokenizer=tgt.tokenizer,
                         base_rows=len(source_vocab) if source_vocab is not None else rows)
    else:
        vocab_sd = {k: ck.get(k) for k in vocab_keys}
        new, report = remap_state_dict(vocab_sd, source_vocab, tgt.vocab, init=init, tokenizer=tgt.tokenizer,
                                       row_map=row_map, adapter_config=info.adapter_config, tied=tied)
        del vocab_sd
    report.source_how, report.tied = how, tied
    if pairs:
        report.notes.append("tied: " + ", ".join(f"{a} and {b}" for a, b in pairs) + " hold identical tensors; "
                            "one row per new token written to both")
    report.notes += info.notes
    if info.inert:
        report.notes.append(f"non-tensor objects left inert (never imported or run): {', '.join(info.inert[:6])}")
    if info.optimizer is not None:
        # moments are matched against the full state dict's order, so give it every key (data stays lazy)
        full_shapes = {k: _ShapeOnly(ck.shape(k)) for k in ck.keys()}
        report.optimizer = remap_optimizer_state(info.optimizer, full_shapes, found, row_map, None, report,
                                                 ordered=info.format in ORDERED_FORMATS,
                                                 skip=[b for _, b in pairs])

    if is_pickle_file(ck):  # same format out: one file of the same structure
        check_file_output(out, {"CHECKPOINT": src, "TARGET": target, "--source-tokenizer": source_tokenizer})
        write_pickle_file(ck, new, report, out)
    else:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            same = info.format in ("hf-folder", "peft") and all(f.endswith((".safetensors", ".bin"))
                                                                for f in info.files)
            if is_deepspeed_folder(ck):
                write_deepspeed_folder(ck, new, report, tmp, row_map,
                                       {k: v.dim for k, v in found.items() if v is not None})
            elif same and safetensors and any(f.endswith(".bin") for f in info.files):
                write_bin_as_safetensors(ck, tmp, new, report)
            elif same:
                write_same_layout(ck, tmp, new, report)
                if report.optimizer is not None:  # a Trainer checkpoint: resume with the moments remapped
                    torch.save(report.optimizer, tmp / "optimizer.pt")
            else:
                write_safetensors_folder(ck, tmp, new, report)
            write_metadata(info, tgt, tmp, row_map.target_rows, report, src)
    for line in report.lines():
        log(line)
    log(f"wrote {out}")
    return report


def _config_tied(cfg: dict | None) -> bool:
    if not cfg:
        return False
    subs = [cfg[k] for k in TEXT_CONFIG_KEYS if isinstance(cfg.get(k), dict)]
    flags = [c["tie_word_embeddings"] for c in subs if "tie_word_embeddings" in c]
    return bool(flags[0] if flags else cfg.get("tie_word_embeddings", False))


def _check_rows_explained(src: Path, shapes: dict, rows: int, tgt) -> None:
    """Rows mapped by index must at least cover the target's base vocabulary: a matrix with fewer
    rows is not the vocabulary matrix of a model of that tokenizer (it would be "padded" with
    thousands of invented rows)."""
    base = tgt.base_size()
    if base is not None and rows < base:
        key = next(k for k, s in shapes.items() if rows in s)
        raise CheckpointError(f"{src}: {key} {tuple(shapes[key])} has {rows} rows, fewer than the {base}-token base "
                              f"vocabulary of the target; it is not vocabulary-shaped for this tokenizer. Pass "
                              f"--source-tokenizer if the checkpoint has another vocabulary")


def _check_image_token(src: Path, cfg: dict | None, source_vocab, row_map) -> None:
    """A LLaVA's image placeholder must survive: dropping it would hand its id to another token."""
    if not cfg or source_vocab is None:
        return
    for key in IMAGE_TOKEN_KEYS:
        i = cfg.get(key)
        if isinstance(i, int) and i in row_map.dropped:
            tok = row_map.dropped[i] or source_vocab[i]
            raise RemapError(f"{src}: the image token {tok!r} (id {i}, {key} in config.json) is not in the target "
                             f"vocabulary; converting would drop it and give its id to another token. Add {tok!r} "
                             f"to the target tokenizer first")


__all__ = ["convert", "load_target", "CheckpointError", "RemapError", "SourceVocabError"]
