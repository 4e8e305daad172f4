"""InternLM2's config.json read as the Llama config that computes the same model; what cannot be
represented exactly is refused, naming the field."""
from __future__ import annotations

from ..errors import TokengraftError

MODEL_TYPE = "internlm2"


class InternLM2Error(TokengraftError):
    pass


def is_internlm2(config: dict | None) -> bool:
    return bool(config) and config.get("model_type") == MODEL_TYPE


def is_internlm2_folder(folder) -> bool:
    """A raw InternLM2 folder: its config.json says internlm2, or (a tokenizer-only folder) its
    tokenizer_config.json names InternLM2's tokenizer class. Unreadable files mean no."""
    from ..files import read_json
    from pathlib import Path

    tests = (("config.json", is_internlm2),
             ("tokenizer_config.json", lambda d: str(d.get("tokenizer_class", "")).startswith("InternLM2")))
    for name, test in tests:
        f = Path(folder) / name
        try:
            if f.is_file() and test(read_json(f, "a JSON config", kind=dict)):
                return True
        except (TokengraftError, AttributeError):  # unreadable: not recognised here, reported by its reader
            continue
    return False


# -- config ---------------------------------------------------------------------------------------

def _dims(cfg: dict) -> tuple[int, int, int, int]:
    """(heads, kv_heads, head_dim, q heads per kv head) of an InternLM2 config."""
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    if cfg["hidden_size"] % heads or heads % kv:
        raise InternLM2Error(f"config.json: hidden_size {cfg['hidden_size']}, num_attention_heads {heads}, "
                             f"num_key_value_heads {kv} do not divide evenly; this is not an InternLM2 config")
    return heads, kv, cfg["hidden_size"] // heads, heads // kv


def check_config(cfg: dict, where: str = "config.json") -> None:
    """Refuse what a Llama model cannot represent exactly (one line naming the field)."""
    if not is_internlm2(cfg):
        raise InternLM2Error(f"{where}: model_type is {cfg.get('model_type')!r}, not 'internlm2'")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if not isinstance(cfg.get(k), int)]
    if missing:
        raise InternLM2Error(f"{where}: missing integer field(s) {', '.join(missing)}; not a complete InternLM2 config")
    if cfg.get("bias", False):
        raise InternLM2Error(f"{where}: 'bias': true (biases on wqkv/wo) is not supported by the InternLM2 bridge; "
                             f"only bias-free InternLM2 models can be read")
    rs = cfg.get("rope_scaling")
    if rs is not None:
        kind = rs.get("type", rs.get("rope_type")) if isinstance(rs, dict) else None
        if kind not in ("linear", "dynamic"):
            raise InternLM2Error(f"{where}: 'rope_scaling' type {kind!r} cannot be represented exactly by the bridge "
                                 f"(only 'linear', 'dynamic' or null); set rope_scaling to null in a copy of the "
                                 f"folder if you only use contexts up to max_position_embeddings")
        if not isinstance(rs.get("factor"), (int, float)):
            raise InternLM2Error(f"{where}: 'rope_scaling' has no numeric 'factor'")
    if cfg.get("tie_word_embeddings", False):
        raise InternLM2Error(f"{where}: 'tie_word_embeddings': true; InternLM2 keeps a separate 'output' head "
                             f"and the bridge expects one")
    _dims(cfg)


def llama_config(cfg: dict, where: str = "config.json"):
    """The LlamaConfig that computes what the InternLM2 config describes."""
    from transformers import LlamaConfig

    check_config(cfg, where)
    heads, kv, head_dim, _ = _dims(cfg)
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    rs = cfg.get("rope_scaling")
    if rs:
        # 'dynamic' is transformers' dynamic NTK rope: the same base formula InternLM2's own code uses
        # once a sequence outgrows max_position_embeddings (see docs/internlm2.md for the one difference)
        rope.update(rope_type=rs.get("type", rs.get("rope_type")), factor=float(rs["factor"]))
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_parameters=rope,
        initializer_range=cfg.get("initializer_range", 0.02), attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"), use_cache=cfg.get("use_cache", True))
