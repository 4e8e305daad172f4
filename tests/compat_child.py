"""What one transformers reads from model folders: run as a script in a compat venv (transformers
4.48, 5.20, ...) and imported by tests/test_compat.py in the project's transformers 5, so both
sides run the same code. Imports torch, transformers, safetensors and PIL only (no tokengraft).

``python compat_child.py SPEC.json OUT_DIR``: SPEC lists folders ({"path", "llava", "texts",
"tokens", "image"}); OUT_DIR gets report.json (ids, specials, chat templates per folder) and
NAME.safetensors (logits, and pixel_values for a LLaVA) per folder.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MESSAGES = [{"role": "user", "content": "Where is the <box>?"}, {"role": "assistant", "content": "<think>here</think>"}]


def _load(path: str, llava: bool):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    if llava:
        from transformers import LlavaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(path)
        return LlavaForConditionalGeneration.from_pretrained(path, **dtype).eval(), processor.tokenizer, processor
    return AutoModelForCausalLM.from_pretrained(path, **dtype).eval(), AutoTokenizer.from_pretrained(path), None


def probe(folder: dict) -> tuple[dict, dict]:
    """(facts, tensors) of one folder as this transformers reads it."""
    import torch
    from PIL import Image

    model, tok, processor = _load(folder["path"], folder.get("llava", False))
    text_config = model.config.get_text_config()
    rope = getattr(text_config, "rope_parameters", None) or {}  # 5.x; 4.x: rope_theta itself
    facts = {
        "tokenizer_class": type(tok).__name__, "len": len(tok),
        "ids": [tok(t)["input_ids"] for t in folder["texts"]],
        "keys": sorted(tok(folder["texts"][0]).keys()),
        "token_ids": {t: tok(t, add_special_tokens=False)["input_ids"] for t in folder["tokens"]},
        "special": sorted(set(tok.all_special_tokens)),
        "chat_template": tok.chat_template,
        "chat": tok.apply_chat_template(MESSAGES, tokenize=False) if tok.chat_template else None,
        "rope_theta": getattr(text_config, "rope_theta", None) or rope.get("rope_theta"),
    }
    tensors = {}
    with torch.no_grad():
        if processor is not None:
            facts["processor_chat_template"] = processor.chat_template
            inputs = processor(images=Image.open(folder["image"]).convert("RGB"), text=folder["texts"][0],
                               return_tensors="pt")
            tensors["pixel_values"] = inputs["pixel_values"].contiguous()
        else:
            inputs = tok(folder["texts"][0], return_tensors="pt")
        facts["input_keys"] = sorted(inputs.keys())
        out = model(**inputs)  # as a user calls it: every key the tokenizer/processor returns
        tensors["input_ids"] = inputs["input_ids"]
    tensors["logits"] = out.logits.float().contiguous()
    return facts, tensors


def main(spec_path: str, out_dir: str) -> None:
    import transformers
    from safetensors.torch import save_file

    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    report = {"transformers": transformers.__version__, "folders": {}}
    for name, folder in spec.items():
        facts, tensors = probe(folder)
        report["folders"][name] = facts
        save_file(tensors, str(out / f"{name}.safetensors"))
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
