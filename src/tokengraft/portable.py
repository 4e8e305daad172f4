"""Folders every supported transformers (4.48 ... 5.x) reads the same way.

transformers 5 writes some fields in a form older readers misread or cannot read (checked with
4.48, XTuner's pin; docs/compat.md has the matrix):

- rope only in ``rope_parameters``: 4.48 falls back to rope_theta 10,000, silently (SmolLM2's is
  100,000; logits differ by up to 7.8). We add ``rope_theta`` and ``rope_scaling`` beside it.
- ``dtype`` only: 4.x reads ``torch_dtype``. We add it beside.
- ``tokenizer_class: "TokenizersBackend"``: 4.x has no such class. ``PreTrainedTokenizerFast`` is
  what 4.x and 5.x both read as "tokenizer.json as it is" (5.x maps it to TokenizersBackend), with
  TokenizersBackend's ``model_input_names`` (4.x's class default adds ``token_type_ids``).
- ``extra_special_tokens`` as a list: 4.x crashes on it (it expects a dict of named tokens). We
  write the list as ``additional_special_tokens``, which 4.x reads and 5.x reads as the same list.
- a LLaVA's image processor nested in ``processor_config.json`` and no ``preprocessor_config.json``:
  4.x's AutoProcessor fails (no file; then "multiple values for argument 'image_processor'").
  We write the image processor to ``preprocessor_config.json`` and keep the processor's own fields
  in ``processor_config.json``; 5.x reads that layout too.
- a LLaVA's CLIP/SigLIP tower saved as ``vision_tower.embeddings.*`` (5.x's vision models have no
  ``vision_model`` wrapper): 4.x finds none of its keys and runs a *random* tower, with only a
  warning. We rename them ``vision_tower.vision_model.*`` (the hub's layout, which 5.x maps back
  on load) in the safetensors headers; the tensor bytes are not touched.

``make_portable(folder)`` rewrites a folder save_pretrained just wrote (a temporary folder, before
it is renamed into place); ``misreadings(folder)`` lists, for a folder someone else wrote, what an
older transformers would read differently (doctor's check). What cannot be said to old readers
(a rope type 4.48 lacks, per-layer-type rope) is a ``PortabilityWarning`` at write time, and is
written so that 4.48 fails loudly at load instead of reading something else. Stdlib only.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path

OLDEST = "4.48"
# rope types transformers 4.48 implements (transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS)
OLD_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# tokenizer classes only transformers 5 has; the fast tokenizer both read from tokenizer.json
NEW_TOKENIZER_CLASSES = ("TokenizersBackend",)
FAST = "PreTrainedTokenizerFast"
# what TokenizersBackend returns; 4.x's PreTrainedTokenizerFast adds token_type_ids by default,
# which LLaVA's forward refuses (model(**processor(...)) fails under 4.48)
FAST_INPUTS = ["input_ids", "attention_mask"]
# tokenizer files whose special-token lists 4.x reads
SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class PortabilityWarning(UserWarning):
    """Something a folder says that transformers 4.48 cannot be told: it will fail to load it there."""


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write(path: Path, data: dict) -> None:
    """Rewrite only when the meaning changed: a file that already says everything stays byte-identical
    (an InternLM2 folder's config keeps its remote-code layout), and key order is kept."""
    if path.is_file() and _read(path) == data:
        return
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _config_dicts(cfg: dict, where: str = "config.json"):
    """(where, dict) for the config and every nested sub-config (text_config, vision_config, ...)."""
    yield where, cfg
    for k, v in cfg.items():
        if isinstance(v, dict) and "model_type" in v:
            yield from _config_dicts(v, f"{where} {k}")


# -- the rewrite -------------------------------------------------------------------------------

def _old_rope(c: dict, where: str) -> list[str]:
    """rope_theta / rope_scaling (and partial_rotary_factor) from rope_parameters, in place."""
    rp = c.get("rope_parameters")
    if not isinstance(rp, dict) or not rp:
        return []
    if all(isinstance(v, dict) for v in rp.values()):  # per layer type (5.x only): no 4.48 form
        return [f"{where}: rope_parameters per layer type ({', '.join(sorted(rp))}) has no transformers "
                f"{OLDEST} form; {OLDEST} would read another rope: use transformers >= 5 for this folder"]
    notes = []
    if "rope_theta" in rp:
        c["rope_theta"] = rp["rope_theta"]
    if "partial_rotary_factor" in rp and "partial_rotary_factor" not in c:
        c["partial_rotary_factor"] = rp["partial_rotary_factor"]
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        c.setdefault("rope_scaling", None)
    else:
        c["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if kind not in OLD_ROPE_TYPES:  # written anyway: 4.48 then fails at load instead of using another rope
            notes.append(f"{where}: rope type {kind!r} does not exist in transformers {OLDEST}; it cannot "
                         f"load this folder (transformers >= 5 reads it)")
    return notes


def _portable_config(folder: Path) -> list[str]:
    cfg = _read(folder / "config.json")
    if not isinstance(cfg, dict):
        return []
    notes = []
    for where, c in _config_dicts(cfg):
        notes += _old_rope(c, where)
        if isinstance(c.get("dtype"), str) and "torch_dtype" not in c:
            c["torch_dtype"] = c["dtype"]
    _write(folder / "config.json", cfg)
    return notes


def _portable_specials(folder: Path) -> None:
    for name in SPECIAL_FILES:
        d = _read(folder / name)
        if not isinstance(d, dict):
            continue
        extra = d.get("extra_special_tokens")
        if name == "tokenizer_config.json" and d.get("tokenizer_class") in NEW_TOKENIZER_CLASSES \
                and (folder / "tokenizer.json").is_file():
            d["tokenizer_class"] = FAST
            d.setdefault("model_input_names", FAST_INPUTS)
        if name == "tokenizer_config.json" and d.get("tokenizer_class") == FAST:  # also as 4.x itself saves it
            d.setdefault("model_input_names", FAST_INPUTS)
        if isinstance(extra, list):
            old = [t for t in d.get("additional_special_tokens") or [] if t not in extra]
            d["additional_special_tokens"] = old + extra
            del d["extra_special_tokens"]
        _write(folder / name, d)


def _portable_processor(folder: Path) -> None:
    """The image processor in preprocessor_config.json, where every version looks for it."""
    pc = _read(folder / "processor_config.json")
    if not isinstance(pc, dict) or not isinstance(pc.get("image_processor"), dict):
        return
    image = dict(pc.pop("image_processor"))
    if "processor_class" in pc:
        image.setdefault("processor_class", pc["processor_class"])
    if not (folder / "preprocessor_config.json").is_file():
        _write(folder / "preprocessor_config.json", image)
    _write(folder / "processor_config.json", pc)


# vision towers whose 4.x class wraps its weights in ``vision_model``
WRAPPED_TOWERS = ("clip_vision_model", "siglip_vision_model")
TOWER, WRAPPED = "vision_tower.", "vision_tower.vision_model."


def _tower_key(k: str) -> str:
    return WRAPPED + k[len(TOWER):] if k.startswith(TOWER) and not k.startswith(WRAPPED) else k


def _rename_keys(path: Path) -> None:
    """Rewrite a safetensors file's header with ``_tower_key`` names; data offsets are relative
    to the data section, so its bytes are copied unchanged (streamed, never decoded)."""
    with open(path, "rb") as src:
        n = struct.unpack("<Q", src.read(8))[0]
        header = json.loads(src.read(n))
        new = {_tower_key(k): v for k, v in header.items()}
        if list(new) == list(header):
            return
        raw = json.dumps(new, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data stays 8-byte aligned
        tmp = path.with_name(path.name + ".portable")
        with open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, path)


def _wrapped_tower(cfg) -> bool:
    vision = cfg.get("vision_config") if isinstance(cfg, dict) else None
    return isinstance(vision, dict) and vision.get("model_type") in WRAPPED_TOWERS


def _weight_keys(folder: Path) -> list[str]:
    index = _read(folder / "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        return list(index["weight_map"])
    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as src:
            keys += list(json.loads(src.read(struct.unpack("<Q", src.read(8))[0])))
    return keys


def _portable_weights(folder: Path) -> None:
    if not _wrapped_tower(_read(folder / "config.json")):
        return
    for f in sorted(folder.glob("*.safetensors")):
        _rename_keys(f)
    index = _read(folder / "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        index["weight_map"] = {_tower_key(k): v for k, v in index["weight_map"].items()}
        _write(folder / "model.safetensors.index.json", index)


def make_portable(folder) -> list[str]:
    """Rewrite the config, tokenizer and processor files of ``folder`` (one tokengraft just wrote)
    so transformers 4.48 ... 5.x read the same thing; the 5.x keys stay. Returns, and warns
    (PortabilityWarning), what old readers cannot be told. Idempotent."""
    folder = Path(folder)
    notes = _portable_config(folder)
    _portable_specials(folder)
    _portable_processor(folder)
    _portable_weights(folder)
    for n in notes:
        warnings.warn(n, PortabilityWarning, stacklevel=2)
    return notes


# -- what an older transformers would read differently (doctor) --------------------------------

def _rope_misreadings(c: dict, where: str) -> list[str]:
    rp = c.get("rope_parameters")
    if not isinstance(rp, dict) or all(isinstance(v, dict) for v in rp.values()):
        return []
    out = []
    theta = rp.get("rope_theta")
    if theta is not None and c.get("rope_theta") != theta:
        old = c.get("rope_theta", "10000 (its default)")
        out.append(f"{where}: transformers {OLDEST} reads rope_theta {old} instead of {theta} "
                   f"(the rope is only in rope_parameters); its logits would be wrong, silently")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default" and not isinstance(c.get("rope_scaling"), dict):
        out.append(f"{where}: transformers {OLDEST} reads no rope scaling instead of {kind!r} "
                   f"(only in rope_parameters)")
    return out


def _dtype_misreading(c: dict, where: str) -> list[str]:
    dtype = c.get("dtype")
    if isinstance(dtype, str) and dtype != "float32" and "torch_dtype" not in c:
        return [f"{where}: transformers 4.x reads no torch_dtype (dtype is 5.x's key): torch_dtype='auto' "
                f"loads float32 there instead of {dtype}"]
    return []


def _try_read(path: Path):
    try:
        return _read(path)
    except (OSError, ValueError):  # unreadable or not JSON: doctor's other checks say so
        return None


def misreadings(folder) -> list[str]:
    """One line per field of ``folder`` that a supported transformers would read differently from
    transformers 5 (or not at all); the folder is only read."""
    folder = Path(folder)
    out = []
    cfg = _try_read(folder / "config.json")
    if isinstance(cfg, dict):
        for where, c in _config_dicts(cfg):
            out += _rope_misreadings(c, where) + _dtype_misreading(c, where)
    tc = _try_read(folder / "tokenizer_config.json")
    if isinstance(tc, dict) and tc.get("tokenizer_class") in NEW_TOKENIZER_CLASSES:
        out.append(f"tokenizer_config.json: transformers 4.x cannot load the tokenizer (tokenizer_class "
                   f"{tc['tokenizer_class']!r} does not exist before 5.0)")
    for name in SPECIAL_FILES:
        d = _try_read(folder / name)
        if isinstance(d, dict) and isinstance(d.get("extra_special_tokens"), list):
            out.append(f"{name}: transformers {OLDEST} fails to load the tokenizer (extra_special_tokens is a "
                       f"list; 4.x expects additional_special_tokens)")
    try:
        bare = _wrapped_tower(cfg) and any(_tower_key(k) != k for k in _weight_keys(folder))
    except (OSError, ValueError, struct.error):  # a damaged weights file: doctor's weight checks say so
        bare = False
    if bare:
        out.append(f"*.safetensors: the vision tower is saved as vision_tower.* without vision_model.: transformers 4.x "
                   f"finds none of its weights and runs a randomly initialized tower (a warning only)")
    if isinstance(cfg, dict) and "vision_config" in cfg and "text_config" in cfg \
            and not (folder / "preprocessor_config.json").is_file():
        out.append(f"preprocessor_config.json: missing; transformers {OLDEST}'s AutoProcessor cannot load this "
                   f"LLaVA's processor without it")
    return out
