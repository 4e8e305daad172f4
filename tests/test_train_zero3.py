"""DeepSpeed ZeRO-3 (`--deepspeed`) training of new rows: real torchrun subprocesses, DeepSpeed's CPU
accelerator with gloo, tiny Llama models with the real SmolLM2 tokenizer. Two ZeRO-3 processes at
batch 2 equal one process at batch 4; the run exports; DeepSpeed's own zero_to_fp32 consolidates a
checkpoint the Trainer wrote; a single process resumes a ZeRO-3 checkpoint; unverified options refuse."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torchrun_helpers import ENV as BASE_ENV
from torchrun_helpers import TOKENS, assert_export_has_the_rows, cfg, close, make_assets, rows, single
from torchrun_helpers import torchrun as _torchrun

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'tokengraft[deepspeed]'")
pytestmark = pytest.mark.slow
ENV = {**BASE_ENV,
       "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")}
DS = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
      "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}


@pytest.fixture(scope="module")
def assets(smollm2_dir, tmp_path_factory):
    root = make_assets(tmp_path_factory.mktemp("zero3"), smollm2_dir)
    (root / "ds.json").write_text(json.dumps(DS))
    return root


def torchrun(c, tmp_path, *flags, check=True):
    return _torchrun(c, tmp_path, *flags, check=check, env=ENV)


def zero3_run(assets, model, tmp, **kw):
    proc = torchrun(cfg(assets, model, tmp / "run", batch_size=2, **kw), tmp, "--deepspeed", str(assets / "ds.json"))
    line = [x for x in proc.stdout.splitlines() if "ZeRO-3 partitioned parameters" in x]
    # every weight of the model is ZeRO-3's (the tiny Llama has a few dozen), not just the deltas
    assert line and int(line[0].split("zero3: ")[1].split()[0]) > 10, proc.stdout[-2000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def one_untied(assets, tmp_path_factory):
    return single(cfg(assets, "untied", tmp_path_factory.mktemp("one") / "run"))


@pytest.fixture(scope="module")
def z3_untied(assets, tmp_path_factory):
    return zero3_run(assets, "untied", tmp_path_factory.mktemp("z3_untied"))


def test_zero3_rows_untied_equal_one_process(one_untied, z3_untied):
    a, b = rows(one_untied), rows(z3_untied)
    assert set(a) == {"embed", "head"}
    close(a, b)
    fresh = rows(one_untied / "checkpoint-2")
    assert (a["embed"] - fresh["embed"]).abs().max() > 1e-3  # step 3 moved the rows well beyond ATOL
    ck = z3_untied / "checkpoint-2"
    # the one-process layout (rows, whole-tensor optimizer.pt) next to DeepSpeed's own files
    assert (ck / "new_rows.safetensors").is_file() and (ck / "optimizer.pt").is_file()
    assert list(ck.glob("global_step*/*optim_states.pt"))
    # frozen weights are excluded: the checkpoint stays small (the tiny model alone is > 1 MB)
    assert sum(f.stat().st_size for f in ck.rglob("*.pt")) < 1_000_000
    m = [json.loads(x) for x in (z3_untied / "metrics.jsonl").read_text().splitlines()]
    norms = [r for r in m if "new_row_norm" in r]
    assert norms and all(r["new_row_norm"] > 0 and r["base_row_norm"] > 0 for r in norms)


def test_zero3_rows_tied_equal_one_process(assets, tmp_path):
    one = single(cfg(assets, "tied", tmp_path / "one"))
    two = zero3_run(assets, "tied", tmp_path)
    a, b = rows(one), rows(two)
    assert set(a) == {"embed"}
    close(a, b)


def test_zero_to_fp32_consolidates_a_trainer_checkpoint(assets, z3_untied):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tokengraft.train.run import RunInfo, rebuild_base

    ck = z3_untied / "checkpoint-2"
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ck))
    # only the trained deltas were saved (frozen weights excluded); base row + delta = the saved rows
    assert set(sd) == {"tokengraft_rows.embed", "tokengraft_rows.head"}
    base, tok, _, _ = rebuild_base(RunInfo.load(ck))  # the run's base, re-grafted as it was
    ids = tok.convert_tokens_to_ids(TOKENS)
    r = rows(ck)
    assert torch.allclose(base.get_input_embeddings().weight[ids].float() + sd["tokengraft_rows.embed"], r["embed"],
                          atol=1e-6)
    assert torch.allclose(base.get_output_embeddings().weight[ids].float() + sd["tokengraft_rows.head"], r["head"],
                          atol=1e-6)


def test_zero3_checkpoint_resumes_in_one_process(assets, one_untied, z3_untied, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(z3_untied / "checkpoint-2", moved / "checkpoint-2")
    shutil.copy(z3_untied / "run.json", moved / "run.json")
    single(cfg(assets, "untied", moved, resume=True))
    close(rows(moved), rows(one_untied))


def test_zero3_resumes_under_zero3(assets, one_untied, tmp_path):
    c = cfg(assets, "untied", tmp_path / "cut", batch_size=2)
    ds = str(assets / "ds.json")
    torchrun(c, tmp_path, "--deepspeed", ds, "--stop-after", "2")
    assert not (tmp_path / "cut" / "checkpoint-3").exists()
    torchrun(c, tmp_path, "--deepspeed", ds, "--resume")
    close(rows(tmp_path / "cut"), rows(one_untied))


def test_export_of_a_zero3_run(z3_untied, tmp_path):
    assert_export_has_the_rows(z3_untied, tmp_path / "hf", env=ENV)


REFUSALS = [
    (["--mode", "lora"], {}, "--deepspeed supports mode rows only"),
    (["--mode", "full"], {}, "--deepspeed supports mode rows only"),
    (["--fsdp"], {}, "pick one"),
    (["--bf16"], {}, "--bf16 is not verified"),
    ([], {"zero_optimization": {"stage": 2}}, "only stage 3 is verified"),
    ([], {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param device 'cpu'"),
    ([], {"optimizer": {"type": "AdamW"}}, "remove 'optimizer'"),
    ([], {"bf16": {"enabled": True}}, "bf16 is not verified"),
    ([], {"train_micro_batch_size_per_gpu": 4}, "set train_micro_batch_size_per_gpu to \"auto\""),
    ([], None, "not valid JSON"),
]


@pytest.mark.parametrize("flags,ds,needle", REFUSALS, ids=[r[2][:24] for r in REFUSALS])
def test_zero3_refusals_are_one_line(assets, tmp_path, flags, ds, needle):
    p = tmp_path / "ds.json"
    p.write_text("{stage: 3" if ds is None else json.dumps({**DS, **ds}))
    proc = subprocess.run([sys.executable, "-m", "tokengraft", "train", "--model", str(assets / "untied"), "--data",
                           str(assets / "train.json"), "--tokens", "<loc_0>", "--output-dir", str(tmp_path / "r"),
                           "--deepspeed", str(p), *flags], env=ENV, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def test_zero3_outside_torchrun_is_refused(assets, tmp_path):
    from tokengraft.train.config import TrainError

    with pytest.raises(TrainError, match="torchrun"):
        single(cfg(assets, "untied", tmp_path / "r", deepspeed=str(assets / "ds.json")))
    assert not (tmp_path / "r").exists()


def test_zero3_resume_of_a_checkpoint_without_deepspeed_state_is_refused(assets, one_untied, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_untied / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(one_untied / "run.json", out / "run.json")
    proc = torchrun(cfg(assets, "untied", out, batch_size=2), tmp_path, "--deepspeed", str(assets / "ds.json"),
                    "--resume", check=False)
    # torchrun reports a failed worker with its own exit status; the worker's one line is in stderr
    assert proc.returncode != 0 and "has no DeepSpeed state" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "checkpoint-3").exists()
