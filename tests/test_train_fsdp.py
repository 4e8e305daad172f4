"""FSDP2 (`--fsdp`) training in every mode: real torchrun subprocesses, gloo on CPU, tiny Llama models
with the real SmolLM2 tokenizer. Two FSDP processes at batch 2 equal one process at batch 4 (rows,
lora, full; tied and untied heads); FSDP checkpoints resume under FSDP and in one process; FSDP
runs export to plain transformers folders with the one-process run's logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun_helpers import ATOL, assert_export_has_the_rows, cfg, close, exported, make_assets, rows, single, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(smollm2_dir, tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("fsdp"), smollm2_dir)


@pytest.fixture(scope="module")
def one_untied(assets, tmp_path_factory):
    return single(cfg(assets, "untied", tmp_path_factory.mktemp("one") / "run"))


@pytest.fixture(scope="module")
def fsdp_untied(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_untied")
    proc = torchrun(cfg(assets, "untied", tmp / "run", batch_size=2), tmp, "--fsdp")
    assert "FSDP2-sharded modules" in proc.stdout and " 0 FSDP2" not in proc.stdout, proc.stdout[-2000:]
    return tmp / "run"


def test_fsdp_rows_untied_equal_one_process(one_untied, fsdp_untied):
    a, b = rows(one_untied), rows(fsdp_untied)
    close(a, b)
    assert set(a) == {"embed", "head"}
    fresh = rows(one_untied / "checkpoint-2")
    assert (a["embed"] - fresh["embed"]).abs().max() > 1e-3  # step 3 moved the rows well beyond ATOL
    # the checkpoint holds the rows and a whole-tensor optimizer state, never the full model
    ck = fsdp_untied / "checkpoint-2"
    assert (ck / "optimizer.pt").is_file() and not list(ck.glob("pytorch_model_fsdp*"))
    m = [json.loads(x) for x in (fsdp_untied / "metrics.jsonl").read_text().splitlines()]
    peaks = [r for r in m if "peak_mem_mb_rank1" in r]
    assert peaks and all(r["peak_mem_mb_rank0"] > 0 and r["peak_mem_mb_rank1"] > 0 for r in peaks)


def test_fsdp_rows_tied_equal_one_process(assets, tmp_path):
    one = single(cfg(assets, "tied", tmp_path / "one"))
    torchrun(cfg(assets, "tied", tmp_path / "two", batch_size=2), tmp_path, "--fsdp")
    a, b = rows(one), rows(tmp_path / "two")
    assert set(a) == {"embed"}
    close(a, b)


def test_fsdp_checkpoint_resumes_under_fsdp_and_in_one_process(assets, one_untied, fsdp_untied, tmp_path):
    # under FSDP: stop after 2 steps, resume to 3
    c = cfg(assets, "untied", tmp_path / "cut", batch_size=2)
    torchrun(c, tmp_path, "--fsdp", "--stop-after", "2")
    assert not (tmp_path / "cut" / "checkpoint-3").exists()
    torchrun(c, tmp_path, "--fsdp", "--resume")
    close(rows(tmp_path / "cut"), rows(one_untied))
    # in one process, from the FSDP run's checkpoint-2 (whole-tensor optimizer state)
    moved = tmp_path / "moved"
    shutil.copytree(fsdp_untied / "checkpoint-2", moved / "checkpoint-2")
    shutil.copy(fsdp_untied / "run.json", moved / "run.json")
    single(cfg(assets, "untied", moved, resume=True))
    close(rows(moved), rows(one_untied))


def test_export_of_an_fsdp_run(fsdp_untied, tmp_path):
    assert_export_has_the_rows(fsdp_untied, tmp_path / "hf")


def test_fsdp_outside_torchrun_is_refused(assets, tmp_path):
    from tokengraft.train.config import TrainError

    with pytest.raises(TrainError, match="torchrun"):
        single(cfg(assets, "untied", tmp_path / "r", fsdp=True))
    assert not (tmp_path / "r").exists()



# -- lora and full ------------------------------------------------------------------------------
# full: every weight at lr 1e-3 (the rows at 2e-2); lora: the LoRA matrices at 1e-2. One step moves a
# weight by about its lr (Adam), so ATOL = 1e-4 still tells a different update from float noise.
MODES = {"full": {"mode": "full", "lr": 1e-3, "rows_lr": 2e-2}, "lora": {"mode": "lora", "lr": 1e-2, "rows_lr": 2e-2}}


def trained(run, mode) -> dict:
    """Every tensor a run trained: the rows, and the full weights or the PEFT adapter file."""
    run = Path(run)
    out = {f"rows.{k}": v for k, v in rows(run).items()}
    if mode == "full":
        out.update({f"full.{k}": v for k, v in load_file(str(run / "model.safetensors")).items()})
    if mode == "lora":
        out.update({f"lora.{k}": v for k, v in load_file(str(run / "adapter" / "adapter_model.safetensors")).items()})
    return out


@pytest.fixture(scope="module")
def pairs(assets, tmp_path_factory):
    """(one-process run, two-process FSDP run) per (mode, head), built once."""
    made = {}

    def get(mode, head):
        if (mode, head) not in made:
            tmp = tmp_path_factory.mktemp(f"{mode}_{head}")
            one = single(cfg(assets, head, tmp / "one", **MODES[mode]))
            proc = torchrun(cfg(assets, head, tmp / "two", batch_size=2, **MODES[mode]), tmp, "--fsdp")
            assert "FSDP2-sharded modules" in proc.stdout and " 0 FSDP2" not in proc.stdout, proc.stdout[-2000:]
            made[mode, head] = (one, tmp / "two")
        return made[mode, head]

    return get


@pytest.mark.parametrize("mode,head", [("full", "untied"), ("full", "tied"), ("lora", "untied"), ("lora", "tied")])
def test_fsdp_lora_full_equal_one_process(pairs, mode, head):
    one, two = pairs(mode, head)
    a, b = trained(one, mode), trained(two, mode)
    close(a, b)
    before = trained(one / "checkpoint-2", mode)
    groups = {k.split(".")[0] for k in a}
    assert groups == {"rows", mode}
    for g in groups:  # the last step moved every group well beyond ATOL, so equality is not vacuous
        assert max((a[k] - before[k]).abs().max().item() for k in a if k.startswith(g)) > 10 * ATOL, g
    if mode == "full":
        n_params = sum(v.numel() for k, v in a.items() if k.startswith("full."))
        assert n_params > 1e6  # whole tensors (the 49k x 64 embedding alone is 3.1M), not one rank's shard
        # the shield: the base matrices' rows of the new tokens never moved (they train as deltas),
        # while the rows of tokens in the data did
        from transformers import AutoTokenizer

        new = AutoTokenizer.from_pretrained(two).convert_tokens_to_ids(["<loc_0>", "<loc_1>", "<loc_2>", "<loc_3>"])
        mats = [k for k in a if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")]
        assert len(mats) == (1 if head == "tied" else 2), mats
        for k in mats:
            assert torch.equal(b[k][new], before[k][new]), k
            assert not torch.equal(b[k], before[k]), k


@pytest.mark.parametrize("mode,head", [("full", "untied"), ("lora", "tied")])
def test_fsdp_lora_full_checkpoints_resume_under_fsdp_and_in_one_process(assets, pairs, tmp_path, mode, head):
    one, two = pairs(mode, head)
    # under FSDP: stop after 2 steps, resume to 3 (weights loaded before sharding, Adam moments re-sharded)
    c = cfg(assets, head, tmp_path / "cut", batch_size=2, **MODES[mode])
    torchrun(c, tmp_path, "--fsdp", "--stop-after", "2")
    assert not (tmp_path / "cut" / "checkpoint-3").exists()
    torchrun(c, tmp_path, "--fsdp", "--resume")
    close(trained(tmp_path / "cut", mode), trained(one, mode))
    # in one process, from the FSDP run's checkpoint-2
    moved = tmp_path / "moved"
    shutil.copytree(two / "checkpoint-2", moved / "checkpoint-2")
    shutil.copy(two / "run.json", moved / "run.json")
    single(cfg(assets, head, moved, resume=True, **MODES[mode]))
    close(trained(moved, mode), trained(one, mode))


def export_logits(run, tmp_path, name):
    model, tok = exported(run, tmp_path / name)
    ids = tok("Where is item 7? It is at <loc_3><loc_1> near the door.", return_tensors="pt").input_ids
    assert len(set(ids[0].tolist()) & set(tok.convert_tokens_to_ids(["<loc_1>", "<loc_3>"]))) == 2
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("mode,head", [("full", "untied"), ("lora", "tied")])
def test_export_of_fsdp_lora_and_full_runs(pairs, tmp_path, mode, head):
    one, two = pairs(mode, head)
    a, b = export_logits(one, tmp_path, "one"), export_logits(two, tmp_path, "two")
    start = export_logits(one / "checkpoint-2", tmp_path, "start")
    # weights equal within 1e-4 give logits within 1e-3 here; a step of training moves them far more
    assert (a - b).abs().max() < 1e-3, (a - b).abs().max()
    assert (a - start).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [False, True])
def test_full_mode_shield_zeroes_base_rows_and_nothing_else(tied):
    """The shield (full mode) works in the forward: the base matrices get no gradient on the new
    rows, and every other gradient (hidden states, layers, other rows, deltas) is what it is
    without the shield."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokengraft.train.params import prepare

    def grads(shield):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
        plan = prepare(model, "full", [90, 91], tied)
        assert plan.rows.shield
        plan.rows.shield = shield
        with torch.no_grad():  # nonzero deltas, as after a few steps
            for p in plan.rows.parameters():
                p.normal_(0, 0.1)
        ids = torch.tensor([[5, 90, 7, 91, 90, 3]])
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss, g), (loss0, g0) = grads(True), grads(False)
    assert torch.allclose(loss, loss0, atol=1e-6)
    mats = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    for n in g0:
        if n in mats:
            assert g[n][[90, 91]].abs().max() == 0 and g0[n][[90, 91]].abs().max() > 1e-4, n
            rest = [i for i in range(100) if i not in (90, 91)]
            assert torch.allclose(g[n][rest], g0[n][rest], atol=1e-6), n
        else:
            assert torch.allclose(g[n], g0[n], atol=1e-6), (n, (g[n] - g0[n]).abs().max())
