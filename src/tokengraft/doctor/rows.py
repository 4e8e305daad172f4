"""Checks on the weights' values: non-finite values anywhere, and vocabulary rows that look
untrained (all-zero, near-zero, identical to other tokens' rows). Everything is read in chunks."""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..init import TRAINED_REL, looks_trained  # the one trained-row rule
from .findings import Finding
from .subject import Rows, Subject

MAX_GROUPS = 4  # identical-row groups named in the one-line finding; the rest are counted
SEMANTIC_INITS = {"subword", "describe", "copy"}  # inits that take base rows' values
SCAN_ELEMENTS = 1 << 24  # elements per read in the non-finite scan (64 MB of float32 at most)


def row_stats(rows: Rows, limit: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm, key) per row for the first ``limit`` rows, chunk by chunk. ``key`` is a projection on
    a fixed random direction in float64: equal rows have equal keys; unequal rows almost never do
    (candidates are verified exactly)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(rows.shape[1], generator=g, dtype=torch.float64)
    norms, keys = [], []
    for a, c in rows.chunks():
        c = c[: max(0, limit - a)]
        norms.append(c.norm(dim=1))
        keys.append(c.double() @ direction)
    return torch.cat(norms), torch.cat(keys)


def identical_groups(rows: Rows, keys: torch.Tensor, skip: torch.Tensor) -> list[list[int]]:
    """Groups (size >= 2) of exactly identical rows among rows whose ``skip`` is False."""
    ids = (~skip).nonzero().flatten()
    _, inverse, counts = torch.unique(keys[ids], return_inverse=True, return_counts=True)
    groups = []
    for g in (counts > 1).nonzero().flatten().tolist():
        members = ids[inverse == g].tolist()
        first = rows.row(members[0])
        same = [m for m in members if torch.equal(rows.row(m), first)]
        if len(same) > 1:
            groups.append(same)
    return sorted(groups, key=lambda g: (-len(g), g[0]))


# -- non-finite values ------------------------------------------------------------------------

def _nonfinite(rows: Rows, vocab: bool) -> tuple[int, list[int]]:
    """(count of NaN/inf values, rows holding them when ``vocab``). A chunk whose sum is finite holds
    no NaN or inf (either would propagate), so clean weights cost one reduction per chunk."""
    if rows.dtype is not None and not rows.dtype.is_floating_point:
        return 0, []
    size = max(1, SCAN_ELEMENTS // max(1, math.prod(rows.shape[1:])))
    n, bad_rows = 0, []
    for a, c in rows.chunks(size):
        if torch.isfinite(c.sum()):
            continue
        bad = ~torch.isfinite(c)
        n += int(bad.sum())
        if vocab and c.dim() == 2:
            bad_rows += (bad.any(dim=1).nonzero().flatten() + a).tolist()
    return n, bad_rows


def check_nonfinite(s: Subject) -> list[Finding]:
    """NaN or inf anywhere in the weights makes every probability NaN: an error, named by tensor,
    and for the embedding and head by token."""
    out = []
    vocab = [r for r in (s.emb, s.head) if r is not None]
    others = []
    for t in s.tensors:
        # the embedding / head: by tensor identity in memory, by key in a folder
        is_vocab = any((t.obj is r.obj) if s.in_memory else (t.name == r.name) for r in vocab)
        n, bad_rows = _nonfinite(t, is_vocab)
        if not n:
            continue
        if is_vocab:
            shown = ", ".join(f"{i} {s.token_name(i)}" for i in bad_rows[:5]) + (
                f", ... ({len(bad_rows)} in all)" if len(bad_rows) > 5 else "")
            out.append(Finding("error", "nonfinite-rows",
                               f"{s.where}: {len(bad_rows)} vocabulary row(s) of {t.name} hold NaN/inf ({shown}); "
                               f"every probability the model computes with them is NaN: restore these rows from the "
                               f"last good checkpoint (or re-run `tokengraft add` from the base)",
                               {"tensor": t.name, "rows": bad_rows[:1000], "values": n}))
        else:
            others.append((t.name, n))
    if others:
        shown = ", ".join(f"{k} ({n})" for k, n in others[:5]) + (f", ... ({len(others)} in all)" if len(others) > 5 else "")
        out.append(Finding("error", "nonfinite-weights",
                           f"{s.where}: {sum(n for _, n in others)} NaN/inf value(s) in {len(others)} weight "
                           f"tensor(s): {shown}; the model's outputs are NaN: restore the weights from the last "
                           f"good checkpoint (training diverged or the file is damaged)",
                           {"tensors": dict(others[:100])}))
    return out


# -- rows that look untrained -----------------------------------------------------------------

def manifest_roles(s: Subject) -> dict[int, Any]:
    return {t.id: t for t in s.manifest.tokens} if s.manifest is not None else {}


def _by_design(group: list[int], added: dict[int, Any], side: str) -> str | None:
    """Why a group of identical rows is expected from its init, or None. New tokens that start from
    the same row (the mean, or the subword mean of the same pieces) are identical until training
    separates them; a semantic init from a single piece (subword of "box" for "<box>",
    ``copy:TOKEN``) equals that one base token's row."""
    new = [added[i] for i in group if i in added]
    base = [i for i in group if i not in added]
    if not new or len(base) > 1:  # two base tokens alike: the base itself has the problem
        return None
    inits = sorted({_side_init(t.init, side) for t in new})
    if base and not set(inits) <= SEMANTIC_INITS:
        return None
    return "/".join(inits)


def _side_init(init: str, side: str) -> str:
    """The method name on one side of a recorded init: "subword/mean" (input/output),
    "subword*0.39+mean" (tied blend), "copy:<x>", "mean"."""
    parts = init.split("/")
    part = parts[1] if side == "output" and len(parts) == 2 else parts[0]
    m = re.match(r"[a-z]+", part)
    return m.group(0) if m else part


def check_rows(s: Subject) -> list[Finding]:
    """Rows used by tokens that look untrained: all-zero / near-zero rows, identical rows."""
    if s.emb is None:
        return []
    limit = min(s.rows, s.ntok) if s.ntok is not None else s.rows
    added = manifest_roles(s)
    name = s.token_name

    out = []
    sides = [("input", s.emb)]
    head = s.separate_head()
    if head is not None and head.n >= limit:
        sides.append(("output", head))
    for side, rows in sides:
        norms, keys = row_stats(rows, limit)
        finite = torch.isfinite(norms)  # NaN rows are check_nonfinite's; they must not skew the median
        trained = torch.ones_like(finite)
        if bool(finite.any()):
            trained[finite] = looks_trained(norms[finite])
        zero = norms == 0
        weak = ~trained & ~zero
        # input-role tokens (image placeholders) never get generated: their output row is not used
        if side == "output":
            inp = [i for i, t in added.items() if t.role == "input" and i < limit]
            zero[inp] = False
            weak[inp] = False
        for mask, kind in ((zero, "all-zero"), (weak, f"near-zero (norm <= {TRAINED_REL:g} x median)")):
            ids = mask.nonzero().flatten().tolist()
            if ids:
                shown = ", ".join(f"{i} {name(i)}" for i in ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
                out.append(Finding("warning", "untrained-rows",
                                   f"{s.where}: {len(ids)} token(s) have {kind} {side} rows in {rows.name} ({shown}); "
                                   f"they look untrained: train them before relying on them, or give them rows "
                                   f"(`tokengraft add` initializes every row it adds)"))
        groups = identical_groups(rows, keys, zero | weak | ~finite)
        warn, info = [], []
        for g in groups:
            why = _by_design(g, added, side)
            (info if why else warn).append((g, why))
        if warn:
            gs = [g for g, _ in warn]
            shown = "; ".join("[" + ", ".join(f"{i} {name(i)}" for i in g[:4]) + (f", ... {len(g)} in all" if len(g) > 4 else "")
                              + "]" for g in gs[:MAX_GROUPS]) + ("; ..." if len(gs) > MAX_GROUPS else "")
            out.append(Finding("warning", f"identical-{side}-rows",
                               f"{s.where}: {sum(map(len, gs))} tokens in {len(gs)} group(s) share identical {side} "
                               f"rows in {rows.name} ({shown}); the model cannot tell a group apart: they look "
                               f"untrained, train them before use"))
        for g, why in info:
            if side == "output" and not set(why.split("/")) & SEMANTIC_INITS:
                continue  # new output rows start equal by design (the invisible mean)
            out.append(Finding("info", f"identical-{side}-rows-by-init",
                               f"{s.where}: tokens {', '.join(f'{i} {name(i)}' for i in g[:6])} share one {side} row, "
                               f"as their init ({why}) makes them; expected until training separates them"))
    return out
