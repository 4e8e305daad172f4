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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (some pull in
    transformers/trainers, seconds of start-up that `tokengraft convert` should not pay)."""
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="tokengraft",
        description="Add special tokens to LLaVA-style and causal language models, and carry "
                    "checkpoints across vocabulary changes by token identity.",
        epilog="Run `tokengraft COMMAND --help` for each command. Docs: docs/ in the source tree.")
    p.add_argument("--version", action="version", version=f"tokengraft {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in COMMANDS.items():
        if only is not None and name != only:
            continue
        m = importlib.import_module(f".commands.{mod}", __package__)
        sp = m.register(sub, name)
        sp.set_defaults(_run=m.run)
    return p


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from .errors import TokengraftError

    stdin = sys.stdin
    try:
        # tokengraft never asks the terminal anything; without a readable stdin no library prompt
        # ("run the custom code? [y/N]") can be answered yes: a second wall behind
        # trust_remote_code=False and the auto_map refusal in io.refuse_remote_code
        sys.stdin = open(os.devnull, encoding="utf-8")
        return int(args._run(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM while an output folder is written (outdir.Terminated)
        from .outdir import Terminated

        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"tokengraft {args.command}: {what}; no output folder was put in place "
              f"(a training run keeps the checkpoints it already wrote)", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except TokengraftError as e:  # bad input (2) or a failed check (1): one line, never a traceback
        print(f"tokengraft {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # read-only or full disk, permissions, a file where a folder should be
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"tokengraft {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        if sys.stdin is not stdin:
            sys.stdin.close()
            sys.stdin = stdin


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
