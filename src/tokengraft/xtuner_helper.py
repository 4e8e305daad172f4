"""Load an old-vocabulary checkpoint into a resized XTuner model by token identity, inside XTuner.

For people who would rather not convert files: in the XTuner environment (transformers 4.48,
mmengine 0.10.x) this module needs only torch and the standard library (it must never import
transformers 5). Install tokengraft there without its dependencies, so XTuner's pins stay:

    pip install --no-deps tokengraft

then, in the XTuner config, wrap the usual ``model = dict(type=LLaVAModel, ...)``::

    from tokengraft.xtuner_helper import llava_from_old_checkpoint
    model = dict(type=llava_from_old_checkpoint,
                 model=dict(type=LLaVAModel, llm=..., visual_encoder=..., ...),  # llm: resized, new tokenizer
                 checkpoint='work_dirs/old/iter_4.pth',      # mmengine iter_N.pth (or a plain state dict)
                 old_tokenizer='path/to/old_tokenizer',      # folders with tokenizer.json
                 new_tokenizer='path/to/new_tokenizer')

Every checkpoint tensor whose shape matches the model is loaded as is; a vocabulary-shaped one
(embedding, head, tied or not) gets each token's trained row at that token's new id, matched by
the token's string; tokens new to the model keep the rows the model was built with (what
``resize_token_embeddings`` gave them). The checkpoint is read with tokengraft's restricted
unpickler: nothing from the file runs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .files import read_json

log = logging.getLogger("tokengraft.xtuner_helper")


class TokenIdentityError(ValueError):
    """The checkpoint cannot be loaded into the model by token identity (one line says why)."""


def token_strings(tokenizer_dir) -> list:
    """Token string of every id (None for unused ids), read from ``tokenizer.json`` alone."""
    path = Path(tokenizer_dir)
    path = path if path.suffix == ".json" else path / "tokenizer.json"
    try:
        data = read_json(path, "a tokenizer.json", error=TokenIdentityError, kind=dict)
        vocab = data["model"]["vocab"]
    except (KeyError, TypeError) as e:
        raise TokenIdentityError(f"{path}: cannot read a tokenizer.json vocabulary ({e})") from None
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):  # BPE / WordLevel / WordPiece: piece -> id
        by_id.update((int(i), t) for t, i in vocab.items())
    else:  # Unigram: [[piece, score], ...] in id order
        by_id.update((i, pair[0]) for i, pair in enumerate(vocab))
    for added in data.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
    out = [None] * (max(by_id) + 1 if by_id else 0)
    for i, t in by_id.items():
        out[i] = t
    return out


def _read_state_dict(ckpt_path) -> dict:
    from tokengraft.checkpoint.safe_pickle import safe_load  # torch-only restricted unpickler

    obj = safe_load(ckpt_path)
    for key in ("state_dict", "module", "model"):  # mmengine, DeepSpeed model states, plain wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise TokenIdentityError(f"{ckpt_path}: holds no state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_by_token_identity(model: torch.nn.Module, ckpt_path, old_tokenizer_dir, new_tokenizer_dir) -> dict:
    """Load ``ckpt_path`` (trained at the old vocabulary) into ``model`` (at the new one).

    Returns a small report: ``loaded`` (keys loaded as is), ``remapped`` (vocabulary keys ->
    rows carried), ``new_tokens`` (strings with no trained row), ``dropped_tokens`` (checkpoint
    tokens the new vocabulary lacks), ``ignored`` (checkpoint keys the model does not have)."""
    old, new = token_strings(old_tokenizer_dir), token_strings(new_tokenizer_dir)
    old_id = {t: i for i, t in enumerate(old) if t is not None}
    pairs = [(j, old_id[t]) for j, t in enumerate(new) if t is not None and t in old_id]
    new_ids = torch.tensor([j for j, _ in pairs], dtype=torch.long)
    old_ids = torch.tensor([i for _, i in pairs], dtype=torch.long)
    ckpt = _read_state_dict(ckpt_path)
    # nn.Module's own state_dict: XTuner's LLaVAModel.state_dict() hides frozen parts
    current = torch.nn.Module.state_dict(model)
    out, remapped, ignored = {}, {}, []
    for key, v in ckpt.items():
        have = current.get(key)
        if have is None:
            ignored.append(key)
        elif tuple(have.shape) == tuple(v.shape):
            out[key] = v
        elif (v.dim() >= 1 and v.shape[1:] == have.shape[1:] and v.shape[0] >= len(old)
              and have.shape[0] >= len(new)):
            if pairs and (int(old_ids.max()) >= v.shape[0] or int(new_ids.max()) >= have.shape[0]):
                raise TokenIdentityError(f"{key}: rows {tuple(v.shape)} / {tuple(have.shape)} do not cover the "
                                         f"tokenizers' {len(old)} / {len(new)} ids")
            rows = have.detach().clone()  # new tokens keep the rows the model was built with
            rows[new_ids] = v[old_ids].to(rows.dtype)
            out[key] = rows
            remapped[key] = len(pairs)
        else:
            raise TokenIdentityError(f"{key}: checkpoint shape {tuple(v.shape)} does not fit the model's "
                                     f"{tuple(have.shape)}, and it is not a vocabulary-sized tensor of "
                                     f"{len(old)} -> {len(new)} rows")
    if not remapped and len(old) != len(new):
        log.warning("tokengraft: no vocabulary-shaped tensor in %s differs from the model; nothing remapped",
                    ckpt_path)
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert not unexpected, unexpected  # every key in `out` exists in the model
    kept = {t for t in old if t is not None}
    report = {"loaded": len(out) - len(remapped), "remapped": remapped,
              "new_tokens": [t for t in new if t is not None and t not in old_id],
              "dropped_tokens": sorted(kept - set(t for t in new if t is not None)), "ignored": ignored}
    log.warning("tokengraft: loaded %s by token identity: %d tensors as is, %s remapped (%d rows each), "
                "%d new tokens, %d dropped, %d checkpoint keys not in the model", ckpt_path, report["loaded"],
                ", ".join(remapped) or "none", len(pairs), len(report["new_tokens"]),
                len(report["dropped_tokens"]), len(ignored))
    return report


def llava_from_old_checkpoint(model, checkpoint, old_tokenizer, new_tokenizer):
    """An mmengine builder (``type=`` in a config): build ``model`` (a config dict or a module),
    then load ``checkpoint`` into it by token identity. Use instead of ``pretrained_pth``."""
    if not isinstance(model, torch.nn.Module):
        from mmengine.registry import MODELS  # present in the XTuner environment this is for

        model = MODELS.build(model)
    load_by_token_identity(model, checkpoint, old_tokenizer, new_tokenizer)
    return model
