"""Helpers for the checkpoint tests (a plain module, not collected as tests): word-level tokenizers with chosen vocabularies,
modules built from a key layout, a fake InternLM2/XTuner state dict."""
from __future__ import annotations

import torch


def word_tokenizer(vocab: list[str]):
    """A real (fast) HF tokenizer whose id i is ``vocab[i]``; new tokens are added as special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    base = [t for t in vocab if not t.startswith("<")]
    tk = Tokenizer(WordLevel({t: i for i, t in enumerate(base)}, unk_token=base[0]))
    tk.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=base[0])
    for i, t in enumerate(vocab):
        if t.startswith("<"):
            assert len(tok) == i, "special tokens must come after the base words, in id order"
            tok.add_tokens([t], special_tokens=True)
    assert [tok.convert_ids_to_tokens(i) for i in range(len(vocab))] == vocab
    return tok


def words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def module_from_shapes(shapes: dict[str, tuple]) -> torch.nn.Module:
    """An nn.Module whose state_dict has exactly these keys and shapes (zeros)."""
    root = torch.nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, torch.nn.Module())
            m = getattr(m, p)
        m.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


def internlm2_llava_state(vocab: int, hidden: int = 16, r: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """An XTuner LLaVA state dict with InternLM2's key layout (untied head, LoRA on `output`)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "llm.model.tok_embeddings.weight": (vocab, hidden),
        "llm.model.layers.0.attention.wqkv.weight": (3 * hidden, hidden),
        "llm.model.layers.0.attention.wo.weight": (hidden, hidden),
        "llm.model.norm.weight": (hidden,),
        "llm.output.weight": (vocab, hidden),
        "llm.base_model.model.output.lora_A.default.weight": (r, hidden),
        "llm.base_model.model.output.lora_B.default.weight": (vocab, r),
        "projector.model.0.weight": (hidden, 8),
        "projector.model.0.bias": (hidden,),
        "projector.model.2.weight": (hidden, hidden),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}
