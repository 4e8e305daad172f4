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


# -- convert correctness -----------------------------------------------------------------------------

def _save_tokenizer(smollm2_dir, folder: Path, added: list[str]) -> Path:
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for t in added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(folder)
    return folder


def test_tiny_tensor_is_not_a_vocabulary(tmp_path, smollm2_dir):
    """A [4, 3] 'embedding' converted to SmolLM2's 49,152-token vocabulary (rows by index): refused,
    not padded with 49,148 invented rows."""
    from safetensors.torch import save_file

    src = tmp_path / "tiny.safetensors"
    save_file({"model.embed_tokens.weight": torch.randn(4, 3)}, str(src))
    line = refused("convert", [src, Path(smollm2_dir)], tmp_path / "out", src, "--to", smollm2_dir,
                   "-o", tmp_path / "out")
    assert "model.embed_tokens.weight" in line and "4 rows" in line and "49152" in line


def _tiny_llava(folder: Path, smollm2_dir, hidden=8) -> Path:
    """A LLaVA-shaped folder (config + weights + tokenizer with <image>); weights tiny but real-shaped."""
    from safetensors.torch import save_file

    tok = _save_tokenizer(smollm2_dir, folder, ["<image>"])
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tok))
    image_id = n - 1
    cfg = {"model_type": "llava", "image_token_index": image_id, "vision_config": {"model_type": "clip_vision_model"},
           "text_config": {"model_type": "llama", "vocab_size": n, "tie_word_embeddings": False}}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    save_file({"model.language_model.embed_tokens.weight": torch.randn(n, hidden, generator=g),
               "lm_head.weight": torch.randn(n, hidden, generator=g),
               "model.multi_modal_projector.linear_1.weight": torch.randn(hidden, 4, generator=g)},
              str(folder / "model.safetensors"))
    return folder


def test_llava_to_vocabulary_without_image_token(tmp_path, smollm2_dir):
    """The target has <box> where the source had <image>: refuse, naming the image token."""
    src = _tiny_llava(tmp_path / "llava", smollm2_dir)
    target = _save_tokenizer(smollm2_dir, tmp_path / "box", ["<box>"])
    line = refused("convert", [src, target], tmp_path / "out", src, "--to", target, "-o", tmp_path / "out")
    assert "'<image>'" in line and "image_token_index" in line


def _tied_source(folder: Path, n: int, hidden=8) -> Path:
    """XTuner's save of a tied LLM: embed_tokens and lm_head, bit-identical, both in the state dict."""
    from safetensors.torch import save_file

    folder.mkdir()
    w = torch.randn(n, hidden, generator=torch.Generator().manual_seed(1))
    save_file({"llm.model.embed_tokens.weight": w, "llm.lm_head.weight": w.clone(),
               "llm.model.norm.weight": torch.ones(hidden)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("init", ["auto", "hewitt"])
def test_identical_embed_and_head_are_tied(tmp_path, smollm2_dir, init):
    """Two vocabulary keys with identical tensors: one new row per token, the same on both keys,
    and the manifest says tied."""
    from tokengraft.checkpoint import SafetensorsFile

    src = _tied_source(tmp_path / "src", 49152)
    target = _save_tokenizer(smollm2_dir, tmp_path / "tgt", ["<box>", "</box>", "<ref>"])
    r = run_cli("convert", src, "--to", target, "-o", tmp_path / "out", "--source-tokenizer", smollm2_dir,
                "--init", init)
    assert r.returncode == 0, r.stderr
    with SafetensorsFile(tmp_path / "out" / "model.safetensors") as f:
        emb, head = f.get("llm.model.embed_tokens.weight"), f.get("llm.lm_head.weight")
    assert emb.shape == (49155, 8) and torch.equal(emb, head)
    assert json.loads((tmp_path / "out" / "tokengraft.json").read_text())["tied"] is True


def test_untied_source_stays_untied(tmp_path, smollm2_dir):
    """The control: different embed and head tensors, no config: not tied, input side semantic."""
    from safetensors.torch import save_file

    from tokengraft.checkpoint.convert import convert

    (tmp_path / "src").mkdir()
    g = torch.Generator().manual_seed(2)
    save_file({"model.embed_tokens.weight": torch.randn(49152, 8, generator=g),
               "lm_head.weight": torch.randn(49152, 8, generator=g)}, str(tmp_path / "src" / "model.safetensors"))
    target = _save_tokenizer(smollm2_dir, tmp_path / "tgt", ["<box>"])
    rep = convert(tmp_path / "src", target, tmp_path / "out", source_tokenizer=smollm2_dir, log=lambda *a: None)
    assert rep.tied is False and rep.init["input:<box>"] == "subword" and rep.init["output:<box>"] == "mean"
    assert json.loads((tmp_path / "out" / "tokengraft.json").read_text())["tied"] is False


def test_optimizer_moments_matched_by_parameter_order(tmp_path, smollm2_dir):
    """mmengine-style iter_N.pth whose embedding and head have equal shapes: the head's moments are
    labelled as the head (parameter order), and each moment moves with its own parameter's rows."""
    from tokengraft.checkpoint.convert import convert

    n, h = 49152, 4
    g = torch.Generator().manual_seed(3)
    sd = {"llm.model.embed_tokens.weight": torch.randn(n, h, generator=g),
          "llm.model.norm.weight": torch.ones(h),
          "llm.lm_head.weight": torch.randn(n, h, generator=g)}
    state = {i: {"step": torch.tensor(7.0), "exp_avg": torch.full(v.shape, float(i + 1)),
                 "exp_avg_sq": torch.full(v.shape, float(i + 1) / 10)} for i, v in enumerate(sd.values())}
    torch.save({"meta": {"iter": 7}, "state_dict": sd,
                "optimizer": {"state": state, "param_groups": [{"lr": 1e-4, "params": [0, 1, 2]}]}},
               tmp_path / "iter_7.pth")
    target = _save_tokenizer(smollm2_dir, tmp_path / "tgt", ["<box>"])
    rep = convert(tmp_path / "iter_7.pth", target, tmp_path / "out", source_tokenizer=smollm2_dir,
                  log=lambda *a: None)
    moments = {r["key"]: r for r in rep.remapped if r["kind"] == "moment"}
    assert set(moments) == {"optimizer.state.0 (llm.model.embed_tokens.weight)",
                            "optimizer.state.2 (llm.lm_head.weight)"}
    assert moments["optimizer.state.2 (llm.lm_head.weight)"]["side"] == "output"
    assert any("by parameter order" in note for note in rep.notes)
    opt = rep.optimizer
    assert opt["state"][2]["exp_avg"].shape == (n + 1, h)
    assert torch.all(opt["state"][2]["exp_avg"][:n] == 3.0) and torch.all(opt["state"][2]["exp_avg"][n] == 0)
    assert torch.equal(opt["state"][1]["exp_avg"], state[1]["exp_avg"]) and opt["state"][0]["step"] == 7


def test_import_xtuner_extra_trained_rows_need_tokens(tmp_path, mistral_v1_dir):
    """An XTuner checkpoint whose LLM was resized by 3 rows (trained, saved in full) and no --tokens:
    the rows belong to tokens only the user can name, so refuse and say --tokens."""
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

    tok = AutoTokenizer.from_pretrained(mistral_v1_dir)
    lm = tiny_llama(tok, hidden=32)
    lm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=32, patch_size=8))
    clip.save_pretrained(tmp_path / "clip")
    lm.resize_token_embeddings(len(tok) + 3, mean_resizing=False)
    sd = {f"llm.{k}": v.detach().clone() for k, v in lm.state_dict().items()}
    sd.update({"projector.model.0.weight": torch.randn(64, 32), "projector.model.0.bias": torch.zeros(64),
               "projector.model.2.weight": torch.randn(32, 64), "projector.model.2.bias": torch.zeros(32)})
    torch.save({"meta": {"iter": 3}, "state_dict": sd}, tmp_path / "iter_3.pth")
    out = tmp_path / "out"
    line = refused("import-xtuner", [tmp_path / "iter_3.pth", tmp_path / "llm", tmp_path / "clip"], out,
                   tmp_path / "iter_3.pth", "--llm", tmp_path / "llm", "--visual-encoder", tmp_path / "clip",
                   "-o", out)
    assert "--tokens" in line and "3 trained vocabulary row(s)" in line


# -- round 3 (issue 23): the files transformers loads; optimizer states that contradict their parameters

@pytest.fixture(scope="module")
def tiny_folder(smollm2_dir, tmp_path_factory):
    """A tiny real Llama (SmolLM2's tokenizer) saved by transformers, single file and sharded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_llama(tok, hidden=16)
    root = tmp_path_factory.mktemp("tiny_folder")
    model.save_pretrained(root / "single")
    tok.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="400KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    return root


def test_doctor_reads_the_single_file_transformers_loads(tiny_folder, tmp_path):
    """NaN rows in model.safetensors, a clean index + shards left beside it: transformers loads the
    single file (so its model has NaN rows), and doctor must read that file too, not the index."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    d = tmp_path / "m"
    shutil.copytree(tiny_folder / "single", d)
    for p in (tiny_folder / "sharded").iterdir():
        if p.name.startswith("model"):
            shutil.copy(p, d / p.name)
    sd = load_file(d / "model.safetensors")
    sd["model.embed_tokens.weight"][5] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(d)
    assert torch.isnan(loaded.get_input_embeddings().weight[5]).all()  # what the user's model gets
    r = run_cli("doctor", d)
    bad = [ln for ln in r.stdout.splitlines() if ln.startswith("error") and "nonfinite-rows" in ln]
    assert r.returncode == 1 and bad and "model.embed_tokens.weight" in bad[0] and "(5 " in bad[0], r.stdout[-2000:]
    from tokengraft.checkpoint import read_state_dict

    got, info = read_state_dict(d)  # convert's reader agrees, and says what it ignored
    assert torch.isnan(got["model.embed_tokens.weight"][5]).all()
    assert any("model.safetensors.index.json beside it ignored" in n for n in info.notes)


def _iter_file(path: Path, moments: dict, params: list, n: int = 49152, h: int = 4) -> Path:
    g = torch.Generator().manual_seed(5)
    sd = {"llm.model.embed_tokens.weight": torch.randn(n, h, generator=g), "llm.model.norm.weight": torch.ones(h),
          "llm.lm_head.weight": torch.randn(n, h, generator=g)}
    state = {i: {"step": torch.tensor(3.0), **{k: torch.zeros(s) for k, s in m.items()}} for i, m in moments.items()}
    torch.save({"meta": {"iter": 3}, "state_dict": sd,
                "optimizer": {"state": state, "param_groups": [{"lr": 1e-4, "params": params}]}}, path)
    return path


OPTIM_CASES = {
    # the embedding's moments one row short: they belong to another vocabulary
    "shape": ({0: {"exp_avg": (49151, 4), "exp_avg_sq": (49151, 4)}, 1: {"exp_avg": (4,)}}, [0, 1, 2],
              "matches the shape of no tensor"),
    # matched by order (0 embed, 1 norm, 2 head) but state 1 holds a head-shaped moment: param order is off
    "order": ({0: {"exp_avg": (49152, 4)}, 1: {"exp_avg": (4,), "exp_avg_sq": (49152, 4)}}, [0, 1, 2],
              "moments of different shapes"),
    # a state for a parameter no param group lists (count)
    "count": ({0: {"exp_avg": (49152, 4)}, 7: {"exp_avg": (4,)}}, [0, 1, 2], "belongs to no param group"),
}


@pytest.mark.parametrize("case", sorted(OPTIM_CASES))
def test_optimizer_that_contradicts_its_parameters_is_refused(tmp_path, smollm2_dir, case):
    moments, params, needle = OPTIM_CASES[case]
    src = _iter_file(tmp_path / "iter_3.pth", moments, params)
    target = _save_tokenizer(smollm2_dir, tmp_path / "tgt", ["<box>"])
    line = refused("convert", [src, target], tmp_path / "out.pth", src, "--to", target, "-o", tmp_path / "out.pth",
                   "--source-tokenizer", smollm2_dir)
    assert needle in line and "optimizer state" in line, line


def _word_checkpoint(tmp_path, own: list[str]) -> tuple[Path, torch.Tensor]:
    from checkpoint_helpers import word_tokenizer
    from safetensors.torch import save_file

    ck = tmp_path / "ck"
    word_tokenizer(own).save_pretrained(ck)
    emb = torch.arange(len(own) * 4, dtype=torch.float32).view(len(own), 4)
    save_file({"model.embed_tokens.weight": emb, "lm_head.weight": emb + 0.5}, ck / "model.safetensors")
    return ck, emb


def test_explicit_source_tokenizer_wins_over_the_checkpoints_own(tmp_path):
    """A stale tokenizer left in the checkpoint folder (<a>,<b>) and --source-tokenizer saying the
    checkpoint was trained with <b>,<a>: the flag wins (rows follow it) and the report says the
    folder's own tokenizer differs, where. Before, the flag was silently ignored."""
    from checkpoint_helpers import word_tokenizer, words
    from safetensors.torch import load_file

    from tokengraft.checkpoint.convert import convert

    base = words(20)
    ck, emb = _word_checkpoint(tmp_path, base + ["<a>", "<b>"])
    word_tokenizer(base + ["<b>", "<a>"]).save_pretrained(tmp_path / "real")
    word_tokenizer(base + ["<a>", "<b>", "<c>"]).save_pretrained(tmp_path / "tgt")
    rep = convert(ck, tmp_path / "tgt", tmp_path / "out", source_tokenizer=tmp_path / "real", log=lambda *a: None)
    assert "as given: it wins over the checkpoint's own tokenizer" in rep.source_how, rep.source_how
    assert "differs (first at id 20: '<a>' vs '<b>')" in rep.source_how, rep.source_how
    out = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(out[:20], emb[:20]) and torch.equal(out[20], emb[21]) and torch.equal(out[21], emb[20])
    # the same tokenizer as the folder's: used, and said to agree
    rep = convert(ck, tmp_path / "tgt", tmp_path / "out2", source_tokenizer=ck, log=lambda *a: None)
    assert "as given (the same as the checkpoint's own tokenizer" in rep.source_how, rep.source_how


def test_source_tokenizer_and_source_tokens_together_conflict(tmp_path):
    from checkpoint_helpers import word_tokenizer, words

    ck, _ = _word_checkpoint(tmp_path, words(20) + ["<a>"])
    word_tokenizer(words(20) + ["<a>", "<b>"]).save_pretrained(tmp_path / "tgt")
    line = refused("convert", [ck, tmp_path / "tgt"], tmp_path / "out", ck, "--to", tmp_path / "tgt", "-o",
                   tmp_path / "out", "--source-tokenizer", ck, "--source-tokens", "<a>")
    assert "--source-tokenizer and --source-tokens both" in line and "pass one of them" in line, line
