"""Optimizer moments across a vocabulary change, so training resumes where it stopped."""
from __future__ import annotations

import copy

import torch

from ..vocab import RowMap
from .errors import RemapError
from .layout import classify


def _shape(v) -> tuple:
    return tuple(v.shape)


def _param_order(opt: dict) -> list:
    """Optimizer state indices in parameter order: ``param_groups[*]['params']``, group by group."""
    return [i for g in opt.get("param_groups", []) for i in g.get("params", [])]


def _moment_shape(st) -> tuple | None:
    if not isinstance(st, dict):
        return None
    return next((tuple(v.shape) for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)


def _moments_of(st) -> list[tuple[str, tuple]]:
    return [(n, tuple(v.shape)) for n, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0] \
        if isinstance(st, dict) else []


def check_moments(opt: dict, shapes: dict, names: dict, how: str, param_names=None) -> None:
    """Refuse (one line) an optimizer state that contradicts its parameters, instead of writing it
    back unchanged: a state no param group lists, moments of one parameter with different shapes,
    moments matched (by name or order) to a parameter of another shape, moments no parameter of
    the checkpoint could own, or more parameter names than the optimizer has parameters."""
    order = _param_order(opt)
    listed = set(order)
    if len(listed) != len(order):
        raise RemapError(f"optimizer param_groups list a parameter index twice ({order[:12]}...); the state is corrupt")
    if param_names is not None and len(list(param_names)) != len(order):
        raise RemapError(f"optimizer has {len(order)} parameters but {len(list(param_names))} parameter names were "
                         f"given; pass the names of the trainable parameters in optimizer order")
    known = {_shape(v) for v in shapes.values()}
    for i, st in opt.get("state", {}).items():
        if i not in listed:
            raise RemapError(f"optimizer state {i!r} belongs to no param group (groups list {len(order)} parameters); "
                             f"the optimizer state does not match its parameters")
        moments = _moments_of(st)
        if len({s for _, s in moments}) > 1:
            listing = ", ".join(f"{n} {list(s)}" for n, s in moments)
            raise RemapError(f"optimizer state {i}: moments of different shapes ({listing}); they cannot belong "
                             f"to one parameter")
        if not moments:
            continue
        n, shape = moments[0]
        key = names.get(i)
        owner = key.split(" or ")[0] if key else None
        if owner is not None and owner in shapes and _shape(shapes[owner]) != shape:
            raise RemapError(f"optimizer state {i}.{n} {list(shape)} does not match its parameter {owner!r} "
                             f"{list(_shape(shapes[owner]))} (matched {how}); the optimizer belongs to another model "
                             f"or parameter order: convert without it or pass the parameter names")
        if shape not in known:
            raise RemapError(f"optimizer state {i}.{n} {list(shape)} matches the shape of no tensor in the checkpoint; "
                             f"the optimizer state does not belong to these weights")


def match_params(opt: dict, shapes: dict, found: dict, param_names=None, ordered: bool = False,
                 skip=()) -> tuple[dict, str]:
    """{optimizer index: parameter name} and how it was found.

    torch (and mmengine, and DeepSpeed's model states) number a state by the parameter's position
    in ``param_groups[*]['params']``: the order of the trainable parameters, which is the state
    dict's order for a model whose whole state dict is trainable (XTuner saves only what trains).
    So, in order of trust: names the caller or torch recorded; the state dict's keys in order
    (``ordered``: its order is the save order, minus ``skip``: a tied head saved beside its
    embedding is one parameter), checked against every moment's shape; else by shape, where two
    vocabulary tensors of one shape (an untied embedding and head) cannot be told apart."""
    order = _param_order(opt)
    groups = opt.get("param_groups", [])
    if param_names is not None:
        names = list(param_names)
        return {i: names[n] for n, i in enumerate(order) if n < len(names)}, "by the given parameter names"
    if groups and all("param_names" in g for g in groups):
        return {i: n for g in groups for i, n in zip(g.get("params", []), g["param_names"])}, \
            "by the parameter names torch recorded"
    if ordered:
        keys = [k for k in shapes if k not in set(skip)]
        if len(keys) == len(order):
            names = dict(zip(order, keys))
            agree = all(_moment_shape(st) in (None, _shape(shapes[names[i]]))
                        for i, st in opt.get("state", {}).items() if i in names)
            if agree:
                return names, "by parameter order (the state dict's order, checked against every moment's shape)"
    by_shape: dict[tuple, list[str]] = {}
    for k, vt in found.items():
        if vt is not None and vt.kind != "trainable_tokens" and k in shapes:
            by_shape.setdefault(_shape(shapes[k]), []).append(k)
    names = {}
    for i, st in opt.get("state", {}).items():
        cands = by_shape.get(_moment_shape(st), [])
        if cands:
            names[i] = " or ".join(cands)
    return names, "by shape (the parameter order could not be recovered; equal shapes cannot be told apart)"


def remap_optimizer_state(optimizer: dict, state_dict: dict, found: dict | None, rm: RowMap,
                          param_names: list[str] | None = None, report=None, *, ordered: bool = False,
                          skip=()) -> dict:
    """Remap ``exp_avg``/``exp_avg_sq`` (and any other per-row state) of vocabulary-shaped parameters.

    ``state_dict``: the checkpoint's tensors (or anything with ``.shape``), in the order saved.
    ``found``: key -> :class:`~.layout.VocabTensor` or None (default: :func:`~.layout.classify`).
    ``param_names``: parameter names in optimizer index order, when the caller knows them (a trainer).
    Parameters are matched as :func:`match_params` says. Shared rows keep their moments; rows new to
    the target start at zero, as a fresh parameter's would. ``report``: gets a line per remapped state."""
    if found is None:
        found = {k: classify(k, _shape(v), rm.source_rows) for k, v in state_dict.items()}
    opt = {**optimizer, "state": dict(optimizer.get("state", {})),
           "param_groups": copy.deepcopy(optimizer.get("param_groups", []))}
    names, how = match_params(opt, state_dict, found, param_names, ordered, skip)
    check_moments(opt, state_dict, names, how, param_names)
    identity = rm.is_identity()
    n_remapped = 0
    for i, st in list(opt["state"].items()):
        if not isinstance(st, dict):
            continue
        shape = _moment_shape(st)
        key = names.get(i)
        vt = found.get(key.split(" or ")[0]) if key else None
        if vt is not None and (vt.kind == "trainable_tokens" or key.split(" or ")[0] not in state_dict
                               or _shape(state_dict[key.split(" or ")[0]]) != shape):
            vt = None
        new_st = dict(st)
        for n, v in st.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            if vt is not None and tuple(v.shape) == shape:
                new_st[n] = rm.apply(v, vt.dim)
            elif rm.source_rows in v.shape and not identity:
                raise RemapError(f"optimizer state {i}.{n} {tuple(v.shape)} has a vocabulary-sized dimension but "
                                 f"belongs to no vocabulary-shaped parameter (matched to {key!r}); pass param_names")
        if vt is not None:
            n_remapped += 1
            after = next(v.shape for v in new_st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            if report is not None:
                report.remapped.append({"key": f"optimizer.state.{i} ({key})", "kind": "moment", "side": vt.side,
                                        "dim": vt.dim, "before": list(shape), "after": list(after)})
        opt["state"][i] = new_st
    if report is not None and n_remapped:
        report.notes.append(f"optimizer moments matched to parameters {how}")
    return opt
