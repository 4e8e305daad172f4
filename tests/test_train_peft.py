"""`--mode lora` writes RUN/adapter/, a PEFT adapter that PEFT alone reproduces (issue 13): LoRA
weights plus the new rows as PEFT trainable tokens. Tiny random Llamas (tied and untied) with the
real SmolLM2 tokenizer: the behaviour is structural, the numbers are fp32 exact to 1e-5."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

TOKENS = ["<box>", "</box>"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    recs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Where is thing {i}?"},
                                              {"from": "gpt", "value": f"It is at <box>{i} {i + 1}</box>."}]}
            for i in range(8)]
    p = tmp_path_factory.mktemp("data") / "train.json"
    p.write_text(json.dumps(recs))
    return p


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base_dir(request, smollm2_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    d = tmp_path_factory.mktemp("tiny") / "m"
    tiny_llama(tok, tied=request.param, hidden=32).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def config(base_dir, data_file, out, **kw):
    from tokengraft.train.config import TrainConfig

    c = dict(model=str(base_dir), data=str(data_file), output_dir=str(out), tokens=TOKENS, init="mean", mode="lora",
             template="chatml", batch_size=4, max_steps=4, lr=5e-2, lora_r=4, lora_targets=["q_proj", "v_proj"],
             max_length=64, logging_steps=1, save_steps=2, progress=False, tensorboard=False)
    c.update(kw)
    return TrainConfig(**c)


@pytest.fixture(scope="module")
def run(base_dir, data_file, tmp_path_factory):
    from tokengraft.train.loop import train

    return train(config(base_dir, data_file, tmp_path_factory.mktemp("run") / "run"), log=lambda *a: None)


def logits(model, tok, text):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_peft_alone_reproduces_the_run(run):
    from peft import PeftModel

    from tokengraft.train.run import RunInfo, load_run, rebuild_base

    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    merged, tok, _, manifest = load_run(run)
    ids = tok.convert_tokens_to_ids(TOKENS)
    idx = cfg["trainable_token_indices"]
    assert idx and all(v == ids for v in idx.values())
    if not manifest.tied:
        assert len(idx) == 2  # input embedding and head
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert sum("trainable_tokens_delta" in k for k in weights) == len(idx)
    assert (run / "adapter" / "tokengraft.json").is_file()
    specs = json.loads((run / "adapter" / "tokens.json").read_text())  # `tokengraft add --tokens-file` input
    assert [t["content"] for t in specs] == TOKENS

    grafted, tok2, _, _ = rebuild_base(RunInfo.load(run))  # the base with the run's tokens, untrained rows
    peft = PeftModel.from_pretrained(grafted.float(), str(run / "adapter")).eval()
    merged = merged.float().eval()
    for text in ("Where is thing 3? It is at <box>3 4</box>.", "The quick brown fox jumps over the lazy dog."):
        a, b = logits(peft, tok2, text), logits(merged, tok, text)
        assert (a - b).abs().max() < 1e-5, (text, (a - b).abs().max())
    # and the new rows matter: without the adapter's rows the logits differ by far more
    bare, _, _, _ = rebuild_base(RunInfo.load(run))
    text = "It is at <box>3 4</box>."
    assert (logits(bare.float().eval(), tok, text) - logits(merged, tok, text)).abs().max() > 1e-3


def test_lora_resume_equals_uninterrupted(run, base_dir, data_file, tmp_path):
    from tokengraft.train.loop import train

    cut = tmp_path / "cut"
    train(config(base_dir, data_file, cut, stop_after=2), log=lambda *a: None)
    assert (cut / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    train(config(base_dir, data_file, cut, resume=True), log=lambda *a: None)
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


def test_adapter_refused_on_another_vocabulary(run, base_dir, tmp_path):
    """The ungrafted base lacks the new tokens: tokengraft refuses with one line, writes nothing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tokengraft", "export", str(base_dir), "--adapter",
                           str(run / "adapter"), "-o", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "Loading weights" not in x]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert "vocabulary" in lines[0] or "token" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
