"""The tools people already use read tokengraft's exports right (issue 13): llama.cpp's
converter (from the llama-cpp-python sdist, fetched at test time, never committed) and TRL's
SFTTrainer. Real SmolLM2 with grafted tokens, exported once for the module."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

NEW = [{"content": "<box>"}, {"content": "</box>", "stop": True}, {"content": "<plain>", "special": False}]


@pytest.fixture(scope="module")
def export_dir(smollm2_dir, tmp_path_factory):
    """Grafted SmolLM2 (3 tokens, rows padded to 49,216), exported: read-only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.export import export_model
    from tokengraft.graft import graft

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    man = graft(model, tok, NEW, init="mean", log=lambda *a: None)
    out = tmp_path_factory.mktemp("consumers") / "export"
    export_model(model, tok, None, man, out, log=lambda *a: None)
    return out


def test_llama_cpp_converter_types_new_tokens(export_dir, tmp_path):
    """convert_hf_to_gguf.py keeps every id: new special tokens CONTROL (3), a --not-special one
    USER_DEFINED (4), padding rows UNUSED (5); read back with the gguf package."""
    from tokengraft.demo.assets import llama_cpp_converter_dir

    try:
        conv = llama_cpp_converter_dir()
    except Exception as e:  # pip download can fail offline: skip, with the reason
        pytest.skip(f"llama.cpp converter unavailable (llama-cpp-python sdist): {e}")
    gguf_file = tmp_path / "vocab.gguf"
    r = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(export_dir), "--vocab-only",
                        "--outfile", str(gguf_file)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields

    def array(name):
        f = fields[name]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(t).decode("utf-8") for t in array("tokenizer.ggml.tokens")]
    types = [int(t[0]) for t in array("tokenizer.ggml.token_type")]
    assert len(tokens) == len(types) == 49216
    assert tokens[49152:49155] == ["<box>", "</box>", "<plain>"]
    assert types[49152:49155] == [3, 3, 4]
    assert set(types[49155:]) == {5}  # padding rows: never produced
    assert types[1000] == 1 and types[1] == 3  # an ordinary token, and the base's own <|im_start|>


def test_trl_sft_trains_an_export(export_dir, tmp_path):
    """TRL's SFTTrainer, three steps on text with the new tokens: the loss goes down and the
    vocabulary is left as exported (no resize)."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl; test extra)")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(export_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    texts = ["the cat sits <box>12 40 88 90</box> on the mat", "a dog <box>1 2 3 4</box> runs <plain> fast",
             "<box>5 6 7 8</box> is a box", "nothing special here </box>"]
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no",
                         max_length=48, use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert model.get_input_embeddings().weight.shape[0] == rows
