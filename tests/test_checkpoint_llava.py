"""A transformers LLaVA (classic on-disk layout, nested text_config) carried to a vocabulary where
the image token and the added tokens moved: on disk with convert, and in memory with load_checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import word_tokenizer, words

from tokengraft.checkpoint import load_checkpoint
from tokengraft.checkpoint.convert import convert

SRC = words(96) + ["<a>", "<b>", "<c>", "<image>"]  # image token 99
TGT = words(96) + ["<image>", "<c>", "<d>", "<a>"]  # image token 96


def tiny_llava(image_id, seed):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tc = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=16)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=tc, vision_config=vc,
                                                     image_token_index=image_id)).eval()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    src = tiny_llava(SRC.index("<image>"), 0)
    src.save_pretrained(d / "src")
    word_tokenizer(SRC).save_pretrained(d / "src")
    tgt = tiny_llava(TGT.index("<image>"), 1)
    tgt.config.save_pretrained(d / "target")
    word_tokenizer(TGT).save_pretrained(d / "target")
    return d, src


def _check(model, src):
    e_new, e_old = model.get_input_embeddings().weight, src.get_input_embeddings().weight
    h_new, h_old = model.get_output_embeddings().weight, src.get_output_embeddings().weight
    for tok in ("<image>", "<a>", "<c>", "w5"):
        assert torch.equal(e_new[TGT.index(tok)], e_old[SRC.index(tok)]), tok
        assert torch.equal(h_new[TGT.index(tok)], h_old[SRC.index(tok)]), tok
    proj = "multi_modal_projector.linear_1.weight"
    assert torch.equal(dict(model.model.named_parameters())[proj], dict(src.model.named_parameters())[proj])


def test_convert_llava_folder(llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    d, src = llava
    out = tmp_path / "out"
    report = convert(d / "src", d / "target", out, log=lambda *a: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_token_index"] == TGT.index("<image>")  # an id in the target's vocabulary
    assert cfg["text_config"]["vocab_size"] == 100
    assert {r["key"] for r in report.remapped} == {"language_model.model.embed_tokens.weight",
                                                   "language_model.lm_head.weight"}
    _check(LlavaForConditionalGeneration.from_pretrained(out).eval(), src)


def test_load_checkpoint_into_llava_in_memory_names(llava):
    from transformers import AutoTokenizer

    d, src = llava
    model = tiny_llava(TGT.index("<image>"), 2)
    report = load_checkpoint(model, d / "src", AutoTokenizer.from_pretrained(d / "target"))
    assert not report.missing_keys and not report.unexpected_keys
    assert set(report.dropped.values()) == {"<b>"}
    _check(model, src)
