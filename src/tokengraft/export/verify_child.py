"""The fresh-process half of ``verify``: reload an exported folder with plain transformers, exactly
as a user would, and write what it computes for the parent to compare.

Run as ``python -m tokengraft.export.verify_child WORK``: ``WORK/request.json`` names the folder,
the probes (text, optional image file), the new tokens and how many greedy tokens to generate;
the answers go to ``WORK/result.safetensors`` (ids, logits, generations) and ``WORK/result.json``
(problems found while loading, tied or not). Uses torch, transformers, safetensors and PIL only,
so nothing tokengraft keeps in memory can hide a broken file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: str):
    """(model, tokenizer, processor or None, problems) as plain transformers loads ``out``."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)

    from ..compat import dtype_kwargs  # stdlib only: the version's keyword, nothing that could hide a broken file

    cfg = AutoConfig.from_pretrained(out, trust_remote_code=False)
    llava = hasattr(cfg, "vision_config")
    cls = AutoModelForImageTextToText if llava else AutoModelForCausalLM
    model, info = cls.from_pretrained(out, **dtype_kwargs(torch.float32), output_loading_info=True,
                                      trust_remote_code=False)
    problems = [f"loading {out}: {kind.replace('_', ' ')}: {sorted(map(str, info[kind]))[:5]}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=False) if llava else None
    tok = processor.tokenizer if llava else AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    return model.eval(), tok, processor, problems


def token_problems(tok, tokens) -> list[str]:
    """Each new token is one id in running text, and that id decodes back to it."""
    problems = []
    for content, tid in tokens:
        ids = tok(content, add_special_tokens=False)["input_ids"]
        if ids != [tid]:
            problems.append(f"token {content!r} encodes to {ids}, expected [{tid}]")
        back = tok.decode([tid])
        if back != content:
            problems.append(f"id {tid} decodes to {back!r}, expected {content!r}")
    return problems


def run(work: Path) -> None:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    req = json.loads((work / "request.json").read_text(encoding="utf-8"))
    model, tok, processor, problems = load(req["out"])
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    problems += token_problems(tok, req["tokens"])
    tensors = {}
    with torch.no_grad():
        for i, p in enumerate(req["probes"]):
            if p["image"]:
                with Image.open(p["image"]) as im:
                    image = im.convert("RGB")
                inputs = dict(processor(text=p["text"], images=image, return_tensors="pt"))
            else:
                inputs = dict(tok(p["text"], return_tensors="pt"))
            n = inputs["input_ids"].shape[1]
            tensors[f"ids{i}"] = inputs["input_ids"][0].contiguous()
            tensors[f"logits{i}"] = model(**inputs).logits[0].float().contiguous()
            if req["gen_tokens"]:
                g = model.generate(**inputs, max_new_tokens=req["gen_tokens"], do_sample=False)
                tensors[f"gen{i}"] = g[0, n:].contiguous()
    save_file(tensors, str(work / "result.safetensors"))
    import transformers

    result = {"problems": problems, "tied": tied, "transformers": transformers.__version__}
    (work / "result.json").write_text(json.dumps(result), encoding="utf-8")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tokengraft.export.verify_child WORK_FOLDER", file=sys.stderr)
        return 2
    run(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
