"""Run every benchmark (invisibility, convert, train rewrite their own section of bench/RESULTS.md;
quality and many_tokens print tables that go there by hand, with the command that produced them).

    .venv/bin/python bench/run_all.py            # or: make bench
    .venv/bin/python bench/run_all.py --quick    # smaller sizes, for a smoke run

Each benchmark runs in its own process, so one's memory does not count against another's.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
QUICK_MD = "/tmp/tokengraft-bench-quick.md"  # quick runs do not touch RESULTS.md
BENCHES = [  # (script, full args, quick args)
    ("invisibility.py", [], ["--no-write"]),
    ("convert.py", [], ["--small"]),
    ("train.py", [], ["--steps", "4", "--rounds", "1", "--results", QUICK_MD]),
    ("quality.py", [], ["--quick", "--inits", "tokengraft:auto,transformers"]),
    ("many_tokens.py", [], ["--ks", "8,100"]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run; figures not for RESULTS.md)")
    ap.add_argument("--only", default=None, help="comma-separated subset, e.g. invisibility,convert")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    failed = []
    for script, full, quick in BENCHES:
        name = script[:-3]
        if only and name not in only:
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"### {name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
