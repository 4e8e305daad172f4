"""The two key layouts (InternLM2's packed ``wqkv`` and renamed keys vs Llama's), bit-exact both
ways, and reading an InternLM2 folder's weight files without running anything from them."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import files as user_files
from .config import InternLM2Error, _dims

# -- tensors: the two key layouts -----------------------------------------------------------------

# InternLM2 suffix -> Llama suffix, inside ``model.layers.N.``
_LAYER = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# buffers older remote code saved; derived from the config, never weights
_DERIVED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def unpack_wqkv(w: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``wqkv`` are grouped per kv head as (kv_heads, q_per_kv + 2, head_dim): the group's q
    heads, then its k head, then its v head. Query head h*q_per_kv + j is row block (h, j)."""
    _, kv, hd, g = _dims(cfg)
    if w.shape[0] != kv * (g + 2) * hd:
        raise InternLM2Error(f"wqkv has {w.shape[0]} rows, expected {kv * (g + 2) * hd} "
                             f"(kv_heads {kv} x (q_per_kv {g} + 2) x head_dim {hd}); config and weights disagree")
    grouped = w.reshape(kv, g + 2, hd, *w.shape[1:])
    q = grouped[:, :g].reshape(kv * g * hd, *w.shape[1:])
    k = grouped[:, g].reshape(kv * hd, *w.shape[1:])
    v = grouped[:, g + 1].reshape(kv * hd, *w.shape[1:])
    return q.clone(), k.clone(), v.clone()


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Inverse of :func:`unpack_wqkv`."""
    _, kv, hd, g = _dims(cfg)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(kv, g, hd, *rest), k.reshape(kv, 1, hd, *rest), v.reshape(kv, 1, hd, *rest)], 1)
    return grouped.reshape(kv * (g + 2) * hd, *rest).contiguous()


def to_llama(state_dict: dict, cfg: dict) -> dict:
    """InternLM2 key layout -> Llama key layout. Unknown keys are refused, never dropped silently."""
    out, qkv = {}, {}
    for key, t in state_dict.items():
        if _DERIVED.search(key):
            continue
        if key in _TOP:
            out[_TOP[key]] = t
            continue
        m = _LAYER_KEY.match(key)
        if m and m.group(2) == "attention.wqkv.weight":
            qkv[m.group(1)] = t
        elif m and m.group(2) in _LAYER:
            out[f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"] = t
        else:
            raise InternLM2Error(f"weight {key!r} is not part of the InternLM2 layout the bridge knows "
                                 f"(biases and extra modules are not supported)")
    for n, w in qkv.items():
        q, k, v = unpack_wqkv(w, cfg)
        for name, part in zip("qkv", (q, k, v)):
            out[f"model.layers.{n}.self_attn.{name}_proj.weight"] = part
    return out


def from_llama(state_dict: dict, cfg: dict) -> dict:
    """Llama key layout -> InternLM2 key layout (packed ``wqkv``). Inverse of :func:`to_llama`."""
    top = {v: k for k, v in _TOP.items()}
    layer = {v: k for k, v in _LAYER.items()}
    out, parts = {}, {}
    for key, t in state_dict.items():
        if key in top:
            out[top[key]] = t
            continue
        m = _LAYER_KEY.match(key)
        sub = m.group(2) if m else None
        if sub in layer:
            out[f"model.layers.{m.group(1)}.{layer[sub]}"] = t
        elif sub in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            parts.setdefault(m.group(1), {})[sub[10]] = t
        else:
            raise InternLM2Error(f"weight {key!r} has no place in the InternLM2 layout "
                                 f"(merge adapters and drop biases before writing InternLM2)")
    for n, p in parts.items():
        if set(p) != {"q", "k", "v"}:
            raise InternLM2Error(f"layer {n}: q/k/v projections incomplete ({sorted(p)}); cannot pack wqkv")
        out[f"model.layers.{n}.attention.wqkv.weight"] = pack_wqkv(p["q"], p["k"], p["v"], cfg)
    return out


# -- files ----------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    return user_files.read_json(path, "a JSON object", error=InternLM2Error, kind=dict)


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: sharded or single safetensors first, then ``.bin``."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            files = sorted(set(user_files.read_index(folder / index, error=InternLM2Error).values()))
            return [folder / f for f in files]
        if (folder / single).is_file():
            return [folder / single]
    raise InternLM2Error(f"{folder}: no model.safetensors, pytorch_model.bin or their index; not a model folder")


def read_weights(folder) -> dict:
    """Every tensor of an InternLM2 folder, by its own names. ``.bin`` goes through the restricted
    unpickler (no code from the file runs); safetensors through the safetensors library."""
    from safetensors.torch import load_file

    sd = {}
    for f in weight_files(Path(folder)):
        if f.suffix == ".safetensors":
            part = load_file(str(f))
        else:
            from ..checkpoint.safe_pickle import safe_load

            part = safe_load(f)
            part = part.get("state_dict", part) if isinstance(part, dict) else part
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise InternLM2Error(f"{f}: expected a dict of tensors")
        sd.update(part)
    return sd
