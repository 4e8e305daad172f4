"""Bad inputs to the checkpoint commands (convert, import-xtuner), run as a user would: a real
subprocess, exit 2, ONE line on stderr naming the problem, no traceback, the inputs unchanged
(sha256 before/after) and nothing written at the output."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama


def _tree_hash(path: Path) -> dict[str, str]:
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "tokengraft", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def refused(cmd: str, inputs: list[Path], out: Path, *args) -> str:
    """Run ``tokengraft CMD *args``; assert a clean refusal; return the one stderr line."""
    before = {p: _tree_hash(p) for p in inputs}
    r = run_cli(cmd, *args)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith(f"tokengraft {cmd}: error: "), lines[0]
    assert not out.exists(), f"{out} was written"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, leftovers
    for p in inputs:
        assert _tree_hash(p) == before[p], f"{p} changed"
    return lines[0]


# -- safetensors limits ---------------------------------------------------------------------------

def _write_st(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _st_case(tmp_path, smollm2_dir, header, data=b"\0" * 24, header_len=None):
    src = _write_st(tmp_path / "bad.safetensors", header, data, header_len)
    return refused("convert", [src, Path(smollm2_dir)], tmp_path / "out", src, "--to", smollm2_dir,
                   "-o", tmp_path / "out")


def test_safetensors_shape_disagrees_with_offsets(tmp_path, smollm2_dir):
    line = _st_case(tmp_path, smollm2_dir,
                    {"model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 24]}})
    assert "bad.safetensors" in line and "model.embed_tokens.weight" in line and "48 bytes" in line


def test_safetensors_header_over_cap_says_cap(tmp_path, smollm2_dir):
    from tokengraft.checkpoint.safetensors import HEADER_CAP

    line = _st_case(tmp_path, smollm2_dir, {}, header_len=HEADER_CAP + 1)
    assert "cap" in line and str(HEADER_CAP + 1) in line and "truncated" not in line


def test_safetensors_negative_offset(tmp_path, smollm2_dir):
    line = _st_case(tmp_path, smollm2_dir,
                    {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [-24, 0]}})
    assert "'w'" in line and "data_offsets" in line


def test_safetensors_offsets_past_end_of_file(tmp_path, smollm2_dir):
    line = _st_case(tmp_path, smollm2_dir,
                    {"w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}}, data=b"\0" * 24)
    assert "'w'" in line and "past the end" in line


def test_safetensors_overlap_and_unknown_dtype(tmp_path):
    """In-process: overlapping tensors and an unknown dtype are one-line CheckpointErrors naming the key."""
    from tokengraft.checkpoint import CheckpointError, SafetensorsFile

    p = _write_st(tmp_path / "o.safetensors", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                                               "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}},
                  b"\0" * 20)
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        SafetensorsFile(p)
    p = _write_st(tmp_path / "d.safetensors", {"a": {"dtype": "Q4", "shape": [3], "data_offsets": [0, 12]}},
                  b"\0" * 12)
    with pytest.raises(CheckpointError, match="'a' has dtype 'Q4'"):
        SafetensorsFile(p)


def test_safetensors_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    from tokengraft.checkpoint import SafetensorsFile

    t = {"w": torch.randn(10, 3), "b": torch.arange(5).to(torch.bfloat16), "s": torch.tensor(3.0)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert sorted(f.keys()) == ["b", "s", "w"] and f.metadata == {"format": "pt"}
        assert f.shape("w") == (10, 3) and f.dtype("b") == torch.bfloat16
        for k in t:
            assert torch.equal(f.get(k), t[k])
        assert torch.equal(f.rows("w", 2, 5), t["w"][2:5])
        assert torch.equal(f.take("w", [7, 1, 2, 3, 9]), t["w"][[7, 1, 2, 3, 9]])
