"""Training on a LLaVA (real SmolLM2 + small CLIP tower) with a generated grounding dataset over
real photos: each mode learns, `rows` touches nothing else, resume = uninterrupted, DDP = 1 process.

Kept lean for a 2-core machine: batch 4, short chatml prompts, 2-4 steps per run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def grounding(tmp_path_factory):
    from tokengraft.demo.data import make_grounding_dataset

    return make_grounding_dataset(tmp_path_factory.mktemp("grounding"), n_train=16, n_eval=2, bins=4, seed=0)


def config(llava_dir, data, out, **kw):
    from tokengraft.train.config import TrainConfig

    base = dict(model=str(llava_dir), data=str(data["train"]), image_folder=str(data["image_folder"]),
                tokens=data["tokens"], init="mean", template="chatml", output_dir=str(out), batch_size=4,
                max_steps=4, lr=2e-2, logging_steps=1, save_steps=100, progress=False, tensorboard=False,
                max_length=128)
    base.update(kw)
    return TrainConfig(**base)


def metrics(run):
    from tokengraft.train.metrics import read_metrics

    return [r for r in read_metrics(run) if "new_token_loss" in r]


def rows_of(run):
    return load_file(str(Path(run) / "new_rows.safetensors"))


def falls(run):
    m = metrics(run)
    first, last = m[0]["new_token_loss"], m[-1]["new_token_loss"]
    assert last < 0.7 * first, [r["new_token_loss"] for r in m]


@pytest.fixture(scope="module")
def whole(llava_dir, grounding, tmp_path_factory):
    """One uninterrupted `rows` run of 4 steps (checkpoint at 2) that several tests compare against."""
    from tokengraft.train.loop import train

    out = tmp_path_factory.mktemp("whole") / "run"
    return train(config(llava_dir, grounding, out, save_steps=2, eval_data=str(grounding["eval"]),
                        eval_max_new_tokens=12))


def test_rows_mode_learns_and_touches_nothing_else(whole, grounding):
    from tokengraft.train.run import RunInfo, load_run, rebuild_base

    run = whole
    falls(run)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_new_precision" in r for r in recs) and (run / "new_tokens.png").stat().st_size > 1000
    assert {"new_row_norm", "base_row_norm", "new_token_acc"} <= set(metrics(run)[-1])
    # checkpoint holds only the rows: kilobytes
    assert (run / "new_rows.safetensors").stat().st_size < 100_000
    assert not (run / "model.safetensors").exists() and not (run / "adapter").exists()

    trained, tok, _, manifest = load_run(run)
    fresh, tok2, _, _ = rebuild_base(RunInfo.load(run))
    ids = torch.tensor(tok.convert_tokens_to_ids(grounding["tokens"]))
    a, b = trained.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if a[k].shape[0] == trained.get_input_embeddings().weight.shape[0] and a[k].ndim == 2:
            other = torch.ones(a[k].shape[0], dtype=torch.bool)
            other[ids] = False
            assert torch.equal(a[k][other], b[k][other]), k  # base rows bit-identical
            assert not torch.equal(a[k][ids], b[k][ids]), k  # the new rows moved
        else:
            assert torch.equal(a[k], b[k]), k
    # tied stays tied, and the merged model is what the run recorded
    assert manifest.tied and trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
    saved = rows_of(run)["embed"]
    assert torch.allclose(trained.get_input_embeddings().weight[ids].float(), saved, atol=1e-6)


def test_lora_mode_learns_without_full_matrices(llava_dir, grounding, tmp_path):
    from tokengraft.train.run import load_run
    from tokengraft.train.loop import train

    run = train(config(llava_dir, grounding, tmp_path / "lora", mode="lora", lr=5e-3, rows_lr=2e-2, max_steps=3))
    falls(run)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    rows = {k for k in adapter if k.endswith("token_adapter.trainable_tokens_delta")}
    assert rows and all("lora_" in k for k in set(adapter) - rows)  # no modules_to_save copies
    assert max(t.numel() for t in adapter.values()) < 49152 * 576 // 10
    cfgj = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert not cfgj.get("modules_to_save") and cfgj["trainable_token_indices"]
    model, tok, _, _ = load_run(run)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged
    # PEFT alone (on the LLaVA, tied through its text_config) gives the merged model's logits
    from peft import PeftModel

    from tokengraft.train.run import RunInfo, rebuild_base

    grafted, _, _, _ = rebuild_base(RunInfo.load(run))
    peft = PeftModel.from_pretrained(grafted, str(run / "adapter")).eval()
    ids = torch.tensor([tok("Where? <box><loc_1></box> and plain words", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = peft(input_ids=ids).logits, model(input_ids=ids).logits
    # merging LoRA into 30 layers reorders fp32 sums (~2e-6 relative on logits of ~30); rows PEFT did
    # not carry would be off by whole units (6.0 in issue 13)
    assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item() / 10), (a - b).abs().max()


def test_full_mode_learns_and_keeps_vision_frozen(llava_dir, grounding, tmp_path):
    from tokengraft.train.run import RunInfo, load_run, rebuild_base
    from tokengraft.train.loop import train

    run = train(config(llava_dir, grounding, tmp_path / "full", mode="full", lr=1e-4, rows_lr=2e-2, max_steps=3))
    falls(run)
    full = load_file(str(run / "model.safetensors"))
    assert not any("vision_tower" in k for k in full)
    trained, _, _, _ = load_run(run)
    fresh, _, _, _ = rebuild_base(RunInfo.load(run))
    a, b = trained.state_dict(), fresh.state_dict()
    vision = [k for k in a if "vision_tower" in k]
    assert len(vision) > 10  # the LLaVA's tower is there (an empty list would make the next line vacuous)
    assert [k for k in vision if not torch.equal(a[k], b[k])] == []
    assert any(not torch.equal(a[k], b[k]) for k in a if "layers.0.self_attn.q_proj" in k)


def test_resume_equals_uninterrupted_and_remaps_changed_tokens(llava_dir, grounding, whole, tmp_path):
    from tokengraft.train.loop import train

    cut = tmp_path / "cut"
    train(config(llava_dir, grounding, cut, save_steps=2, stop_after=2))
    assert (cut / "checkpoint-2" / "optimizer.pt").exists() and not (cut / "checkpoint-4").exists()
    train(config(llava_dir, grounding, cut, save_steps=2, resume=True))
    a, b = rows_of(whole)["embed"], rows_of(cut)["embed"]
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    la = {r["step"]: r["loss"] for r in metrics(whole)}
    lb = {r["step"]: r["loss"] for r in metrics(cut)}
    assert abs(la[4] - lb[4]) < 1e-3 * abs(la[4])

    # resume after the token set changed: rows move by token identity, the new token starts fresh
    from tokengraft.train.run import read_rows

    toks = grounding["tokens"]
    changed = [t for t in toks if t != "<loc_3>"]
    changed.insert(2, "<sep>")
    ck_tokens, ck_rows = read_rows(cut / "checkpoint-2")
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(cut / "checkpoint-2", moved / "checkpoint-2")
    shutil.copy(cut / "run.json", moved / "run.json")
    run = train(config(llava_dir, grounding, moved, tokens=changed, max_steps=2, resume=True,
                       allow_missing_tokens=True, allow_text_tags=True))
    got_tokens, got = read_rows(run)
    assert got_tokens == changed
    for t in changed:
        if t in ck_tokens:
            assert torch.allclose(got["embed"][changed.index(t)], ck_rows["embed"][ck_tokens.index(t)], atol=1e-6), t
    assert not torch.allclose(got["embed"][changed.index("<sep>")], ck_rows["embed"][0])


def test_torchrun_two_processes_equal_one(llava_dir, grounding, whole, tmp_path):
    """Two gloo processes with batch 2 each = one process with batch 4 (the `whole` run's step 2)."""
    import yaml

    one = whole / "checkpoint-2"
    cfg = {k: v for k, v in vars(config(llava_dir, grounding, tmp_path / "two", max_steps=2, batch_size=2)).items()}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tokengraft", "train",
                           str(tmp_path / "cfg.yaml")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = rows_of(one)["embed"], rows_of(tmp_path / "two")["embed"]
    # gloo sums gradients in another order than one process does: float noise, amplified a little
    # by Adam's normalization; rows that learned differently would differ by ~lr = 2e-2
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (a - rows_of(whole)["embed"]).abs().max() > 1e-3  # steps 3-4 moved the rows well beyond that


def test_load_run_refuses_a_changed_or_missing_base(whole, smollm2_dir, tmp_path):
    import shutil

    from tokengraft.train.run import RunError, RunInfo, load_run

    run = tmp_path / "run"
    shutil.copytree(whole, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    info = RunInfo.load(run)
    info.base_model = str(smollm2_dir)  # another vocabulary (no <image>)
    info.save(run)
    with pytest.raises(RunError, match="changed since training"):
        load_run(run)
    info.base_model = str(tmp_path / "gone")
    info.save(run)
    with pytest.raises(RunError, match="does not exist"):
        load_run(run)
    with pytest.raises(RunError, match="neither trained parts"):
        load_run(tmp_path)
