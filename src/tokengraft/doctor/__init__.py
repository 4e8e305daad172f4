"""`doctor`: every consistency check between tokenizer, config, weights, processor, generation
config and manifest. Each problem becomes one :class:`Finding`: one line saying what is wrong,
where, and what to run.

Two entry points share the same checks:

* :func:`check_folder` reads a checkpoint folder *lazily* (``subject.py``): JSON files, the
  tokenizer (and processor), and the weights row chunk by row chunk through the validated
  readers. No model is built unless ``kl=True``; no code from the folder ever runs.
* :func:`check_model` checks an in-memory model (tie = the same Parameter object).

Both build a :class:`Subject` and run the same checks on it (``checks.py``, ``rows.py``,
``tokens.py``); ``kl.py`` measures KL(base || grafted); ``ckpt.py`` compares a training checkpoint
with a model folder (``--checkpoint``).
"""
from __future__ import annotations

import contextlib

from ..manifest import Manifest
from .checks import check_config, check_image_token, check_sizes, check_special_ids, check_tie
from .compat import check_compat
from .findings import (SEVERITIES, DoctorError, Finding, format_table, has_errors, sort_findings,
                       to_json)
from .kl import KL_WARN, kl_findings, kl_of_rows, load_for_kl
from .rows import check_nonfinite, check_rows, identical_groups, row_stats
from .subject import EMBED_KEYS, HEAD_KEYS, Rows, Subject, gather_folder, gather_model
from .tokens import check_manifest, check_split_tokens, check_suppressed, tied_reality

CHECKS = (check_config, check_sizes, check_tie, check_image_token, check_special_ids, check_nonfinite,
          check_rows, check_suppressed, check_manifest, check_split_tokens, check_compat)


def summary(s: Subject) -> Finding:
    bits = []
    if s.ntok is not None:
        bits.append(f"{s.ntok} tokens")
    if s.rows is not None:
        bits.append(f"{s.rows} rows ({s.emb.name})")
    tied = tied_reality(s)
    if tied is not None:
        bits.append("tied head" if tied else "untied head")
    elif s.head is not None:
        bits.append("head equal to the embedding")
    if s.processor is not None:
        bits.append(f"processor {type(s.processor).__name__}")
    if s.manifest is not None:
        bits.append(f"manifest: {len(s.manifest.tokens)} grafted token(s) on a {s.manifest.base_size}-token base")
    return Finding("info", "summary", f"{s.where}: " + (", ".join(bits) or "nothing could be read"))


def run_checks(s: Subject) -> list[Finding]:
    out = list(s.findings) + [summary(s)]
    for check in CHECKS:
        out += check(s)
    return sort_findings(out)


def check_folder(path, kl: bool = False) -> list[Finding]:
    """Every check on a checkpoint folder, reading the files lazily; ``kl`` also loads the model."""
    with contextlib.ExitStack() as stack:
        findings = run_checks(gather_folder(path, stack))
    if kl:
        if has_errors(findings):
            findings.append(Finding("info", "kl-skipped", f"{path}: KL not measured: fix the errors first"))
        else:
            model, tok, manifest = load_for_kl(path)
            findings += kl_findings(model, tok, manifest, where=str(path))
    return findings


def check_model(model, tokenizer, processor=None, manifest: Manifest | None = None,
                kl: bool = False) -> list[Finding]:
    """The same checks on an in-memory model (tie means the same Parameter object)."""
    findings = run_checks(gather_model(model, tokenizer, processor, manifest))
    if kl:
        findings += kl_findings(model, tokenizer, manifest)
    return sort_findings(findings)


def check_checkpoint(checkpoint, model) -> list[Finding]:
    """Whether a training checkpoint's vocabulary-shaped tensors fit a model folder (``ckpt.py``)."""
    from .ckpt import check_checkpoint as _check

    return _check(checkpoint, model)


__all__ = ["CHECKS", "DoctorError", "EMBED_KEYS", "Finding", "HEAD_KEYS", "KL_WARN", "Rows", "SEVERITIES",
           "Subject", "check_checkpoint", "check_folder", "check_model", "format_table",
           "gather_folder", "gather_model", "has_errors", "identical_groups", "kl_findings", "kl_of_rows",
           "row_stats", "run_checks", "summary", "to_json"]
