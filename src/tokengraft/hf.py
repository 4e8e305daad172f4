"""Facts about a transformers model and its config, in one place: tie, rows, every nested
``vocab_size``, the LLaVA image token, padding rows. Used by graft, convert, export, doctor, xtuner.

Two views of the same facts: a live model (``is_tied``, ``rows_of``, ``sync_config``, ``finalize``)
and a ``config.json`` dict (``config_rows``, ``set_config_rows``, ``is_llava``), so checks on a folder
and changes to a model agree on which fields exist. Imports torch only (no transformers).
"""
from __future__ import annotations

import torch

from .compat import set_image_token_id
from .errors import TokengraftError
from .manifest import Manifest
from .vocab import fingerprint, vocab_of

# the dtypes a model folder is written in (export --dtype, import-xtuner --dtype)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelFactsError(TokengraftError):
    """The model, its config and its tokenizer do not belong together."""

# Nested language-model configs: LLaVA (`text_config`), InternVL/XTuner-style (`llm_config`),
# others (`language_config`). Every one of them carries a vocab_size that must equal the rows.
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")
IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
# ids that live in the vocabulary: after a vocabulary change they are the target tokenizer's
TOKEN_ID_KEYS = ("image_token_index", "image_token_id", "video_token_index", "video_token_id",
                 "pad_token_id", "bos_token_id", "eos_token_id")


# -- a live model -------------------------------------------------------------------------------

def is_tied(model) -> bool:
    """True when the output head *is* the input embedding (the same Parameter)."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def rows_of(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def _configs(model) -> list:
    cfg = model.config
    found = {id(cfg): cfg}
    for c in (cfg.get_text_config(), *(getattr(cfg, k, None) for k in TEXT_CONFIG_KEYS)):
        if c is not None and not isinstance(c, dict):
            found.setdefault(id(c), c)
    return list(found.values())


def sync_config(model, rows: int, tied: bool) -> None:
    """Every vocab_size field equals the rows; every tie flag equals reality."""
    for c in _configs(model):
        if "vocab_size" in c.to_dict() or hasattr(c, "vocab_size"):
            c.vocab_size = rows
        c.tie_word_embeddings = tied


def image_token_id(model) -> int | None:
    """The LLaVA image placeholder id the model's config declares (None for a text model)."""
    for name in IMAGE_TOKEN_KEYS:
        v = getattr(model.config, name, None)
        if isinstance(v, int):
            return v
    return None


def padding_rows(vocab: list, rows: int) -> list[int]:
    """Rows no token uses (ids with no token, or beyond the vocabulary): never to be generated."""
    return [i for i, t in enumerate(vocab) if t is None] + list(range(len(vocab), rows))


def image_token_of(model, tokenizer, processor) -> int | None:
    """LLaVA's image placeholder id, read from the processor's token (the tokenizer is the truth);
    None for a text model."""
    if not is_llava(model.config.to_dict()):
        return None
    tok = getattr(processor, "image_token", None) or "<image>"
    tid = tokenizer.convert_tokens_to_ids(tok)
    if not isinstance(tid, int) or tid == tokenizer.unk_token_id or tok not in tokenizer.get_vocab():
        raise ModelFactsError(f"the LLaVA tokenizer has no image token {tok!r}; add it with `tokengraft add`")
    return tid


def suppress_padding(generation_config, vocab: list, rows: int, manifest: Manifest) -> None:
    """``suppress_tokens`` = the deliberate suppressions of real tokens + every padding row. A token
    the manifest added to be generated is never suppressed (older `add` outputs kept the suppression
    of the padding row the token took over)."""
    generated = {t.id for t in manifest.tokens if t.role == "generate"}
    keep = [t for t in (generation_config.suppress_tokens or [])
            if t < len(vocab) and vocab[t] is not None and t not in generated]
    generation_config.suppress_tokens = sorted(set(keep) | set(padding_rows(vocab, rows))) or None


def finalize(model, tokenizer, processor, manifest: Manifest | None) -> Manifest:
    """Make an in-memory model true to its weights and tokenizer before it is written: every
    vocab_size and tie flag, the LLaVA image token id, a generation config that stops at the
    manifest's stop tokens and suppresses padding rows. Returns the manifest to write (a fresh one,
    recording the tokenizer as the base, for a folder tokengraft never touched)."""
    rows, tied = rows_of(model), is_tied(model)
    if len(tokenizer) > rows:
        raise ModelFactsError(f"the tokenizer has {len(tokenizer)} tokens but the model only {rows} rows")
    sync_config(model, rows, tied)
    img = image_token_of(model, tokenizer, processor)
    if img is not None:
        set_image_token_id(model.config, img)
    vocab = vocab_of(tokenizer)
    if manifest is None:
        manifest = Manifest(base_fingerprint=fingerprint(vocab), base_size=len(vocab), rows=rows, tied=tied)
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for t in manifest.tokens:
        if t.stop and t.id not in eos:
            eos.append(t.id)
    gen.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
    suppress_padding(gen, vocab, rows, manifest)
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    manifest.rows, manifest.tied, manifest.vocab_fingerprint = rows, tied, fingerprint(vocab)
    return manifest


# -- a config.json dict -------------------------------------------------------------------------

def is_llava(config: dict) -> bool:
    """A LLaVA-style config: a vision tower and a nested language model."""
    return "vision_config" in config and "text_config" in config


def text_configs(config: dict) -> list[tuple[str, dict]]:
    """(where, dict) for the top-level config and every nested language-model config."""
    return [("config", config)] + [(k, config[k]) for k in TEXT_CONFIG_KEYS if isinstance(config.get(k), dict)]


def config_rows(config: dict | None) -> int | None:
    """The rows a config.json declares (the nested language model's vocab_size wins)."""
    if not config:
        return None
    for _, c in reversed(text_configs(config)):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def set_config_rows(config: dict, rows: int, target: dict | None = None) -> dict:
    """A copy of ``config`` whose every vocab_size equals ``rows``; ids that live in the vocabulary
    (image token, pad/bos/eos) are taken from ``target`` (a config of the new vocabulary) where it has them."""
    out = dict(config)
    target = target or {}
    for k in TOKEN_ID_KEYS:
        if k in target:
            out[k] = target[k]
    if "vocab_size" in out:
        out["vocab_size"] = rows
    for key in TEXT_CONFIG_KEYS:
        if isinstance(out.get(key), dict):
            sub = {**out[key], "vocab_size": rows}
            tsub = target.get(key) if isinstance(target.get(key), dict) else {}
            for k in TOKEN_ID_KEYS:
                if k in tsub:
                    sub[k] = tsub[k]
            out[key] = sub
    return out
