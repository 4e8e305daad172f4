"""Write one section of bench/RESULTS.md (``## name``), leaving the other sections alone."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"


def update_section(name: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section: the command that produced it, the machine, the figures.\n"
    block = f"## {name}\n\n{body.strip()}\n"
    pat = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(lambda _: block + "\n", text) if pat.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)
