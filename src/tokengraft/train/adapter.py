"""lora mode's ``adapter/``: a PEFT adapter folder that PEFT alone reproduces.

``PeftModel.from_pretrained(grafted_base, RUN/adapter)`` gives the trained model: the LoRA
weights, and the new tokens' rows in PEFT's own trainable-tokens format, i.e.
``trainable_token_indices`` in ``adapter_config.json`` (module name -> token ids) and one
``<module>.token_adapter.trainable_tokens_delta`` tensor per module (k x hidden). Despite its
name PEFT stores the rows' full values there, not a difference, and writes them over the base
rows; so the rows of ``grafted_base`` for the new tokens do not matter, only its vocabulary.

Tied models: PEFT ties the head's rows to the input embedding's when the config says
``tie_word_embeddings`` at its top level; a model tied elsewhere (a LLaVA's ``text_config``) gets
the head listed too, with the same rows, so PEFT's output side is right either way.

During training the rows live in tokengraft's own delta hooks (their own LR and metrics); they
are written into the adapter when it is saved. The folder also carries ``tokengraft.json``: the
grafted vocabulary the adapter belongs to (tokengraft refuses it on another vocabulary).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..manifest import Manifest

ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
TOKENS_FILE = "tokens.json"
PREFIX = "base_model.model."  # PeftModel's prefix for the wrapped model's modules in saved keys


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _peft_ties(model) -> bool:
    """Whether PEFT will tie the head's trainable tokens to the embedding's (it reads the top-level
    config only)."""
    return bool(model.config.to_dict().get("tie_word_embeddings", False))


def save_adapter(folder, peft_model, base, ids: list[int], rows: dict[str, torch.Tensor], tied: bool,
                 manifest: Manifest, base_folder: str, tokens: list[dict],
                 lora_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``folder/adapter/``: PEFT's LoRA save plus the new rows as trainable tokens.
    ``rows``: the effective rows (``embed``, and ``head`` when untied), in ``ids`` order.
    ``lora_state``: the LoRA tensors already gathered whole (FSDP), named as in the PEFT model's
    state dict; PEFT's save would otherwise read the sharded model's local pieces."""
    out = Path(folder) / ADAPTER_DIR
    extra = {"state_dict": lora_state} if lora_state is not None else {}
    peft_model.save_pretrained(out, save_embedding_layers=False, **extra)
    tensors = load_file(str(out / ADAPTER_FILE))
    emb = _name_of(base, base.get_input_embeddings())
    sides = {emb: rows["embed"]}
    head = base.get_output_embeddings()
    if head is not None and (not tied or not _peft_ties(base)):
        sides[_name_of(base, head)] = rows["embed"] if tied else rows["head"]
    indices = {}
    for name, value in sides.items():
        indices[name] = [int(i) for i in ids]
        tensors[f"{PREFIX}{name}.token_adapter.trainable_tokens_delta"] = value.detach().float().contiguous().cpu()
    save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    cfg = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg["trainable_token_indices"] = indices
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # the token specs as grafted: `tokengraft add BASE --tokens-file adapter/tokens.json` rebuilds the base
    (out / TOKENS_FILE).write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    m = Manifest.from_dict(manifest.to_dict())
    m.record("train-adapter", base_model=base_folder,
             note="apply to the base grafted with these tokens (same vocabulary fingerprint)")
    m.save(out)
    return out


def adapter_folder(parts: Path) -> Path:
    """Where a run (or checkpoint) keeps its adapter; runs written before ``adapter/`` kept it at the top."""
    sub = Path(parts) / ADAPTER_DIR
    return sub if (sub / ADAPTER_FILE).is_file() else Path(parts)


def lora_weights(parts: Path) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors only (the trainable-token rows resume from new_rows.safetensors,
    which names its tokens and so survives a token change)."""
    return {k: v for k, v in load_file(str(adapter_folder(parts) / ADAPTER_FILE)).items() if "lora_" in k}
