"""Row initializers: pure functions on tensors (torch only).

Each returns new rows for one side (input embedding or output head). The model is unchanged on
text without the new tokens when the *output* rows take (almost) no probability mass; the input
rows are free to be semantic because text without the new tokens never looks them up.
"""
from __future__ import annotations

import torch

# Every init strategy name, in one place. What ``auto`` means, wherever rows are initialized:
# the input side is semantic (sub-word pieces of the token's words, or its description); the
# output side is the mean over trained rows, so text without the new tokens keeps its
# distribution. A tied matrix is the head too: the output rule wins, unless the caller can run the
# model to calibrate a blend towards the semantic row within a KL budget (graft can; convert,
# with no model to run, keeps the mean).
METHODS = ("auto", "mean", "hewitt", "subword", "describe", "copy", "zero", "distill")
# distill: the input row fitted so the token acts like its description (tokengraft.distill, graft only)
# graft: every method but "zero" (a zero head row is not invisible); copy is spelled copy:TOKEN
FOR_GRAFT = tuple(m for m in METHODS if m != "zero")
# checkpoint conversion: no descriptions and no per-token specs there; "zero" leaves LoRA deltas
# and optimizer moments at zero and new rows at zero
FOR_CHECKPOINT = ("auto", "mean", "hewitt", "subword", "zero")
TRAINED_REL = 0.05  # a row whose norm is at most 5% of the median row norm does not look trained


def auto_method(side: str, tied: bool, semantic_ok: bool) -> str:
    """The concrete method ``auto`` stands for on one side (see above), without a calibrating model."""
    return "subword" if side == "input" and not tied and semantic_ok else "mean"


def looks_trained(norms: torch.Tensor, rel: float = TRAINED_REL) -> torch.Tensor:
    """The trained-row rule on row norms: above ``rel`` x the median norm (all-zero and near-zero
    rows, such as Llama-3's reserved tokens, are left out), and so are rows with an inf or NaN: one
    such row would make every statistic non-finite. If no row passes, every finite row counts."""
    finite = torch.isfinite(norms)
    if not finite.any():
        return finite
    mask = finite & (norms > rel * norms[finite].median())
    return mask if mask.any() else finite


def markup_words(token: str) -> str:
    """The words inside markup, for subword init: "<loc_17>" -> "loc 17", "</box>" -> "end box".
    The brackets say little about the meaning, and an opening and closing tag must not start equal."""
    core = token.strip("<>[]|{} ")
    closing = core.startswith("/")
    words = core.strip("/").replace("_", " ").strip() or token
    return f"end {words}" if closing else words


def trained_mask(weight: torch.Tensor, rows: int | None = None, rel: float = TRAINED_REL) -> torch.Tensor:
    """Rows that look trained (:func:`looks_trained`). Only the first ``rows`` rows are candidates."""
    n = weight.shape[0] if rows is None else rows
    mask = torch.zeros(weight.shape[0], dtype=torch.bool)
    mask[:n] = looks_trained(weight[:n].float().norm(dim=1), rel)
    return mask


def mean_row(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over trained rows (float32)."""
    return weight[mask].float().mean(dim=0)


def hewitt_rows(weight: torch.Tensor, mask: torch.Tensor, n: int, scale: float = 1e-5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean plus noise shaped like the rows' covariance, scaled down (Hewitt, 2021)."""
    w = weight[mask].float()
    mu = w.mean(dim=0)
    centered = w - mu
    # Sample through the data (w^T z / sqrt(N)) instead of factoring a d x d covariance.
    z = torch.randn(n, w.shape[0], generator=generator) / (w.shape[0] ** 0.5)
    return mu + (scale ** 0.5) * (z @ centered)


def subword_row(weight: torch.Tensor, piece_ids: list[int], fallback: torch.Tensor) -> torch.Tensor:
    """The mean of the rows of the pieces the base tokenizer splits a string into."""
    ids = [i for i in piece_ids if 0 <= i < weight.shape[0]]
    return weight[ids].float().mean(dim=0) if ids else fallback.clone()


def subword_rows(weight: torch.Tensor, pieces: list[list[int]], fallback: torch.Tensor) -> torch.Tensor:
    """:func:`subword_row` for many strings at once (len(pieces) x d, float32): one gather and one
    scatter-add instead of one small indexing per token (10,000 of those took seconds)."""
    n = weight.shape[0]
    kept = [[i for i in ids if 0 <= i < n] for ids in pieces]
    counts = torch.tensor([len(ids) for ids in kept], dtype=torch.long)
    out = fallback.float().expand(len(kept), -1).clone()
    if int(counts.sum()) == 0:
        return out
    flat = torch.tensor([i for ids in kept for i in ids], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(kept)), counts)
    sums = torch.zeros(len(kept), weight.shape[1]).index_add_(0, owner, weight[flat].float())
    has = counts > 0
    out[has] = sums[has] / counts[has, None].float()
    return out


def copy_row(weight: torch.Tensor, row: int) -> torch.Tensor:
    return weight[row].float().clone()


def kl_of_added(hidden: torch.Tensor, base_lse: torch.Tensor, rows: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact KL(base || grafted) per position when ``rows`` join the output head.

    Adding logits ``z_j`` to a softmax scales every base probability by Z / (Z + sum exp z_j), so
    KL = log(1 + sum_j exp(z_j - lse_base)). ``hidden``: positions x d (the head's input)."""
    z = _logits(hidden, rows)
    if bias is not None:
        z = z + bias.float()
    return torch.log1p(torch.exp(z - base_lse[:, None]).sum(dim=1))


def _logits(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hidden @ rows.T, computed once for a row repeated with ``expand`` (stride 0): the shared
    reference of a tied calibration is one row repeated k times."""
    if rows.dim() == 2 and rows.shape[0] > 1 and rows.stride(0) == 0:
        return (hidden.float() @ rows[:1].float().T).expand(-1, rows.shape[0])
    return hidden.float() @ rows.float().T


def calibrate_blend(hidden: torch.Tensor, base_lse: torch.Tensor, semantic: torch.Tensor,
                    invisible: torch.Tensor, budget: float, steps: int = 24) -> tuple[float, float]:
    """Largest ``a`` in [0, 1] with mean KL of ``invisible + a (semantic - invisible)`` <= budget.

    For tied heads, where one row serves both sides: as semantic as the invisibility budget allows.
    Returns (a, mean KL at a). The logits of a blend are the same blend of the two sides' logits,
    so the two matrix products are computed once and each bisection step is elementwise only
    (at k = 10,000 rows the products were most of the calibration's time)."""
    zi = _logits(hidden, invisible) - base_lse[:, None]
    dz = _logits(hidden, semantic) - base_lse[:, None] - zi

    def kl(a: float) -> float:
        return float(torch.log1p(torch.exp(zi + a * dz).sum(dim=1)).mean())

    if kl(1.0) <= budget:
        return 1.0, kl(1.0)
    lo, hi = 0.0, 1.0
    if kl(0.0) > budget:
        return 0.0, kl(0.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(mid) <= budget else (lo, mid)
    return lo, kl(lo)
