"""Optimizer moments across a vocabulary change, so training resumes where it stopped."""
from __future__ import annotations

import copy

import torch

from ..vocab import RowMap
from .remap import RemapError, RemapReport, VocabTensor, gather


def remap_optimizer_state(optimizer: dict, state_dict: dict, found: dict, rm: RowMap,
                          param_names: list[str] | None, report: RemapReport) -> dict:
    """Remap ``exp_avg``/``exp_avg_sq`` (and any other per-row state) of vocabulary-shaped parameters.

    Optimizer state is keyed by parameter index. An index is matched to its parameter by name when
    names are known (``param_names``, or the ``param_names`` torch stores in ``param_groups``), else
    by shape: a moment shaped like a vocabulary tensor belongs to one. Two vocabulary tensors of the
    same shape (an untied embedding and head) share the vocabulary dimension, so their moments are
    remapped identically whichever is meant. Shared rows keep their moments; rows new to the
    target start at zero, as a fresh parameter's would."""
    opt = {**optimizer, "state": dict(optimizer.get("state", {})),
           "param_groups": copy.deepcopy(optimizer.get("param_groups", []))}
    if param_names is None and all("param_names" in g for g in opt["param_groups"]) and opt["param_groups"]:
        names = {i: n for g in opt["param_groups"] for i, n in zip(g.get("params", []), g["param_names"])}
    else:
        names = dict(enumerate(param_names)) if param_names is not None else {}
    by_shape: dict[tuple, VocabTensor] = {}
    for k, vt in found.items():
        if vt is not None and vt.kind != "trainable_tokens" and k in state_dict:
            by_shape.setdefault(tuple(state_dict[k].shape), vt)
    identity = rm.is_identity()
    for i, st in list(opt["state"].items()):
        if not isinstance(st, dict):
            continue
        shape = next((tuple(v.shape) for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if names:
            key = names.get(i)
            vt = found.get(key) if key in found else None
            if vt is not None and (vt.kind == "trainable_tokens" or tuple(state_dict[key].shape) != shape):
                vt = None
        else:
            vt = by_shape.get(shape)
            key = vt.key if vt is not None else None
        new_st = dict(st)
        for n, v in st.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            if vt is not None and tuple(v.shape) == shape:
                new_st[n] = gather(v.movedim(vt.dim, 0), rm).movedim(0, vt.dim).contiguous()
            elif rm.source_rows in v.shape and not identity:
                raise RemapError(f"optimizer state {i}.{n} {tuple(v.shape)} has a vocabulary-sized dimension but "
                                 f"belongs to no vocabulary-shaped parameter (matched to {key!r}); pass param_names")
        if vt is not None:
            after = next(v.shape for v in new_st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            report.remapped.append({"key": f"optimizer.state.{i} ({key})", "kind": "moment", "side": vt.side,
                                    "dim": vt.dim, "before": list(shape), "after": list(after)})
        opt["state"][i] = new_st
    return opt
