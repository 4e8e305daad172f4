"""LoRA merges, in one place: LoRA factors held as tensors (an XTuner checkpoint's
``base_model.model.X.lora_A/B``) added into their base weights, and PEFT adapter folders merged
into a loaded model (peft's ``merge_and_unload``), with one-line errors for adapters that do not fit."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import LoraError

_LORA = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?$")


def unwrap_peft_names(part: dict) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Split a peft-wrapped state dict (``base_model.model.X``) into plain tensors (X.weight, with
    ``base_layer`` / ``modules_to_save.default`` unwrapped) and LoRA pairs per module X."""
    plain, lora = {}, {}
    for k, v in part.items():
        m = _LORA.match(k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
            continue
        if "lora_magnitude_vector" in k:
            raise LoraError(f"{k}: DoRA adapters are not supported; merge them with peft first")
        if k.startswith("base_model.model."):
            k = k[len("base_model.model."):]
            if ".original_module." in k:
                continue  # the frozen copy beside modules_to_save: the trained copy wins
            k = k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        plain[k] = v
    return plain, lora


def lora_ranks(lora: dict[str, dict[str, torch.Tensor]], where: str) -> list[int]:
    """The ranks of the LoRA pairs; an incomplete pair is an error."""
    ranks = set()
    for mod, ab in lora.items():
        a = ab.get("lora_A", ab.get("lora_embedding_A"))
        b = ab.get("lora_B", ab.get("lora_embedding_B"))
        if a is None or b is None:
            raise LoraError(f"{where}: LoRA of {mod} has only {sorted(ab)}; the checkpoint is incomplete")
        ranks.add(a.shape[0])
    return sorted(ranks)


def merge_lora(weights: dict[str, torch.Tensor], lora: dict[str, dict[str, torch.Tensor]], alpha: float,
               use_rslora: bool = False, where: str = "llm") -> str:
    """Add ``scale * B @ A`` to each ``<module>.weight`` tensor of ``weights``, in place (so a
    module's ``state_dict()`` merges into the module without a second copy of the weights).
    Embedding LoRA (``lora_embedding_A`` r x vocab, ``B`` hidden x r) adds ``(B @ A).T``.
    ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), as peft computes it."""
    if not lora:
        return ""
    ranks = lora_ranks(lora, where)
    for mod, ab in lora.items():
        key = f"{mod}.weight"
        if key not in weights:
            raise LoraError(f"{where}: LoRA on {mod}, but the model has no {key}")
        w = weights[key]
        if "lora_A" in ab:
            a, b = ab["lora_A"].float(), ab["lora_B"].float()
            delta = b @ a
        else:
            a, b = ab["lora_embedding_A"].float(), ab["lora_embedding_B"].float()
            delta = (b @ a).T
        r = a.shape[0]
        scale = alpha / (r ** 0.5 if use_rslora else r)
        if delta.shape != w.shape:
            raise LoraError(f"{where}: LoRA of {mod} gives {tuple(delta.shape)}, the weight is {tuple(w.shape)}")
        with torch.no_grad():
            w.add_((scale * delta).to(w.dtype))
    return f"{where}: {len(lora)} module(s), rank {ranks}, alpha {alpha:g}"


def _tied(model) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and out.weight is model.get_input_embeddings().weight


def merge_peft(model, adapter, what: str = "model"):
    """``model`` with the PEFT adapter folder ``adapter`` merged in (peft's ``merge_and_unload``).
    An adapter that does not fit (another vocabulary, another model) or that would untie the head
    is one line naming the folder."""
    from peft import PeftModel

    a = Path(adapter)
    if not (a / "adapter_config.json").is_file():
        raise LoraError(f"{a}: no adapter_config.json; expected a PEFT adapter folder (saved with "
                        f"save_pretrained on a PeftModel)")
    tied = _tied(model)
    try:
        merged = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    except RuntimeError as e:  # size mismatches: the adapter belongs to another vocabulary or model
        lines = str(e).strip().splitlines()
        raise LoraError(f"{a}: the adapter does not fit the {what} ({lines[-1].strip() if lines else e}); was it "
                        f"trained on another vocabulary? `tokengraft convert` moves it") from None
    if _tied(merged) != tied:
        raise LoraError(f"{a}: merging the adapter {'untied' if tied else 'tied'} the head of the {what}; refusing "
                        f"a model whose tie state changed")
    return merged


__all__ = ["unwrap_peft_names", "lora_ranks", "merge_lora", "merge_peft", "LoraError"]
