"""``export BASE --adapter A``: merge a PEFT adapter into a model folder, and refuse a merge that
would silently drop trained rows.

A tokengraft run trains the new tokens' rows beside the LoRA. An adapter that does not carry them
(no ``trainable_token_indices``), merged into a base whose rows for those tokens are still their
initialization, gives a model that loads, runs and is wrong. The run folder knows which rows
trained (``run.json``) and holds them, so the fix is always to export the run itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import read_json
from ..hf import is_tied
from ..manifest import Manifest
from ..vocab import fingerprint, vocab_of
from .errors import ExportError

RUN_FILE, ROWS_FILE = "run.json", "new_rows.safetensors"  # the run folder layout (train/run.py)
ROW_ATOL = 1e-6  # a base row "is" the trained row when it equals it to fp32 rounding


def merge_adapter(model, tokenizer, manifest: Manifest | None, adapter, base=None, log=print):
    """Merge a PEFT adapter folder into ``model`` (peft's merge_and_unload); keep tied as it was."""
    from ..checkpoint.lora import merge_peft

    a = Path(adapter)
    if not (a / "adapter_config.json").is_file():
        raise ExportError(f"{a}: no adapter_config.json; --adapter expects a PEFT adapter folder "
                          f"(saved with model.save_pretrained on a PeftModel)")
    am = Manifest.find(a) or (Manifest.find(a.parent) if (a.parent / RUN_FILE).is_file() else None)
    if am is not None and am.vocab_fingerprint and am.vocab_fingerprint != fingerprint(vocab_of(tokenizer)):
        raise ExportError(f"{a}: the adapter was trained with another vocabulary than the model folder's "
                          f"tokenizer (fingerprint {am.vocab_fingerprint}); move it first with "
                          f"`tokengraft convert {a} --to MODEL_DIR`")
    check_rows_carried(model, tokenizer, a, base)
    merged = merge_peft(model, a)  # the one PEFT merge (checkpoint/lora.py): fit and tie checked there
    log(f"merged LoRA adapter {a}")
    return merged


def carried_token_ids(adapter, head_name: str = "lm_head") -> dict[str, set[int]]:
    """The token ids whose rows the adapter itself sets, per side ("embed", "head"): PEFT's
    ``trainable_token_indices`` (a list: the input embedding, and a tied head with it; or a
    {module: ids} mapping), provided its weights hold ``trainable_tokens_delta`` tensors."""
    a = Path(adapter)
    cfg = read_json(a / "adapter_config.json", "a PEFT adapter_config.json", error=ExportError, kind=dict)
    idx = cfg.get("trainable_token_indices")
    if not idx:
        return {}
    weights = a / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            if not any("trainable_tokens_delta" in k for k in f.keys()):
                return {}
    if not isinstance(idx, dict):
        return {"embed": {int(i) for i in idx}}
    out: dict[str, set[int]] = {}
    for module, ids in idx.items():
        side = "head" if module.split(".")[-1] == head_name else "embed"
        out.setdefault(side, set()).update(int(i) for i in ids)
    return out


def check_rows_carried(model, tokenizer, adapter, base=None) -> None:
    """Refuse (one line) when the adapter's run trained rows that neither the adapter carries nor
    ``model`` already holds. Adapters tokengraft did not write (no run.json beside them) pass."""
    a = Path(adapter)
    run = next((d for d in (a, a.parent) if (d / RUN_FILE).is_file()), None)
    if run is None:
        return
    info = read_json(run / RUN_FILE, f"a training run's {RUN_FILE} (export the run folder {run} instead)",
                     error=ExportError, kind=dict)
    trained = [t for t in info.get("new_tokens", []) if isinstance(t, str)]
    if not trained:
        return
    vocab = tokenizer.get_vocab()
    missing = [t for t in trained if t not in vocab]
    if missing:
        raise ExportError(f"{a}: the run trained rows for {missing[:3]} but {base or 'the model'} has no such "
                          f"token(s); pass the run folder instead: `tokengraft export {run} -o OUT`")
    ids = {t: vocab[t] for t in trained}
    head_name = _head_name(model)
    carried = carried_token_ids(a, head_name)
    sides = ["embed"] + ([] if is_tied(model) or head_name is None else ["head"])
    if all(set(ids.values()) <= carried.get(side, set()) for side in sides):
        return
    # the adapter does not carry the rows: fine only if the base already holds the trained values
    held = _base_holds_rows(model, ids, run / ROWS_FILE)
    if held:
        return
    names = ", ".join(trained[:3]) + (" ..." if len(trained) > 3 else "")
    raise ExportError(f"{a}: the run trained the rows of {len(trained)} new token(s) ({names}) but this adapter "
                      f"does not carry them (no trainable_token_indices) and {base or 'the base'} does not hold the "
                      f"trained rows{' (its rows differ from the trained ones)' if held is False else ''}; pass the run "
                      f"folder instead: `tokengraft export {run} -o OUT`")


def _head_name(model) -> str | None:
    head = model.get_output_embeddings()
    if head is None:
        return None
    return next((n.split(".")[-1] for n, m in model.named_modules() if m is head), None)


def _base_holds_rows(model, ids: dict[str, int], rows_file: Path) -> bool | None:
    """True when ``model``'s rows for ``ids`` equal the run's saved trained rows; False when they
    differ; None when the run kept no rows file to compare with."""
    from ..train.run import RunError, read_rows  # the run folder's own reader of its rows file

    try:
        tokens, saved = read_rows(rows_file.parent)
    except RunError:  # no rows file, or not one tokengraft wrote: nothing to compare with
        return None
    saved = {k: v.float() for k, v in saved.items()}
    emb = model.get_input_embeddings().weight.detach().float()
    head = model.get_output_embeddings()
    sides = [(emb, saved["embed"])]
    if "head" in saved and head is not None and not is_tied(model):
        sides.append((head.weight.detach().float(), saved["head"]))
    for weight, rows in sides:
        for t, i in ids.items():
            if t in tokens and not torch.allclose(weight[i], rows[tokens.index(t)], atol=ROW_ATOL, rtol=0):
                return False
    return True
