"""Untrusted input: pickled code never runs; corrupt files fail with one clear line and leave nothing."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from checkpoint_helpers import word_tokenizer, words

from tokengraft.checkpoint import CheckpointError, UnsafeCheckpointError, read_state_dict, safe_load
from tokengraft.checkpoint.remap import RemapError, remap_state_dict


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this with pickle.load would create the file
        return (open, (self.path, "w"))


class RunsAShellCommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_not_executed(tmp_path):
    hit1, hit2 = tmp_path / "pwned-open", tmp_path / "pwned-system"
    torch.save({"model.embed_tokens.weight": torch.ones(4, 2), "evil": WritesAFile(str(hit1)),
                "nested": {"x": [RunsAShellCommand(str(hit2))]}}, tmp_path / "evil.pt")
    obj = safe_load(tmp_path / "evil.pt")
    assert not hit1.exists() and not hit2.exists()
    assert torch.equal(obj["model.embed_tokens.weight"], torch.ones(4, 2))
    assert repr(obj["evil"]).startswith("<inert")
    sd, info = read_state_dict(tmp_path / "evil.pt")
    assert list(sd) == ["model.embed_tokens.weight"]
    assert any("open" in n for n in info.inert) and any("system" in n for n in info.inert)
    assert not hit1.exists() and not hit2.exists()


def test_tensors_from_a_pickle_never_write_back(tmp_path):
    torch.save({"w": torch.zeros(8)}, tmp_path / "a.pt")
    before = (tmp_path / "a.pt").read_bytes()
    sd, _ = read_state_dict(tmp_path / "a.pt")
    sd["w"] += 1  # copy-on-write mapping: the file is untouched
    assert (tmp_path / "a.pt").read_bytes() == before


def test_truncated_safetensors_clear_error_and_no_output(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "ck"
    src.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(10, 4), "lm_head.weight": torch.randn(10, 4)},
              src / "model.safetensors")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-7])
    word_tokenizer(words(10)).save_pretrained(src)
    target = tmp_path / "target"
    word_tokenizer(words(10) + ["<x>"]).save_pretrained(target)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tokengraft", "convert", str(src), "--to", str(target), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0] and "model.safetensors" in err[0], r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ck", "target"]


def test_index_pointing_at_missing_shard(tmp_path):
    import json

    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing shard.*00002"):
        read_state_dict(tmp_path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"hello world")
    with pytest.raises(UnsafeCheckpointError, match="not a torch checkpoint"):
        safe_load(tmp_path / "x.pth")


def test_unexplained_vocabulary_sized_tensor_is_an_error():
    sd = {"model.embed_tokens.weight": torch.randn(10, 4), "lm_head.weight": torch.randn(10, 4),
          "model.mystery_table": torch.randn(3, 10)}
    with pytest.raises(RemapError, match="mystery_table.*vocabulary-sized"):
        remap_state_dict(sd, words(10), words(10) + ["<x>"])
    # the same tensor is fine when nothing moves
    out, rep = remap_state_dict(sd, words(10), words(10))
    assert torch.equal(out["model.mystery_table"], sd["model.mystery_table"])


def test_vocabulary_tensor_with_integer_dtype_is_an_error():
    sd = {"model.embed_tokens.weight": torch.ones(10, 4, dtype=torch.int64)}
    with pytest.raises(RemapError, match="dtype"):
        remap_state_dict(sd, words(10), words(10) + ["<x>"])


def test_storage_types_of_old_cuda_files_keep_their_dtype():
    from tokengraft.checkpoint import safe_pickle

    assert safe_pickle._safe_global("torch.cuda", "HalfStorage").dtype == torch.float16
    assert safe_pickle._safe_global("torch", "BFloat16Storage").dtype == torch.bfloat16
    assert issubclass(safe_pickle._safe_global("torch.cuda", "Event"), safe_pickle.Placeholder)
    assert issubclass(safe_pickle._safe_global("builtins", "eval"), safe_pickle.Placeholder)


def test_tensor_views_and_shared_storage_survive(tmp_path):
    base = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    torch.save({"a": base, "t": base.t(), "row": base[1]}, tmp_path / "v.pt")
    obj = safe_load(tmp_path / "v.pt")
    assert torch.equal(obj["t"], base.t()) and torch.equal(obj["row"], base[1]) and obj["a"].dtype == torch.float16
