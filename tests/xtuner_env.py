"""The virtual environment in which real XTuner 0.2.0 runs (CPU), built once per machine.

XTuner 0.2.0 pins transformers 4.48.0 and mmengine 0.10.6; tokengraft installs beside them
(docs/xtuner-continue.md), and tests/test_xtuner_real.py runs XTuner *and* tokengraft there
through subprocesses. The venv is several GB: it lives in the user cache and is reused. It is one
of the cached environments of ``tests/venvs.py`` (atomic build in a temporary sibling, a file lock
so concurrent builders build once, ``python -m ...`` only inside).

Run ``python tests/xtuner_env.py`` to build it ahead of the tests (prints the venv's python).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from venvs import Env, IndexUnreachable, looks_offline  # noqa: E402,F401  (IndexUnreachable: public here)

# torch/torchvision: the pair that exists here for x86_64 (torchvision is imported by
# xtuner.dataset; the project's CPU torch 2.13 has no matching torchvision).
REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "xtuner==0.2.0"]
# XTuner reads a DeepSpeed checkpoint folder with deepspeed's constants only: no ops are built
# (DS_BUILD_OPS=0), and its setup.py imports torch, so it installs after torch without isolation
DEEPSPEED = ["deepspeed==0.16.2"]
MARKER = "tokengraft-xtuner-venv.txt"  # written last: its presence means "complete"
_looks_offline = looks_offline


class _XTunerEnv(Env):
    def marker_text(self) -> str:
        # one requirement a line, as the first builds wrote it: a cached venv stays valid
        return "\n".join(r for step in self.steps for r in step if not r.startswith("-")) + "\n"


def _env() -> _XTunerEnv:
    # built from the module's lists at call time (tests swap them for a fake build)
    return _XTunerEnv("xtuner-venv", (tuple(REQUIREMENTS), ("--no-build-isolation", *DEEPSPEED)),
                      env_var="TOKENGRAFT_XTUNER_VENV", pip_env={"DS_BUILD_OPS": "0"}, marker=MARKER)


def venv_dir() -> Path:
    return _env().dir()


def venv_python(root: Path | None = None) -> Path:
    return _env().python(root)


def is_ready(root: Path | None = None) -> bool:
    """Built, complete, and with today's requirements (a changed list rebuilds)."""
    return _env().is_ready(root)


def ensure(log_path: Path | None = None) -> Path:
    """Return the venv's python, building the venv first if needed (minutes, once)."""
    return _env().ensure(log_path)


if __name__ == "__main__":
    print(ensure())
