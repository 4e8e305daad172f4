"""The `tokengraft` command: thin. Each subcommand lives in ``tokengraft/commands/<name>.py`` with
``register(subparsers)`` (its --help) and ``run(args) -> int``; no logic lives here."""
from __future__ import annotations

import argparse
import importlib
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
    from . import __version__

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
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("tokengraft: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:  # expected: one line, exit 2
        if isinstance(e, RuntimeError) and not _ours(e):
            raise
        print(f"tokengraft {args.command}: error: {e}", file=sys.stderr)
        return 2


def _ours(e: BaseException) -> bool:
    return type(e).__module__.startswith("tokengraft")


if __name__ == "__main__":
    sys.exit(main())
