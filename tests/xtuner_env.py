"""Build, once per machine, the virtual environment in which real XTuner 0.2.0 runs (CPU).

XTuner 0.2.0 pins transformers 4.48.0 and mmengine 0.10.6, which cannot share an environment
with the project's transformers 5.x, so the real-XTuner tests run a script inside this separate
venv through a subprocess. The venv is several GB: it lives in the user cache and is reused.

Atomic and concurrent-safe: the venv is built in a temporary sibling folder and renamed into
place only when every install succeeded; an exclusive file lock serialises builders, so a second
pytest process waits for the first instead of building twice. Only `python -m ...` is used inside
(console-script shebangs keep the temporary path after the rename).

Run `python tests/xtuner_env.py` to build it ahead of the tests (prints the venv's python).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# torch/torchvision: the pair that exists here for x86_64 (torchvision is imported by
# xtuner.dataset; the project's CPU torch 2.13 has no matching torchvision).
REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "xtuner==0.2.0"]
# XTuner reads a DeepSpeed checkpoint folder with deepspeed's constants only: no ops are built
# (DS_BUILD_OPS=0), and its setup.py imports torch, so it installs after torch without isolation
DEEPSPEED = ["deepspeed==0.16.2"]
MARKER = "tokengraft-xtuner-venv.txt"  # written last: its presence means "complete"


class IndexUnreachable(RuntimeError):
    """pip could not reach the package index: tests skip with this reason."""


def venv_dir() -> Path:
    env = os.environ.get("TOKENGRAFT_XTUNER_VENV")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "tokengraft" / "xtuner-venv"


def venv_python(root: Path | None = None) -> Path:
    return (root or venv_dir()) / "bin" / "python"


def _marker_text() -> str:
    return "\n".join(REQUIREMENTS + DEEPSPEED) + "\n"


def is_ready(root: Path | None = None) -> bool:
    """Built, complete, and with today's requirements (a changed list rebuilds)."""
    root = root or venv_dir()
    try:
        return (root / MARKER).read_text() == _marker_text() and venv_python(root).exists()
    except OSError:
        return False


def _base_python() -> str:
    # Build from the interpreter behind the project's venv (same minor version as the wheels).
    return getattr(sys, "_base_executable", None) or sys.executable


def _looks_offline(text: str) -> bool:
    # network failures only: a missing version ("No matching distribution") with a reachable
    # index is a real error, not a reason to skip
    needles = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
               "Max retries exceeded", "Connection refused", "ConnectTimeoutError", "Name or service not known")
    return any(n in text for n in needles)


def _pip(py: Path, args: list[str], log) -> None:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=dict(os.environ, DS_BUILD_OPS="0"))
    log.write(p.stdout)
    log.flush()
    if p.returncode != 0:
        tail = "\n".join(p.stdout.splitlines()[-15:])
        if _looks_offline(p.stdout):
            raise IndexUnreachable(f"pip could not fetch {' '.join(args)}: {tail}")
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{tail}")


def ensure(log_path: Path | None = None) -> Path:
    """Return the venv's python, building the venv first if needed (minutes, once)."""
    root = venv_dir()
    if is_ready(root):
        return venv_python(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / (root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder finishes first; then we reuse its venv
        if is_ready(root):
            return venv_python(root)
        for stale in root.parent.glob(root.name + ".tmp-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        log_path = log_path or root.parent / (root.name + ".build.log")
        try:
            with open(log_path, "w") as log:
                subprocess.run([_base_python(), "-m", "venv", str(tmp)], check=True)
                py = venv_python(tmp)
                _pip(py, ["--upgrade", "pip"], log)
                _pip(py, REQUIREMENTS, log)
                if DEEPSPEED:
                    _pip(py, ["--no-build-isolation", *DEEPSPEED], log)
                (tmp / MARKER).write_text(_marker_text())
            if root.exists():  # an incomplete leftover (no marker): replace it
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return venv_python(root)


if __name__ == "__main__":
    print(ensure())
