"""Remap every vocabulary-shaped tensor of a state dict from one vocabulary to another, in memory.

Which tensors depend on the vocabulary is :mod:`.layout`'s rule; each is gathered through a
:class:`~tokengraft.vocab.RowMap` along its vocabulary dimension; rows new to the target get values
from :mod:`.newrows` (the strategies of :mod:`tokengraft.init`); optimizer moments follow
(:mod:`.optim`); what happened goes into a :class:`~.report.RemapReport`.

Pure torch: importable inside any trainer.
"""
from __future__ import annotations

import copy

import torch

from .. import init as I
from ..vocab import NEW, RowMap
from .errors import RemapError
from .layout import (INPUT_NAMES, OUTPUT_NAMES, VocabTensor, check_explained, classify, has_trainable_tokens,
                     infer_rows, tied_by_layout)
from .newrows import Rows, new_rows
from .optim import remap_optimizer_state
from .report import RemapReport, record

# -- remap -----------------------------------------------------------------------------------------

def build_row_map(source_vocab, target_vocab, source_rows: int, target_rows: int | None,
                  assumed: str | None = None) -> RowMap:
    if target_rows is None:
        target_rows = len(target_vocab) if target_vocab is not None else source_rows
        if source_vocab is not None and target_vocab is not None and source_rows > len(source_vocab):
            target_rows = max(target_rows, source_rows)  # the source was padded: rows never shrink
    if source_vocab is None or target_vocab is None:
        why = assumed or (f"no source vocabulary: rows mapped BY INDEX (row i of the checkpoint -> id i of the "
                          f"target); rows {source_rows} -> {target_rows}. Pass the source tokenizer or "
                          f"--source-tokens if tokens were added in another order")
        return RowMap.by_index(source_rows, target_rows, why)
    if len(source_vocab) > source_rows:
        raise RemapError(f"the source vocabulary has {len(source_vocab)} tokens but the checkpoint only "
                         f"{source_rows} rows; is it the right tokenizer for this checkpoint?")
    if len(target_vocab) > target_rows:
        raise RemapError(f"the target vocabulary has {len(target_vocab)} tokens but only {target_rows} rows")
    return RowMap.by_identity(source_vocab, target_vocab, source_rows, target_rows)


def remap_state_dict(state_dict: dict, source_vocab, target_vocab, *, source_rows: int | None = None,
                     target_rows: int | None = None, init: str = "auto", tokenizer=None,
                     row_map: RowMap | None = None, adapter_config: dict | None = None,
                     optimizer: dict | None = None, param_names: list[str] | None = None,
                     tied: bool | None = None, seed: int = 0) -> tuple[dict, RemapReport]:
    """Remap every vocabulary-shaped tensor of ``state_dict`` from ``source_vocab`` to ``target_vocab``
    (lists of token strings, ``None`` for unused ids). Other tensors are passed through untouched.

    ``source_vocab=None`` maps rows by index and says so in ``report.assumed``. ``tokenizer``: the
    target tokenizer, for semantic (subword) input rows. ``adapter_config``: a PEFT config whose
    ``trainable_token_indices`` are rewritten (``report.adapter_config``). ``optimizer``: a torch
    optimizer state dict whose ``exp_avg``/``exp_avg_sq`` are remapped too (``report.optimizer``);
    its parameters are matched to ``param_names`` (or, without them, to the state dict's tensors by
    order and shape)."""
    if init not in I.FOR_CHECKPOINT:
        raise RemapError(f"init {init!r} is not one of {', '.join(I.FOR_CHECKPOINT)}")
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    rows = source_rows or (row_map.source_rows if row_map else None) or infer_rows(shapes)
    if rows is None:
        rows = len(source_vocab) if source_vocab is not None else None
    if rows is None and not has_trainable_tokens(shapes):
        raise RemapError("no vocabulary-shaped tensor found (no embedding or head under a known name) and no "
                         "source rows given; nothing to remap")
    if row_map is None:
        if rows is None:
            rows = len(source_vocab)
        row_map = build_row_map(source_vocab, target_vocab, rows, target_rows)
    rm = row_map
    report = RemapReport(rm)
    base_rows = len(source_vocab) if source_vocab is not None else rm.source_rows
    gen = torch.Generator().manual_seed(seed)

    found = {k: classify(k, s, rm.source_rows) for k, s in shapes.items()}
    tied = tied_by_layout(found) if tied is None else tied
    out: dict = {}
    identity = rm.is_identity()
    for k, v in state_dict.items():
        vt = found.get(k)
        if vt is None:
            if isinstance(v, torch.Tensor) and not identity:
                check_explained(k, tuple(v.shape), rm.source_rows)
            out[k] = v
            report.untouched += isinstance(v, torch.Tensor)
            continue
        if vt.kind == "trainable_tokens":
            out[k] = v  # handled with the adapter config below
            continue
        out[k] = remap_tensor(v, vt, rm, report, init=init, tied=tied, tokenizer=tokenizer,
                              base_rows=base_rows, gen=gen)

    if adapter_config is not None or has_trainable_tokens(shapes):
        out, report.adapter_config = _remap_trainable_tokens(out, found, rm, adapter_config, report)
    report.tied = tied
    if optimizer is not None:
        report.optimizer = remap_optimizer_state(optimizer, state_dict, found, rm, param_names, report,
                                                 ordered=True)
    return out, report


def remap_tensor(v: torch.Tensor, vt: VocabTensor, rm: RowMap, report: RemapReport, *, init: str = "auto",
                 tied: bool = False, tokenizer=None, base_rows: int | None = None,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """One vocabulary-shaped tensor in the target layout, new rows initialized; recorded in ``report``."""
    if not v.is_floating_point():
        raise RemapError(f"tensor {vt.key!r} is vocabulary-shaped but has dtype {v.dtype}; expected a float tensor")
    base_rows = rm.source_rows if base_rows is None else base_rows
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    if tied:  # one matrix: both keys must get the same rows, random strategies included
        gen = torch.Generator().manual_seed(gen.initial_seed())
    fill, names = new_rows(Rows(v.movedim(vt.dim, 0)), vt, rm, init, tied, tokenizer, base_rows, gen)
    out = rm.apply(v, vt.dim, fill if fill.numel() else None)
    record(report, vt, rm, names, tied, v.shape, out.shape)
    return out


def _remap_trainable_tokens(sd: dict, found: dict, rm: RowMap, adapter_config: dict | None,
                            report: RemapReport) -> tuple[dict, dict | None]:
    """PEFT trainable tokens: the delta's rows belong to the ids listed in adapter_config.json. Move
    the ids with their tokens; drop rows of dropped tokens."""
    keys = [k for k in sd if "trainable_tokens_delta" in k]
    if not keys:
        return sd, adapter_config
    if adapter_config is None or adapter_config.get("trainable_token_indices") is None:
        raise RemapError("the adapter has trainable-token rows but no adapter_config.json with "
                         "'trainable_token_indices'; the ids of those rows are unknown")
    cfg = copy.deepcopy(adapter_config)
    spec = cfg["trainable_token_indices"]
    target_of = {s: t for t, s in enumerate(rm.source) if s != NEW}
    new_spec = {} if isinstance(spec, dict) else None

    def moved_ids(ids):
        keep = [(i, target_of[s]) for i, s in enumerate(ids) if s in target_of]
        return [i for i, _ in keep], [t for _, t in keep]

    for k in keys:
        module = k.split(".token_adapter")[0].split(".")[-1]
        ids = spec.get(module) if isinstance(spec, dict) else spec
        if ids is None:
            raise RemapError(f"{k}: no trainable_token_indices entry for module {module!r} in adapter_config.json")
        if len(ids) != sd[k].shape[0]:
            raise RemapError(f"{k}: {sd[k].shape[0]} rows but adapter_config.json lists {len(ids)} ids for {module!r}")
        rows, new_ids = moved_ids(ids)
        lost = [s for s in ids if s not in target_of]
        if lost:
            report.notes.append(f"{module}: trainable-token rows of dropped ids {lost} removed")
        sd[k] = sd[k][rows].contiguous()
        if new_spec is not None:
            new_spec[module] = new_ids
        else:
            new_spec = new_ids
        report.remapped.append({"key": k, "kind": "trainable_tokens", "side": "input" if module in INPUT_NAMES
                                else "output", "dim": 0, "before": list(ids), "after": new_ids})
    if isinstance(spec, dict):
        for m, ids in spec.items():  # modules without a saved delta (e.g. tied lm_head): move ids too
            new_spec.setdefault(m, moved_ids(ids)[1])
    cfg["trainable_token_indices"] = new_spec
    return sd, cfg


__all__ = ["build_row_map", "remap_state_dict", "remap_tensor", "RemapError", "RemapReport", "VocabTensor",
           "classify", "infer_rows", "check_explained", "INPUT_NAMES", "OUTPUT_NAMES"]
