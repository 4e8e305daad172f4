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
    "init": "override every token's init: auto|mean|hewitt|subword|describe|copy:TOK",
    "dtype": "weights dtype of OUT (default fp32)",
    "max_shard_size": "largest safetensors file in OUT (default 5GB)",
}
DTYPES = ("fp32", "bf16", "fp16")


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
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help=HELP["max_shard_size"])


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
