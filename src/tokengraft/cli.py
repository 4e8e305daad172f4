"""The `tokengraft` command: thin. Each subcommand lives in ``tokengraft/commands/<name>.py`` with
``register(subparsers)`` (its --help) and ``run(args) -> int``; no logic lives here."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {  # subcommand -> module under tokengraft.commands
    "add": "add",
    "doctor": "doctor",
    "convert": "convert",
    "train": "train",
    "export": "export",
    "import-xtuner": "import_xtuner",
    "demo": "demo",
}

DEBUG_HELP = "print the Python traceback of an error (also: TOKENGRAFT_DEBUG=1)"


class Parser(argparse.ArgumentParser):
    """argparse with tokengraft's error shape: one line on stderr (no usage block), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (some pull in
    transformers/trainers, seconds of start-up that `tokengraft convert` should not pay)."""
    from ._version import __version__

    p = Parser(
        prog="tokengraft",
        description="Add special tokens to LLaVA-style and causal language models, and carry "
                    "checkpoints across vocabulary changes by token identity.",
        epilog="Run `tokengraft COMMAND --help` for each command. Docs: docs/ in the source tree.")
    p.add_argument("--version", action="version", version=f"tokengraft {__version__}")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in COMMANDS.items():
        if only is not None and name != only:
            continue
        m = importlib.import_module(f".commands.{mod}", __package__)
        sp = m.register(sub, name)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        sp.set_defaults(_run=m.run, _parser=sp)
    return p


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's parser: "tokengraft train: error: unrecognized arguments"
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("TOKENGRAFT_DEBUG", "") not in ("", "0")
    stdin = sys.stdin
    try:
        # tokengraft never asks the terminal anything; without a readable stdin no library prompt
        # ("run the custom code? [y/N]") can be answered yes: a second wall behind
        # trust_remote_code=False and the auto_map refusal in io.refuse_remote_code
        sys.stdin = open(os.devnull, encoding="utf-8")
        return int(args._run(args) or 0)
    except SystemExit:  # a library's sys.exit: its status stands
        raise
    except BaseException as e:  # the one error boundary: one line on stderr, an exit code, no traceback
        if debug:
            import traceback

            traceback.print_exc()
        return _report(args, e)
    finally:
        if sys.stdin is not stdin:
            sys.stdin.close()
            sys.stdin = stdin


def _report(args, e: BaseException) -> int:
    """Print ``e`` as one line ``tokengraft CMD: error: ...`` and return the exit status."""
    from .errors import TokengraftError

    say = f"tokengraft {args.command}:"
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM while an output folder is written
        from .outdir import Terminated

        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"{say} {what}; no output folder was put in place "
              f"(a training run keeps the checkpoints it already wrote)", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    if isinstance(e, TokengraftError):  # bad input (2) or a failed check (1)
        for line in e.details:
            print(f"{say} {line}", file=sys.stderr)
        print(f"{say} error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    full = _disk_full(args, e)
    if full:
        print(f"{say} error: {full}", file=sys.stderr)
        return 2
    if isinstance(e, OSError):  # read-only disk, permissions, a file where a folder should be
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{say} error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    if isinstance(e, MemoryError):
        print(f"{say} error: out of memory; free memory or use a machine with more", file=sys.stderr)
        return 2
    print(f"{say} error: {type(e).__name__}: {_one_line(e)[:500]} (run with --debug for the traceback)",
          file=sys.stderr)
    return 1


def _disk_full(args, e: BaseException) -> str | None:
    """One line for a full disk or a file-size limit (``OSError`` ENOSPC/EFBIG, or safetensors'
    ``SafetensorError: ... No space left`` / ``File too large``), naming the output and the bytes it
    needs (about the input's weights); None for any other error."""
    import errno
    import shutil
    from pathlib import Path

    text = str(e)
    code = getattr(e, "errno", None)
    if code not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) and not any(
            m in text for m in ("No space left", "File too large", "Disk quota exceeded")):
        return None
    out = next((v for k in ("output", "output_dir") if isinstance(v := getattr(args, k, None), str)), None)
    where = Path(getattr(e, "filename", None) or out or ".")
    need = _weights_bytes(next((getattr(args, k) for k in ("model_dir", "model", "source", "checkpoint", "llm")
                                if isinstance(getattr(args, k, None), str)), None))
    probe = next((p for p in [where, *where.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    limit = ("the file size limit (ulimit -f) or the filesystem's largest file was reached"
             if code == errno.EFBIG or "File too large" in text else "the disk is full")
    needs = f"it needs about {need:,} bytes (the input's weights), " if need else ""
    return (f"{out or where}: {limit} while writing; {needs}{free:,} bytes are free there; "
            f"nothing was put in place; free space (or raise the limit) and run again")


def _weights_bytes(folder) -> int:
    from pathlib import Path

    if not folder or not Path(folder).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(folder).iterdir()
               if f.suffix in (".safetensors", ".bin", ".pth", ".pt") and f.is_file())


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
