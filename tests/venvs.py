"""Cached virtual environments for tests that need another transformers (or XTuner) than ours.

An ``Env`` names a folder under the user cache (``~/.cache/tokengraft/NAME``) and the pip install
steps that build it, in order (torch first, pinned, so nothing pulls a CUDA build). Built once per
machine, reused after; a changed step list rebuilds.

Atomic and concurrent-safe: the venv is built in a temporary sibling folder and renamed into
place only when every install succeeded; an exclusive file lock serialises builders, so a second
pytest process waits for the first instead of building twice. Only ``python -m ...`` is used
inside (console-script shebangs keep the temporary path after the rename).

``python tests/venvs.py [NAME ...]`` builds them ahead of the tests (prints each venv's python).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MARKER_SUFFIX = "-venv.txt"  # the marker file is written last: its presence means "complete"


class IndexUnreachable(RuntimeError):
    """pip could not reach the package index: tests skip with this reason."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokengraft"


def base_python() -> str:
    # build from the interpreter behind the project's venv (same minor version as the wheels)
    return getattr(sys, "_base_executable", None) or sys.executable


def looks_offline(text: str) -> bool:
    # network failures only: a missing version ("No matching distribution") with a reachable
    # index is a real error, not a reason to skip
    needles = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
               "Max retries exceeded", "Connection refused", "ConnectTimeoutError", "Name or service not known")
    return any(n in text for n in needles)


def pip_install(py: Path, args: list[str], log, env: dict | None = None) -> None:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=dict(os.environ, **(env or {})))
    log.write(p.stdout)
    log.flush()
    if p.returncode != 0:
        tail = "\n".join(p.stdout.splitlines()[-15:])
        if looks_offline(p.stdout):
            raise IndexUnreachable(f"pip could not fetch {' '.join(args)}: {tail}")
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{tail}")


@dataclass(frozen=True)
class Env:
    name: str                                  # folder name under the cache root
    steps: tuple[tuple[str, ...], ...]         # pip install argument lists, run in order
    env_var: str | None = None                 # an environment variable that points elsewhere
    pip_env: dict = field(default_factory=dict)  # extra environment for pip (e.g. DS_BUILD_OPS=0)
    marker: str | None = None                  # marker file name (default NAME-venv.txt)

    def dir(self) -> Path:
        if self.env_var and os.environ.get(self.env_var):
            return Path(os.environ[self.env_var])
        return cache_root() / self.name

    def python(self, root: Path | None = None) -> Path:
        return (root or self.dir()) / "bin" / "python"

    def marker_name(self) -> str:
        return self.marker or f"tokengraft-{self.name}{MARKER_SUFFIX}"

    def marker_text(self) -> str:
        return "\n".join(" ".join(s) for s in self.steps) + "\n"

    def is_ready(self, root: Path | None = None) -> bool:
        """Built, complete, and with today's steps (a changed list rebuilds)."""
        root = root or self.dir()
        try:
            return (root / self.marker_name()).read_text() == self.marker_text() and self.python(root).exists()
        except OSError:
            return False

    def ensure(self, log_path: Path | None = None) -> Path:
        """The venv's python, building the venv first if needed (minutes, once)."""
        root = self.dir()
        if self.is_ready(root):
            return self.python(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / (root.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another builder finishes first; then we reuse its venv
            if self.is_ready(root):
                return self.python(root)
            for stale in root.parent.glob(root.name + ".tmp-*"):  # left by a killed build (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
            try:
                self._build(tmp, log_path or root.parent / (root.name + ".build.log"))
                if root.exists():  # an incomplete leftover (no marker): replace it
                    shutil.rmtree(root)
                tmp.rename(root)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return self.python(root)

    def _build(self, tmp: Path, log_path: Path) -> None:
        with open(log_path, "w") as log:
            subprocess.run([base_python(), "-m", "venv", str(tmp)], check=True)
            py = self.python(tmp)
            pip_install(py, ["--upgrade", "pip"], log, self.pip_env)
            for step in self.steps:
                pip_install(py, list(step), log, self.pip_env)
            (tmp / self.marker_name()).write_text(self.marker_text())


# What a folder needs to be loaded (tokenizer, model, LLaVA processor with an image): the ends of
# the supported range (4.48: XTuner 0.2.0; 5.20: vLLM 0.33) and the last 4.x (LLaMA-Factory, lmdeploy).
# torch 2.13.0 is the local CPU wheel; installed first, nothing pulls CUDA.
_READER = ("tokenizers", "safetensors", "sentencepiece", "protobuf", "pillow", "numpy")
COMPAT = {
    "4.48": Env("compat-tf4.48", (("torch==2.13.0",), ("transformers==4.48.0", *_READER))),
    "4.57": Env("compat-tf4.57", (("torch==2.13.0",), ("transformers==4.57.6", *_READER))),
    "5.20": Env("compat-tf5.20", (("torch==2.13.0",), ("transformers==5.20.2", *_READER))),
}


if __name__ == "__main__":
    for name in sys.argv[1:] or sorted(COMPAT):
        print(COMPAT[name].ensure())
