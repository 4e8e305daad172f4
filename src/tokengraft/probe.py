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


@torch.no_grad()
def head_inputs(model, tokenizer, texts: list[str], max_tokens: int = 1024) -> torch.Tensor:
    """The output head's inputs (positions x hidden) on ``texts``, captured with a forward hook,
    so it works for any architecture whose head is ``get_output_embeddings()``."""
    head = model.get_output_embeddings()
    grabbed: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, args, out: grabbed.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        used = 0
        for t in texts:
            ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            ids = ids.to(head.weight.device)
            model(input_ids=ids)
            used += ids.shape[1]
            if used >= max_tokens:
                break
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in grabbed]).float().cpu()


def log_softmax_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    z = hidden.float() @ weight.float().T
    if bias is not None:
        z = z + bias.float()
    return torch.log_softmax(z, dim=-1)


def kl_base_vs_grafted(hidden: torch.Tensor, base_weight: torch.Tensor, grafted_weight: torch.Tensor,
                       base_bias=None, grafted_bias=None, new_rows: list[int] | None = None,
                       chunk: int = 256) -> tuple[float, float]:
    """(mean KL(base || grafted) in nats per position, largest mass the new rows take at any
    position), from head inputs. The base head's rows are a prefix of the grafted head's; new rows
    default to the rows the grafted head has beyond the base's (pass ``new_rows`` when the graft
    reused rows the base already had)."""
    n = base_weight.shape[0]
    new = list(range(n, grafted_weight.shape[0])) if new_rows is None else list(new_rows)
    kls, mass = [], 0.0
    for h in hidden.split(chunk):
        lp = log_softmax_rows(h, base_weight, base_bias)
        lq = log_softmax_rows(h, grafted_weight, grafted_bias)
        kls.append((lp.exp() * (lp - lq[:, :n])).sum(-1))
        if new:
            mass = max(mass, float(lq[:, new].exp().sum(-1).max()))
    return float(torch.cat(kls).mean()), mass


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
