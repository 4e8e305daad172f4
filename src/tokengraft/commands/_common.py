"""Flags several commands share: one spelling and one help text each, defined here only.

Also the one call every writing command makes before any slow work: ``check_inputs`` (the output
rule of ``outdir.check_output`` plus the no-remote-code refusal for every input folder)."""
from __future__ import annotations

import contextlib
import os
import sys

HELP = {
    "output": "output folder; must not exist (unless --overwrite) and must lie outside every input",
    "overwrite": "replace OUT if it exists and tokengraft wrote it (it holds tokengraft.json or run.json); "
                 "any other folder is refused",
    "tokens": "comma-separated tokens, e.g. '<box>,</box>'",
    "tokens_file": "YAML/JSON list of tokens with options (content, description, role, special, init, stop)",
    "init": "override every token's init: auto|mean|hewitt|subword|describe|distill|copy:TOK",
    "dtype": "weights dtype of OUT (default fp32)",
    "max_shard_size": "largest safetensors file in OUT: 5GB (default), 500MB, 2GiB, ... (1MB to 1TB)",
}
DTYPES = ("fp32", "bf16", "fp16")


def number(kind: type, lo=None, hi=None, *, above: bool = False, key: str | None = None):
    """An argparse ``type=`` for a finite ``kind`` (int, float) in [lo, hi] (``above``: > lo): the
    flag is refused at parse time, before any model loads (``--lora-alpha nan``, ``--pad-to-multiple-of
    99999999999999``), with argparse's one line and exit 2. The one numeric flag type of every command."""
    import argparse

    from ..files import out_of_range

    def parse(text: str):
        try:
            v = kind(text) if kind is not int else int(text.strip().replace("_", ""))
        except ValueError:
            v = None
        problem = out_of_range(v, kind, lo, hi, above=above) if v is not None else None
        if v is None or problem:
            raise argparse.ArgumentTypeError(f"{problem or out_of_range(None, kind, lo, hi, above=above)}"
                                             f"{f' (config key {key})' if key else ''}, got {text!r}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" fallback
    return parse


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_size(text: str) -> int:
    """``--max-shard-size``: bytes, or a number with KB/MB/GB/TB (10^3...) or KiB/MiB/GiB (2^10...),
    as transformers reads it; from 1 MB to 1 TB. Parsed with the flags, before any model loads."""
    import argparse
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 2GiB, got {text!r}")
    n = int(float(m.group(1)) * _UNITS[unit])
    if not 10**6 <= n <= 10**12:
        raise argparse.ArgumentTypeError(f"expected a size from 1MB to 1TB, got {text!r} ({n:,} bytes)")
    return n


def add_output(p, required: bool = True, default: str | None = None, help: str | None = None):
    """``-o/--output OUT`` (``--out`` kept as an alias) into ``args.output``."""
    text = (help or HELP["output"]) + (f" (default: {default})" if default else "")
    p.add_argument("-o", "--output", "--out", dest="output", metavar="OUT", required=required, default=default,
                   help=text)


def add_overwrite(p):
    p.add_argument("--overwrite", action="store_true", help=HELP["overwrite"])


def add_tokens(p):
    """``--tokens`` and ``--tokens-file``."""
    p.add_argument("--tokens", metavar="'<a>,<b>'", default=None, help=HELP["tokens"])
    p.add_argument("--tokens-file", metavar="FILE", default=None, help=HELP["tokens_file"])


def add_init(p):
    p.add_argument("--init", metavar="METHOD", default=None, help=HELP["init"])


def add_dtype(p):
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help=HELP["dtype"])


def add_max_shard_size(p):
    p.add_argument("--max-shard-size", default=shard_size("5GB"), type=shard_size, metavar="SIZE",
                   help=HELP["max_shard_size"])


def check_inputs(output, overwrite: bool, inputs: dict) -> None:
    """Before any slow work: refuse an output that would touch an input or a folder tokengraft did
    not write, and any input folder that would need its own Python code to load."""
    from ..io import refuse_remote_code
    from ..outdir import check_output, check_writable

    check_output(output, inputs, overwrite)
    check_writable(output)
    for p in inputs.values():
        if p:
            refuse_remote_code(p)


@contextlib.contextmanager
def result_only_on_stdout(active: bool = True):
    """While a command works, send everything written to stdout to stderr instead, so stdout carries
    only the result printed after the block (``--json`` stays parseable). Libraries do print there:
    DeepSpeed, imported by transformers when saving, logs its accelerator choice on stdout. Both the
    Python stream and file descriptor 1 are redirected (C-level writes too)."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
