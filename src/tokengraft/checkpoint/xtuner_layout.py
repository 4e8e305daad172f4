"""XTuner LLaVA artifacts as tensors (``FORMATS.md``): an ``iter_N.pth`` file or DeepSpeed folder
read with the safe readers, split into XTuner's three modules (``llm.``, ``projector.``,
``visual_encoder.``), the split export's folders, and LoRA settings read from the run's config
dump as text (the config is never executed)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import XTunerError
from .readers import read_state_dict

PREFIXES = ("llm.", "projector.", "visual_encoder.")
SPLIT_PARTS = ("llm", "llm_adapter", "projector", "visual_encoder", "visual_encoder_adapter")


def read_xtuner(path) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """(state dict with XTuner names, the run's config text or None, notes) from an ``iter_N.pth``
    file or a DeepSpeed folder. Never runs code from the file."""
    sd, info = read_state_dict(path)
    cfg = None
    meta = (info.container or {}).get("meta") if isinstance(info.container, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("cfg"), str):
        cfg = meta["cfg"]
    unknown = sorted({k.split(".", 1)[0] for k in sd if not k.startswith(PREFIXES)})
    if unknown:
        raise XTunerError(f"{path}: keys under {unknown} are not XTuner LLaVA names (expected llm., projector., "
                          f"visual_encoder.); is this an XTuner LLaVA checkpoint?")
    notes = list(info.notes)
    if info.inert:
        notes.append(f"{len(info.inert)} non-tensor object type(s) in the file were left inert (never run): "
                     + ", ".join(info.inert[:4]))
    return sd, cfg, notes


def split_parts(sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{"llm": {...}, "projector": {...}, "visual_encoder": {...}} with the prefixes removed."""
    parts: dict[str, dict] = {p[:-1]: {} for p in PREFIXES}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        parts[head][rest] = v
    return parts


def split_export(folder: Path) -> dict[str, Path]:
    """XTuner's ``pth_to_hf --save-format xtuner`` layout found inside ``folder``: part -> folder."""
    return {n: folder / n for n in SPLIT_PARTS if (folder / n).is_dir()}


def lora_setting(cfg_text: str | None, block: str) -> dict:
    """``lora_alpha``/``r``/``use_rslora`` of the ``llm_lora=dict(...)`` (or ``visual_encoder_lora``)
    block of an mmengine config dump. Parsed as text: the config is never executed."""
    if not cfg_text:
        return {}
    m = re.search(rf"\b{block}\s*=\s*dict\(", cfg_text)
    if not m:
        return {}
    depth, i = 1, m.end()
    while i < len(cfg_text) and depth:
        depth += {"(": 1, ")": -1}.get(cfg_text[i], 0)
        i += 1
    body = cfg_text[m.end():i]
    out = {}
    for name, cast in (("lora_alpha", float), ("r", int)):
        v = re.search(rf"\b{name}\s*=\s*([0-9.]+)", body)
        if v:
            out[name] = cast(v.group(1))
    out["use_rslora"] = bool(re.search(r"\buse_rslora\s*=\s*True", body))
    return out




# -- vocabulary rows of an XTuner checkpoint (XTuner stores no vocabulary) ---------------------------

def checkpoint_rows(plain: dict, lora: dict, emb_key: str | None) -> int | None:
    """The vocabulary rows the checkpoint's LLM tensors (full or LoRA) have, if any."""
    rows = None
    for k, v in plain.items():
        if k == emb_key or (k.endswith("lm_head.weight") and v.dim() == 2):
            rows = max(rows or 0, v.shape[0])
    for mod, ab in lora.items():
        if mod.endswith("lm_head") and "lora_B" in ab:
            rows = max(rows or 0, ab["lora_B"].shape[0])
        if mod.endswith("embed_tokens") and "lora_embedding_A" in ab:
            rows = max(rows or 0, ab["lora_embedding_A"].shape[1])
    return rows


def check_named_rows(plain: dict, n_base: int, n_user: int) -> None:
    """Full embedding / head rows the checkpoint trained beyond the LLM's tokenizer belong to tokens
    only the user can name (XTuner stores no vocabulary): without them they would be thrown away."""
    rows = max([v.shape[0] for k, v in plain.items() if v.dim() == 2 and
                k.endswith(("embed_tokens.weight", "lm_head.weight"))], default=None)
    if rows is not None and rows - n_base > n_user:
        raise XTunerError(f"the checkpoint has {rows - n_base} trained vocabulary row(s) beyond the LLM's "
                          f"{n_base} tokens (rows {n_base}..{rows - 1}) but --tokens names {n_user}; pass "
                          f"--tokens (or --tokens-file) with the tokens the XTuner run added, in order")


__all__ = ["PREFIXES", "read_xtuner", "split_parts", "split_export", "lora_setting", "XTunerError", "checkpoint_rows",
           "check_named_rows"]
