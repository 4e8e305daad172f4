"""ZeRO-1/2 optimizer partitions across a vocabulary change, exactly as DeepSpeed lays them out.

What DeepSpeed (``runtime/zero/stage_1_and_2.py``) writes, per data-parallel rank ``r`` of ``W``,
in ``*zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` -> ``optimizer_state_dict``:

- each param group's trainable parameters are flattened in ``param_shapes`` order (the model
  states file), back to back, then zero-padded at the END to a multiple of ``2 * W``; the padded
  vector is cut into ``W`` equal partitions, rank ``r`` owns partition ``r``;
- ``single_partition_of_fp32_groups[g]``: rank ``r``'s fp32 master partition WITHOUT padding
  (only the last rank's is shorter); ``group_paddings[g]``: the padding on this rank (last rank
  only); ``partition_count[g]``: ``W``;
- ``base_optimizer_state``: the torch optimizer's state_dict over the flat partitions (one
  parameter per group, moments the padded partition's size), or, for ``elastic_checkpoint``,
  a list per group of moments without padding;
- ``param_slice_mappings[g]``: parameter name -> ``fragment_address(numel, start)``, the part of
  that parameter inside rank ``r``'s partition (``start`` relative to the partition).

So the full flat vector of a group is the ranks' unpadded partitions concatenated, and a
parameter's slice is found by summing the sizes before it. We rebuild it, remap each vocabulary
parameter's rows (old rows by token identity; a new row's fp32 master is its new initial row,
its moments zero), re-pad and re-partition for the same ``W`` and write every rank's file back
with the same structure. Anything else (ZeRO-3, tensor parallel, sizes that do not add up) is not
exactly representable here: those files are dropped with one note, as before.

:func:`consolidate` rebuilds the full fp32 state dict of a ZeRO-2/3 folder exactly as DeepSpeed's
``zero_to_fp32`` does (buffers, frozen fragments, trainable parameters from the fp32 flat
groups, shared parameters), but every file is read with the restricted unpickler: DeepSpeed's
utility ``torch.load``s the shards with ``weights_only=False``, so a payload in them would run.
ZeRO-3: each parameter owns ``ceil(numel / W)`` elements of every rank's flat groups (concatenated),
in ``param_shapes`` order; the ranks' pieces, concatenated, cut to ``numel``, are the parameter.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..vocab import RowMap
from .errors import CheckpointError
from .repickle import safe_save
from .safe_pickle import safe_load

_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_RANK = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
MODEL_STATES = "mp_rank_00_model_states.pt"
_OSD = "optimizer_state_dict"


class NotRepresentable(CheckpointError):
    """A partition layout this module does not rebuild exactly (the caller drops the files)."""


def _int(v) -> int:
    """ZeroStageEnum is pickled as a global; safe_load keeps it inert with its value in ``args``."""
    return int(v) if isinstance(v, int) else int(getattr(v, "args", (None,))[0])


def rank_files(folder: Path) -> list[Path]:
    """The ZeRO optimizer files of ``folder`` in data-parallel rank order."""
    files = [p for p in folder.glob("*_optim_states.pt")]
    ranked = []
    for p in files:
        m = _RANK.search(p.name)
        if not m:
            raise NotRepresentable(f"{p.name}: not a zero_pp_rank_R_mp_rank_M file name")
        if m.group(2) != "00":
            raise NotRepresentable(f"{p.name}: tensor-parallel (mp_rank {m.group(2)}) partitions")
        ranked.append((int(m.group(1)), p))
    ranked.sort()
    if [r for r, _ in ranked] != list(range(len(ranked))):
        raise NotRepresentable(f"ranks {[r for r, _ in ranked]} are not 0..{len(ranked) - 1}")
    return [p for _, p in ranked]


def _moments(osd: dict, g: int) -> dict:
    """{name: flat tensor} of group ``g``'s per-element optimizer state on one rank."""
    base = osd.get("base_optimizer_state")
    if base is None:  # no moments saved (nothing to remap)
        return {}
    if isinstance(base, list):  # elastic checkpoint: a list per group, no padding
        st = base[g]
    else:
        idx = base["param_groups"][g]["params"][0]
        st = base["state"].get(idx, {})
    return {k: v for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() == 1}


def _layout(n: int, world: int) -> tuple[int, int]:
    """(partition size, padding) of an ``n``-element group over ``world`` ranks, as DeepSpeed pads."""
    align = 2 * world
    padded = align * math.ceil(n / align)
    return padded // world, padded - n


def _gather(parts: list[torch.Tensor], paddings: list[int]) -> torch.Tensor:
    return torch.cat([p[:p.numel() - pad] if pad else p for p, pad in zip(parts, paddings)])


def _remap_flat(flat: torch.Tensor, shapes: dict, new_shapes: dict, vocab: dict, rm: RowMap,
                fill: dict | None) -> torch.Tensor:
    """The group's flat vector in the new shapes: vocabulary slices remapped, others as they were.
    ``fill``: name -> the new rows' values (fp32 master); None: new rows are zero (moments)."""
    out, o = [], 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        piece = flat[o:o + n]
        o += n
        if name in vocab:
            dim = vocab[name]
            rows = rm.apply(piece.view(tuple(shape)), dim, None)
            if fill is not None and rm.new_rows:
                idx = torch.tensor(rm.new_rows, dtype=torch.long)
                rows.index_copy_(dim, idx, fill[name].to(rows.dtype).index_select(dim, idx))
            piece = rows.reshape(-1)
        if piece.numel() != math.prod(new_shapes[name]):
            raise NotRepresentable(f"{name}: {piece.numel()} elements, param_shapes says {tuple(new_shapes[name])}")
        out.append(piece)
    if o != flat.numel():
        raise NotRepresentable(f"param_shapes cover {o} elements, the partitions hold {flat.numel()}")
    return torch.cat(out) if out else flat[:0]


def _split(full: torch.Tensor, world: int, keep_padding: bool) -> tuple[list[torch.Tensor], int, int]:
    """``full`` padded and cut into ``world`` partitions; (partitions, partition size, padding).
    Without ``keep_padding`` the last rank's padding is cut off, as DeepSpeed saves fp32 masters."""
    size, pad = _layout(full.numel(), world)
    if pad > size:
        raise NotRepresentable(f"a {full.numel()}-element group: its padding spans more than one rank")
    padded = torch.cat([full, full.new_zeros(pad)])
    parts = [padded[r * size:(r + 1) * size].clone() for r in range(world)]
    if not keep_padding and pad:
        parts[-1] = parts[-1][:size - pad].clone()
    return parts, size, pad


def _address(proto, numel: int, start: int):
    """A ``fragment_address(numel, start)`` of ``proto``'s class: the real namedtuple, or the inert
    placeholder safe_load made of it (written back as the same global)."""
    cls = type(proto)
    if isinstance(proto, tuple):
        return cls(numel, start)
    if proto.has_state and isinstance(proto.state, dict) and {"numel", "start"} <= set(proto.state):
        obj = cls.__new__(cls, *proto.args)  # a dataclass (DeepSpeed >= 0.10): NEWOBJ + BUILD(__dict__)
        obj.__setstate__({**proto.state, "numel": numel, "start": start})
    else:  # a namedtuple: NEWOBJ (cls, numel, start)
        obj = cls.__new__(cls, numel, start)
    obj.__dict__["via"] = proto.via
    return obj


def _slice_mappings(old: dict, shapes: dict, rank: int, size: int) -> dict:
    """name -> fragment_address(numel, start) for the parameters that fall in ``rank``'s partition.
    The namedtuple class is reused from the input (kept inert by safe_load, never imported)."""
    proto = next(iter(old.values()), None)
    if proto is None:
        return old
    out, o = type(old)(), 0
    lo, hi = rank * size, (rank + 1) * size
    for name, shape in shapes.items():
        a, b = max(o, lo), min(o + math.prod(shape), hi)
        if a < b:
            out[name] = _address(proto, b - a, a - lo)
        o += math.prod(shape)
    return out


def remap_partitions(folder: Path, out_folder: Path, old_shapes: list, new_shapes: list, vocab: dict,
                     new_master: dict, rm: RowMap) -> list[str]:
    """Rewrite ``folder``'s ZeRO-1/2 rank files into ``out_folder``; returns the names written.

    ``old_shapes``/``new_shapes``: the model states' ``param_shapes`` (a {name: shape} per group)
    before and after; ``vocab``: vocabulary parameter name -> vocabulary dim; ``new_master``:
    name -> the converted tensor (its new rows are the fp32 masters of new tokens).
    Raises :class:`NotRepresentable` (nothing written) when the layout is not ZeRO-1/2 as above."""
    files = rank_files(folder)
    world = len(files)
    states = [safe_load(p) for p in files]
    for p, s in zip(files, states):
        osd = s.get(_OSD) if isinstance(s, dict) else None
        if not isinstance(osd, dict) or "single_partition_of_fp32_groups" not in osd:
            raise NotRepresentable(f"{p.name}: no single_partition_of_fp32_groups (not a ZeRO-1/2 partition)")
        if _int(osd.get("zero_stage", 0)) not in (1, 2):
            raise NotRepresentable(f"{p.name}: ZeRO stage {_int(osd.get('zero_stage', 0))}")
        counts = osd.get("partition_count", [world])
        if any(_int(c) != world for c in (counts if isinstance(counts, (list, tuple)) else [counts])):
            raise NotRepresentable(f"{p.name}: partition_count {osd.get('partition_count')} != {world} rank files")
    osds = [s[_OSD] for s in states]
    groups = len(osds[0]["single_partition_of_fp32_groups"])
    if not isinstance(old_shapes, list) or len(old_shapes) != groups:
        raise NotRepresentable(f"param_shapes has {len(old_shapes) if isinstance(old_shapes, list) else '?'} "
                               f"groups, the partitions {groups}")
    elastic = isinstance(osds[0].get("base_optimizer_state"), list)
    new_osds = [{**o, "single_partition_of_fp32_groups": list(o["single_partition_of_fp32_groups"]),
                 "group_paddings": list(o.get("group_paddings", [0] * groups))} for o in osds]
    for o in new_osds:
        base = o.get("base_optimizer_state")
        if base is not None:
            o["base_optimizer_state"] = ([dict(g) for g in base] if elastic else
                                         {**base, "state": {k: dict(v) for k, v in base["state"].items()}})
        if "param_slice_mappings" in o:
            o["param_slice_mappings"] = list(o["param_slice_mappings"])
    for g in range(groups):
        shapes, nshapes = old_shapes[g], new_shapes[g]
        gv = {k: d for k, d in vocab.items() if k in shapes}
        paddings = [_int(o.get("group_paddings", [0] * groups)[g]) for o in osds]
        master = _gather([o["single_partition_of_fp32_groups"][g] for o in osds], [0] * world)
        full = _remap_flat(master, shapes, nshapes, gv, rm, new_master)
        parts, size, pad = _split(full, world, keep_padding=False)
        moments = [_moments(o, g) for o in osds]
        new_moments = {}
        for key in moments[0]:
            flat = _gather([m[key] for m in moments], [0] * world if elastic else paddings)
            new_moments[key] = _split(_remap_flat(flat, shapes, nshapes, gv, rm, None), world, not elastic)[0]
        for r, o in enumerate(new_osds):
            o["single_partition_of_fp32_groups"][g] = parts[r]
            o["group_paddings"][g] = pad if r == world - 1 else 0
            base = o.get("base_optimizer_state")
            if base is not None:
                st = base[g] if elastic else base["state"].setdefault(base["param_groups"][g]["params"][0], {})
                for key, ps in new_moments.items():
                    st[key] = ps[r]
            if "param_slice_mappings" in o and g < len(o["param_slice_mappings"]):
                o["param_slice_mappings"][g] = _slice_mappings(o["param_slice_mappings"][g], nshapes, r, size)
    written = []
    for p, s, o in zip(files, states, new_osds):
        target = out_folder / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        safe_save({**s, _OSD: o}, target)
        written.append(p.name)
    return written


# -- consolidation (read only) ---------------------------------------------------------------------

def model_state_files(folder: Path) -> list[Path]:
    """The model states files DeepSpeed reads: one per rank under ZeRO-3, else ``mp_rank_00``."""
    ranked = sorted((int(m.group(1)), p) for p in folder.glob("zero_pp_rank_*_model_states.pt")
                    if (m := _MODEL_RANK.match(p.name)))
    if ranked:
        return [p for _, p in ranked]
    return [folder / MODEL_STATES] if (folder / MODEL_STATES).is_file() else []


def _numel(shape, where: str) -> tuple[tuple[int, ...], int]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if dims is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise NotRepresentable(f"{where}: shape {shape!r:.60} is not a list of sizes")
    return dims, math.prod(dims)


def _flat(groups, where: str) -> torch.Tensor:
    """One rank's fp32 flat groups, concatenated (each a 1-D floating tensor)."""
    if not isinstance(groups, (list, tuple)) or not groups:
        raise NotRepresentable(f"{where}: no fp32 flat groups")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point() for t in groups):
        raise NotRepresentable(f"{where}: fp32 flat groups are not 1-D floating tensors")
    return torch.cat(list(groups))


def _zero3_params(shapes: dict, flats: list[torch.Tensor], world: int, where: str) -> dict:
    out, offset = {}, 0
    for name, shape in shapes.items():
        dims, n = _numel(shape, f"{where} param_shapes[{name!r}]")
        part = math.ceil(n / world)
        if offset + part > flats[0].numel():
            raise NotRepresentable(f"{where}: param_shapes need more elements than the fp32 flat groups hold")
        out[name] = torch.cat([f[offset:offset + part] for f in flats])[:n].view(dims).clone()
        offset += part
    if offset * world != sum(f.numel() for f in flats):
        raise NotRepresentable(f"{where}: param_shapes cover {offset * world} elements, the fp32 flat groups "
                               f"hold {sum(f.numel() for f in flats)}")
    return out


def _zero2_params(shape_groups: list, parts: list[list], world: int, paddings, where: str) -> dict:
    out = {}
    if len(parts[0]) != len(shape_groups):
        raise NotRepresentable(f"{where}: {len(shape_groups)} param_shapes groups, {len(parts[0])} fp32 groups")
    for g, shapes in enumerate(shape_groups):
        full = _flat([p[g] for p in parts], where)
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            dims, n = _numel(shape, f"{where} param_shapes[{name!r}]")
            if offset + n > full.numel():
                raise NotRepresentable(f"{where}: param_shapes need more elements than group {g} holds")
            out[name] = full[offset:offset + n].view(dims).clone()
            offset += n + _int(pads[i])
        align = 2 * world
        if align * math.ceil(offset / align) != align * math.ceil(full.numel() / align):
            raise NotRepresentable(f"{where}: group {g}: param_shapes cover {offset} elements, the partitions "
                                   f"{full.numel()}")
    return out


def _frozen(models: list, stage: int, world: int, where: str) -> dict:
    shapes = models[0].get("frozen_param_shapes") or {}
    out = {}
    for name, shape in shapes.items():
        dims, n = _numel(shape, f"{where} frozen_param_shapes[{name!r}]")
        frags = [m.get("frozen_param_fragments", {}).get(name) for m in (models if stage == 3 else models[:1])]
        if not all(isinstance(f, torch.Tensor) for f in frags):
            raise NotRepresentable(f"{where}: frozen parameter {name!r} has no fragment on every rank")
        flat = torch.cat([f.reshape(-1) for f in frags])
        if flat.numel() < n:
            raise NotRepresentable(f"{where}: frozen parameter {name!r} needs {n} elements, its fragments hold "
                                   f"{flat.numel()}")
        out[name] = flat[:n].view(dims).clone()
    return out


def consolidate(folder: Path) -> tuple[dict[str, torch.Tensor], int, int]:
    """(fp32 state dict, ZeRO stage, world size) of a ZeRO-2/3 folder, as DeepSpeed's zero_to_fp32
    builds it (frozen parameters included), read without running anything from the files.
    Raises :class:`NotRepresentable` with one line when the files do not add up."""
    models = [safe_load(p) for p in model_state_files(folder)]
    files = rank_files(folder)
    if not models or not files:
        raise NotRepresentable(f"{folder}: needs model states and *_optim_states.pt files")
    osds = [s.get(_OSD) if isinstance(s, dict) else None for s in [safe_load(p) for p in files]]
    if not all(isinstance(m, dict) for m in models) or not all(isinstance(o, dict) for o in osds):
        raise NotRepresentable(f"{folder}: model or optimizer states are not DeepSpeed dicts")
    stage = _int(osds[0].get("zero_stage", 0))
    counts = osds[0].get("partition_count", 0)
    world = max(_int(c) for c in counts) if isinstance(counts, (list, tuple)) and counts else _int(counts)
    if world != len(files):
        raise NotRepresentable(f"{folder}: partition_count {world} but {len(files)} *_optim_states.pt file(s)")
    shape_groups = models[0].get("param_shapes")
    if not isinstance(shape_groups, list) or not all(isinstance(g, dict) for g in shape_groups):
        raise NotRepresentable(f"{folder}: the model states have no param_shapes")
    names = set(models[0].get("buffer_names") or [])
    module = models[0].get("module") or {}
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in module.items()
          if k in names and isinstance(v, torch.Tensor)}
    sd.update(_frozen(models, stage, world, str(folder)))
    if stage == 3:
        flats = [_flat(o.get("fp32_flat_groups"), f"{folder} rank {r}") for r, o in enumerate(osds)]
        sd.update(_zero3_params({k: v for g in shape_groups for k, v in g.items()}, flats, world, str(folder)))
    elif stage in (1, 2):
        parts = [o.get("single_partition_of_fp32_groups") for o in osds]
        if not all(isinstance(p, (list, tuple)) for p in parts):
            raise NotRepresentable(f"{folder}: no single_partition_of_fp32_groups")
        sd.update(_zero2_params(shape_groups, parts, world, osds[0].get("param_alignment_paddings"), str(folder)))
    else:
        raise NotRepresentable(f"{folder}: unknown ZeRO stage {stage}")
    for alias, name in (models[0].get("shared_params") or {}).items():
        if name in sd:
            sd[alias] = sd[name]
    return sd, stage, world


__all__ = ["MODEL_STATES", "NotRepresentable", "consolidate", "model_state_files", "rank_files", "remap_partitions"]
