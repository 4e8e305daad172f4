"""Helpers for the multi-process training tests (FSDP, DeepSpeed ZeRO-3): a plain module, not collected.
Tiny Llama models (tied and untied) with the real SmolLM2 tokenizer, a small grounding-style data set,
real ``torchrun`` subprocesses (gloo on CPU), and the comparisons every such test makes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import tiny_llama
from safetensors.torch import load_file

# gloo sums gradients in another order than one process: float noise, amplified a little by Adam's
# normalization; rows that learned differently would differ by ~lr = 2e-2 per step
ATOL = 1e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
TOKENS = ["<loc_0>", "<loc_1>", "<loc_2>", "<loc_3>"]


def make_assets(root: Path, smollm2_dir) -> Path:
    """``root/tied``, ``root/untied`` (tiny Llamas + the real SmolLM2 tokenizer) and ``root/train.json``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for tied in (True, False):
        d = root / ("tied" if tied else "untied")
        tiny_llama(tok, tied=tied).save_pretrained(d)
        tok.save_pretrained(d)
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"Where is item {i}?"},
             {"from": "gpt", "value": f"It is at <loc_{i % 4}><loc_{(3 * i) % 4}> near the door."}]}
            for i in range(16)]
    (root / "train.json").write_text(json.dumps(recs))
    return root


def cfg(assets, model, out, **kw) -> dict:
    d = {"model": str(assets / model), "data": str(assets / "train.json"), "init": "mean",
         "tokens": ",".join(TOKENS), "template": "chatml", "output_dir": str(out),
         "batch_size": 4, "max_steps": 3, "save_steps": 2, "lr": 2e-2, "logging_steps": 1, "progress": False,
         "tensorboard": False, "max_length": 64}
    d.update(kw)
    return d


def single(c):
    from tokengraft.train.config import TrainConfig
    from tokengraft.train.loop import train

    return train(TrainConfig(**c))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(c, tmp_path, *flags, check=True, env=ENV):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(c))
    exe = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(exe), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), "-m", "tokengraft", "train", str(tmp_path / "cfg.yaml"), *flags],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(run):
    return load_file(str(Path(run) / "new_rows.safetensors"))


def close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)  # a shard would broadcast in allclose
        assert torch.allclose(a[k], b[k], atol=ATOL), (k, (a[k] - b[k]).abs().max())


def exported(run, out, env=ENV):
    """``tokengraft export RUN -o OUT`` in a subprocess; the result loaded by plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = subprocess.run([sys.executable, "-m", "tokengraft", "export", str(run), "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)


def assert_export_has_the_rows(run, out, env=ENV):
    """The exported (untied) model's rows of the new tokens are the run's rows."""
    model, tok = exported(run, out, env)
    ids = tok.convert_tokens_to_ids(TOKENS)
    r = rows(run)
    assert torch.allclose(model.get_input_embeddings().weight[ids], r["embed"], atol=1e-6)
    assert torch.allclose(model.get_output_embeddings().weight[ids], r["head"], atol=1e-6)
