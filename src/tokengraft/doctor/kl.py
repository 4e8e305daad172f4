"""``--kl``: how much probability the grafted tokens' output rows take on real prose that contains
none of them, KL(base || grafted), measured with the project's one KL function."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..compat import dtype_kwargs
from ..files import read_json
from ..manifest import FILENAME as MANIFEST_FILE
from ..manifest import Manifest
from ..probe import kl_of_rows  # the project's one KL (on init.kl_of_added)
from .findings import DoctorError, Finding, first_line

KL_WARN = 1e-3  # nats/token on prose without the new tokens: above this the new rows are visible

@torch.no_grad()
def kl_findings(model, tokenizer, manifest: Manifest | None, where: str = "model",
                hidden: torch.Tensor | None = None) -> list[Finding]:
    """KL(base || grafted) on real prose: how much probability the grafted tokens' output rows take
    from the rest of the vocabulary on text that contains none of them. ``hidden``: the head's
    inputs on real text, if already computed (probe.head_inputs)."""
    from ..probe import head_inputs, real_text

    if manifest is None or not manifest.tokens:
        return [Finding("info", "kl-skipped", f"{where}: no {MANIFEST_FILE} records which rows were grafted; "
                                              f"KL(base || grafted) needs it")]
    head = model.get_output_embeddings()
    new = sorted(t.id for t in manifest.tokens if 0 <= t.id < head.weight.shape[0])
    if hidden is None:
        hidden = head_inputs(model, tokenizer, real_text())
    kl = kl_of_rows(hidden, head.weight, new, getattr(head, "bias", None))
    mean, mass = float(kl.mean()), 1.0 - math.exp(-float(kl.max()))
    data = {"kl_mean": mean, "max_mass": mass, "positions": len(kl), "rows": new}
    msg = (f"{where}: KL(base || grafted) on {len(kl)} positions of real prose is {mean:.2e} nats/token; the "
           f"{len(new)} grafted token row(s) take at most {mass:.2e} of the probability at any position")
    out = [Finding("info", "kl-invisibility", msg, data)]
    if not math.isfinite(mean):
        out.append(Finding("error", "kl-not-finite",
                           f"{where}: KL(base || grafted) is {mean} on real prose; the model's probabilities are "
                           f"not finite: restore the weights from the last good checkpoint", data))
    elif mean > KL_WARN:
        out.append(Finding("warning", "kl-visible",
                           f"{where}: grafted rows take {mean:.2e} nats/token (> {KL_WARN:g}) on text without "
                           f"them; the model predicts them where they do not belong: re-initialize their output "
                           f"rows (graft again from the base with `tokengraft add --init auto`) or train on text that uses them", data))
    return out


def load_for_kl(path):
    """(model, tokenizer, manifest) of a folder, loaded without running any of its code. A
    vision-language folder loads as image-text-to-text; weights only through safe loaders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    try:
        cfg = read_json(folder / "config.json", "a JSON model config", kind=dict)
        auto = AutoModelForCausalLM
        if isinstance(cfg.get("vision_config"), dict):
            from transformers import AutoModelForImageTextToText as auto
        model = auto.from_pretrained(folder, **dtype_kwargs(torch.float32), trust_remote_code=False).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # transformers' own loaders refuse pickled code (weights_only): one line
        raise DoctorError(f"{folder}: cannot load the model for --kl ({first_line(e)}); run doctor without --kl "
                          f"to see what is wrong with the folder") from None
    return model, tok, Manifest.find(folder)
