"""Every docs page's worked example runs: blocks fenced as ```bash ci are executed in order, in a
scratch folder, with the project's virtualenv first on PATH. A failing example fails CI."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```bash ci\n(.*?)^```", re.S | re.M)


def pages():
    return sorted(p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))


def test_every_capability_page_has_a_ci_example():
    have = {p.stem for p in pages()}
    for page in ("add", "doctor", "convert", "train", "export", "xtuner", "demo"):
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md missing"
        assert page in have, f"docs/{page}.md has no ```bash ci example"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.stem)
def test_docs_example_runs(page, tmp_path, smollm2_dir):
    script = "set -euo pipefail\n" + "\n".join(BLOCK.findall(page.read_text()))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", TOKENGRAFT_DOCS_CI="1")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"docs/{page.name} example failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
