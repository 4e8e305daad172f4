"""Real English prose that ships with Python, and what a model's head sees on it.

Used to calibrate tied-head initialization, by ``doctor``'s KL check and by the benchmarks.
"""
from __future__ import annotations

import codecs
import contextlib
import io
import inspect

import torch


def real_text() -> list[str]:
    """Paragraphs nobody on this project wrote: the Zen of Python and standard-library docstrings."""
    import argparse
    import json
    import logging
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this

    zen = codecs.decode(this.s, "rot13")
    docs = [inspect.getdoc(m) or "" for m in (argparse, json, logging)]
    paras = [zen] + [p for d in docs for p in d.split("\n\n") if len(p.split()) >= 12]
    return paras


class _HeadReached(Exception):
    """Raised by :func:`head_inputs`' hook: the head's input is all it needs."""


@torch.no_grad()
def head_inputs(model, tokenizer, texts: list[str], max_tokens: int = 1024) -> torch.Tensor:
    """The output head's inputs (positions x hidden) on ``texts``, captured with a forward
    pre-hook, so it works for any architecture whose head is ``get_output_embeddings()``.

    The hook stops the forward pass there: the head's positions x vocabulary product is the
    largest single matmul of a small model (a fifth of SmolLM2-135M's forward) and is not needed."""
    head = model.get_output_embeddings()
    grabbed: list[torch.Tensor] = []

    def grab(mod, args):
        grabbed.append(args[0].detach())
        raise _HeadReached

    hook = head.register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()
    try:
        used = 0
        for t in texts:
            ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            ids = ids.to(head.weight.device)
            try:
                model(input_ids=ids)
            except _HeadReached:
                pass
            used += ids.shape[1]
            if used >= max_tokens:
                break
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in grabbed]).float().cpu()


def kl_of_rows(hidden: torch.Tensor, weight: torch.Tensor, new_ids, bias: torch.Tensor | None = None, *,
               base_lse: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """Per-position KL(base || grafted) in nats: "grafted" is the head ``weight`` (rows x d, optional
    ``bias``), "base" the same head without the rows ``new_ids``. ``hidden``: the head's inputs
    (positions x d, see :func:`head_inputs`).

    The one implementation every caller uses (graft, doctor, bench, demo); the maths is
    :func:`tokengraft.init.kl_of_added`. The largest probability the new rows take at a position is
    ``1 - exp(-kl)`` (see :func:`mass_of`). ``base_lse`` (positions,) is the base head's
    log-normaliser when the caller already has it (graft measures the base *vocabulary*, without
    rows an earlier graft added); otherwise it is computed from ``weight`` without ``new_ids``."""
    from .init import kl_of_added

    new = torch.as_tensor(sorted(set(int(i) for i in new_ids)), dtype=torch.long)
    if new.numel() == 0:
        return torch.zeros(hidden.shape[0])
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[new] = False
    rows = weight[new].detach().float()
    rows_bias = None if bias is None else bias[new].detach().float()
    base_w = None if base_lse is not None else weight[keep].detach().float()
    base_b = None if bias is None or base_lse is not None else bias[keep].detach().float()
    out = []
    with torch.no_grad():
        # chunked: positions x vocabulary logits are ~200 MB per 1000 positions for a 49k vocabulary
        for i, h in enumerate(hidden.split(chunk)):
            h = h.float()
            if base_lse is None:
                z = h @ base_w.T
                lse = torch.logsumexp(z if base_b is None else z + base_b, dim=1)
            else:
                lse = base_lse[i * chunk: i * chunk + h.shape[0]].float()
            out.append(kl_of_added(h, lse, rows, rows_bias))
    return torch.cat(out)


def mass_of(kl: torch.Tensor) -> float:
    """The largest probability the new rows take at any position, from per-position KL:
    KL = log(1 + S/Z) and the mass is S / (Z + S) = 1 - exp(-KL)."""
    return float(-torch.expm1(-kl.max())) if kl.numel() else 0.0


def heldout_text() -> list[str]:
    """Prose disjoint from :func:`real_text` (which calibration sees): more standard-library
    docstrings, for measuring invisibility on text the graft never looked at."""
    import collections
    import email
    import pathlib
    import subprocess
    import unittest

    docs = [inspect.getdoc(m) or "" for m in (collections, email, pathlib, subprocess, unittest)]
    docs += [inspect.getdoc(f) or "" for f in (subprocess.run, pathlib.Path.glob, collections.Counter)]
    return [p for d in docs for p in d.split("\n\n") if len(p.split()) >= 12]
