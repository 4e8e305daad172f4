"""Load and save Hugging Face checkpoint folders (causal LM or LLaVA) with their manifest.

Loading refuses what it must not touch (remote code, a folder without weights, rows that disagree
with the config) before transformers reads anything; saving goes through the one output-folder rule
in ``outdir.py``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from .compat import check_readable, dtype_kwargs
from .files import read_index, read_json
from .manifest import Manifest
from .outdir import FolderError, atomic_folder
from .portable import make_portable



def read_config(path) -> dict:
    p = Path(path) / "config.json"
    return read_json(p, "a JSON model config (model_type, vocab_size, ...)", error=FolderError, kind=dict,
                     missing=f"{path}: no config.json; expected a Hugging Face model folder "
                             f"(save one with model.save_pretrained(DIR))")


def is_llava(config: dict) -> bool:
    return "vision_config" in config and "text_config" in config


# ---------------------------------------------------------------------------------------------
# no remote code: a folder that needs its own Python files is refused before transformers sees it
# (transformers would otherwise offer "run the custom code? [y/N]" on a terminal)

def _known_model_type(model_type) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def refuse_remote_code(folder, cfg: dict | None = None) -> None:
    """FolderError when loading ``folder`` would need code from the folder itself (``auto_map`` with
    a model_type transformers does not know). Nothing of the folder is imported or executed."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return
    cfg = read_config(folder) if cfg is None else cfg
    mt = cfg.get("model_type")
    if mt == "internlm2":  # read by the built-in bridge (internlm2.py); its *.py files are data
        return
    if "auto_map" in cfg and not _known_model_type(mt):
        raise FolderError(f"{folder}: config.json has auto_map and model_type {mt!r}, which this "
                          f"transformers does not know; loading it would run the folder's own Python "
                          f"code, which tokengraft never does (convert it to a built-in architecture)")


def _remote_code_guard(folder, e: ValueError) -> None:
    """transformers refuses (with trust_remote_code=False) a tokenizer/processor that only exists as
    the folder's code: say so in one line instead of a traceback."""
    if "trust_remote_code" in str(e) or "custom code" in str(e):
        raise FolderError(f"{folder}: its tokenizer or processor exists only as the folder's own Python "
                          f"code (auto_map), which tokengraft never runs") from None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def require_weights(path) -> None:
    """A folder with config.json but no weights file: one line, before transformers is asked."""
    path = Path(path)
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise FolderError(f"{path}: has config.json but no weights ({', '.join(WEIGHT_FILES[:3])}); pass the "
                          f"complete folder model.save_pretrained(DIR) wrote")


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                      "lm_head.weight", "embed_out.weight", "output.weight")


def check_rows_match(path, cfg: dict) -> None:
    """config.json's vocab_size against the embedding/head rows in the safetensors headers: a
    mismatch is one line naming both numbers (transformers would raise a long RuntimeError)."""
    from .checkpoint.safetensors import SafetensorsFile
    from .hf import config_rows

    path = Path(path)
    rows = config_rows(cfg)
    if rows is None:
        return
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_index(index, error=FolderError).values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return  # .bin weights: transformers' own check, turned into one line in load_folder
    for shard in shards:
        f = path / shard
        if not f.is_file():
            raise FolderError(f"{f}: listed in {index.name} but missing")
        with SafetensorsFile(f) as st:  # the one validated reader; header only, no tensor data
            shapes = {k: st.shape(k) for k in st.keys()}
        for name, shape in shapes.items():
            if name.endswith(EMBEDDING_SUFFIXES) and len(shape) == 2 and shape[0] != rows:
                raise FolderError(f"{path}: config.json says vocab_size {rows} but {name} in {shard} has "
                                  f"{shape[0]} rows; use the config.json saved with these weights")


def load_folder(path, dtype=None):
    """(model, tokenizer, processor or None, manifest or None) from a folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    path = Path(path)
    cfg = read_config(path)
    if cfg.get("model_type") == "internlm2":  # built-in bridge (internlm2.py): the folder's code never runs
        from . import internlm2
        return internlm2.load_folder(path, dtype)
    refuse_remote_code(path, cfg)
    check_readable(path)  # transformers 4.x: a folder only 5.x reads right is refused, not misread
    require_weights(path)
    check_rows_match(path, cfg)
    manifest = Manifest.find(path)  # a broken manifest is an error before the slow load
    dtype = dtype or torch.float32
    processor = None
    try:
        if is_llava(cfg):
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(path, **dtype_kwargs(dtype), trust_remote_code=False)
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype), trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        _remote_code_guard(path, e)
        raise
    except pickle.UnpicklingError:  # torch's weights_only loader refused it: nothing of it ran
        raise FolderError(f"{path}: a .bin weights file holds something other than tensors (code to run, or "
                          f"a damaged pickle); refused without running it; use safetensors weights") from None
    except RuntimeError as e:
        if "mismatched" in str(e) or "size mismatch" in str(e):
            raise FolderError(f"{path}: config.json does not match the weights' shapes (vocab_size or hidden "
                              f"size); use the config.json saved with these weights") from None
        raise
    return model, tokenizer, processor, manifest


# ---------------------------------------------------------------------------------------------
# the output-folder rule

def save_folder(out, model, tokenizer, manifest: Manifest | None, processor=None, overwrite: bool = False,
                max_shard_size="5GB", inputs: dict | None = None) -> Path:
    """Write model (safetensors), tokenizer, processor, generation config and manifest atomically."""
    with atomic_folder(out, overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        if manifest is not None:
            manifest.save(tmp)
    return Path(out)
