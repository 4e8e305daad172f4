"""Load and save Hugging Face checkpoint folders (causal LM or LLaVA) with their manifest.

Every write goes to a temporary sibling folder that is renamed into place at the end, so an
interrupted run leaves nothing half-written and never touches the input.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .manifest import Manifest
from .errors import TokengraftError


class FolderError(TokengraftError):
    pass


def read_config(path) -> dict:
    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FolderError(f"{path}: no config.json; expected a Hugging Face model folder "
                          f"(save one with model.save_pretrained(DIR))") from None
    except json.JSONDecodeError as e:
        raise FolderError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None


def is_llava(config: dict) -> bool:
    return "vision_config" in config and "text_config" in config


def load_folder(path, dtype=None):
    """(model, tokenizer, processor or None, manifest or None) from a folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    path = Path(path)
    cfg = read_config(path)
    dtype = dtype or torch.float32
    processor = None
    if is_llava(cfg):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, processor, Manifest.find(path)


@contextlib.contextmanager
def atomic_folder(out, overwrite: bool = False):
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error it vanishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FolderError(f"{out}: already exists; choose another output folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_folder(out, model, tokenizer, manifest: Manifest | None, processor=None, overwrite: bool = False,
                max_shard_size="5GB") -> Path:
    """Write model (safetensors), tokenizer, processor, generation config and manifest atomically."""
    with atomic_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if manifest is not None:
            manifest.save(tmp)
    return Path(out)
