"""The language model of an InternLM2-based XTuner LLaVA, with the checkpoint applied, as Llama.

XTuner's LLaVA keeps the LLM in InternLM2's own layout (``llm.model.tok_embeddings``,
``llm.model.layers.N.attention.wqkv`` ...), and a LoRA run adapts the *packed* ``wqkv``. So the
checkpoint is applied where its names make sense: full tensors copied and LoRA pairs merged
(``W + scale * B @ A``) on the packed InternLM2 weights of the LLM folder, grown first to the
checkpoint's vocabulary rows as XTuner grew them; only then does the bridge unpack everything into a
``LlamaForCausalLM``. Unpacking is a row permutation, so merging before or after it is the same.
Nothing in the LLM folder runs (its ``*.py`` files are data).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.errors import XTunerError
from .checkpoint.lora import merge_lora, unwrap_peft_names

EMBED, HEAD = "model.tok_embeddings.weight", "output.weight"


def checkpoint_rows(plain: dict, lora: dict) -> int | None:
    rows = [v.shape[0] for k, v in plain.items() if k in (EMBED, HEAD) and v.dim() == 2]
    rows += [ab["lora_B"].shape[0] for m, ab in lora.items() if m == "output" and "lora_B" in ab]
    return max(rows) if rows else None


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    """More rows, as XTuner's resize made them; the checkpoint or the import's graft sets their values
    (zeros here, so a LoRA'd head's unsaved new rows never pretend to be trained)."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def language_model(llm, part: dict, *, tokenizer, alpha, use_rslora: bool, n_user: int, check_named_rows):
    """(lm, tok, n_base, rows_ck, trained_in, trained_out, merged, n_loaded) for an InternLM2 LLM folder
    and the checkpoint's ``llm.`` tensors ``part`` (InternLM2 names, maybe peft-wrapped)."""
    from transformers import AutoTokenizer

    from .internlm2 import llama_config, load_tokenizer, read_weights, to_llama
    from .internlm2.folder import llama_model
    from .internlm2.weights import read_json

    folder = Path(llm)
    cfg = read_json(folder / "config.json")
    tok = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False) if tokenizer else load_tokenizer(folder)
    n_base = len(tok)
    plain, lora = unwrap_peft_names(part)
    check_named_rows({("model.embed_tokens.weight" if k == EMBED else "lm_head.weight" if k == HEAD else k): v
                      for k, v in plain.items()}, n_base, n_user)
    w = read_weights(folder)
    rows = w[EMBED].shape[0]
    rows_ck = checkpoint_rows(plain, lora)
    if rows_ck is not None and rows_ck < rows:
        raise XTunerError(f"the checkpoint's vocabulary rows ({rows_ck}) are fewer than the LLM's ({rows}); "
                          f"was the run built on another LLM folder than {folder}?")
    w = {k: v.float() for k, v in w.items()}
    if rows_ck is not None and rows_ck > rows:
        w[EMBED], w[HEAD] = _grow(w[EMBED], rows_ck), _grow(w[HEAD], rows_ck)
    for k, v in plain.items():
        if k not in w:
            raise XTunerError(f"llm: checkpoint tensor {k!r} has no place in the InternLM2 model {folder}; "
                              f"was the run built on another model folder?")
        if tuple(v.shape) != tuple(w[k].shape):
            raise XTunerError(f"llm: {k} is {tuple(v.shape)} in the checkpoint, {tuple(w[k].shape)} in the model; "
                              f"was the run built on another model folder?")
        w[k] = v.float().clone()
    merged = ""
    if lora:
        if alpha is None:
            raise XTunerError("llm: the checkpoint holds LoRA weights but no config says lora_alpha; pass --lora-alpha "
                              "(XTuner's LLaVA configs use 256 for the LLM)")
        merged = merge_lora(w, lora, alpha, use_rslora, "llm")
    lcfg = llama_config({**cfg, "vocab_size": w[EMBED].shape[0]}, str(folder / "config.json"))
    lm = llama_model(to_llama(w, cfg), lcfg, torch.float32, str(folder))
    n_loaded = len(plain) + sum(len(v) for v in lora.values())
    return lm, tok, n_base, rows_ck, EMBED in plain, HEAD in plain, merged, n_loaded
