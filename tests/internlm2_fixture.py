"""A small InternLM2 folder built from real weights, for the InternLM2 bridge tests.

Real SmolLM2-135M layers (the first few) packed into InternLM2's layout (``wqkv`` grouped per
kv head, ``w1/w2/w3``, ``attention_norm`` ...), untied (``output`` holds other real SmolLM2 rows
than ``tok_embeddings``), bf16 like the hub checkpoints, with a real sentencepiece tokenizer
(Mistral v1, 32,000 pieces) to which InternLM2's six special tokens are appended as user-defined
pieces at the top ids, as in InternLM2's own ``tokenizer.model``. The remote-code files a hub
folder ships are planted too: importing any of them writes a marker file and raises.

The packing here is written independently of ``tokengraft.internlm2`` (no import from it), so a
mistake in the bridge cannot cancel out against the same mistake in the fixture.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

SPECIALS = {  # InternLM2-chat's added tokens, in its order (92538.. there, 32000.. here)
    "<|plugin|>": 0, "<|interpreter|>": 1, "<|action_end|>": 2, "<|action_start|>": 3,
    "<|im_end|>": 4, "<|im_start|>": 5,
}
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
REMOTE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                "tokenization_internlm2_fast.py")
MARKER = "REMOTE_CODE_RAN"


def marker_path(folder) -> Path:
    """Where a planted remote-code file reports that it was imported (beside the folder)."""
    return Path(folder).parent / MARKER


def _remote_code(marker: Path) -> str:
    return ("# planted by tokengraft's tests: a model folder's code must never run\n"
            "import pathlib\n"
            f"pathlib.Path({str(marker)!r}).write_text(__file__)\n"
            "raise RuntimeError('remote code from an InternLM2 folder was imported')\n")


def _sp_model_with_specials(src: Path, dest: Path) -> int:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(src.read_bytes())
    for content in SPECIALS:
        p = m.pieces.add()
        p.piece, p.score, p.type = content, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    dest.write_bytes(m.SerializeToString())
    return len(m.pieces)


def _pack_qkv(q, k, v, kv_heads: int, head_dim: int):
    """InternLM2's wqkv: for each kv head, its q heads, then its k head, then its v head."""
    import torch

    g = q.shape[0] // (kv_heads * head_dim)
    blocks = []
    for h in range(kv_heads):
        for j in range(g):
            blocks.append(q[(h * g + j) * head_dim:(h * g + j + 1) * head_dim])
        blocks.append(k[h * head_dim:(h + 1) * head_dim])
        blocks.append(v[h * head_dim:(h + 1) * head_dim])
    return torch.cat(blocks, 0).contiguous()


def build_internlm2(smollm2_dir, sp_dir, dest, layers: int = 4, rope_scaling=None) -> Path:
    """Write the InternLM2 folder ``dest`` (see the module docstring) and return it."""
    import torch
    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    dest.mkdir(parents=True)
    n = _sp_model_with_specials(Path(sp_dir) / "tokenizer.model", dest / "tokenizer.model")
    src = json.loads((Path(smollm2_dir) / "config.json").read_text())
    w = load_file(str(Path(smollm2_dir) / "model.safetensors"))
    heads, kv = src["num_attention_heads"], src["num_key_value_heads"]
    hd = src["hidden_size"] // heads
    emb = w["model.embed_tokens.weight"]
    sd = {"model.tok_embeddings.weight": emb[:n].clone(),
          "output.weight": emb[emb.shape[0] - n:].clone(),  # other real rows: an untied head
          "model.norm.weight": w["model.norm.weight"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = _pack_qkv(w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"],
                                                    w[p + "self_attn.v_proj.weight"], kv, hd)
        sd[p + "attention.wo.weight"] = w[p + "self_attn.o_proj.weight"]
        sd[p + "feed_forward.w1.weight"] = w[p + "mlp.gate_proj.weight"]
        sd[p + "feed_forward.w3.weight"] = w[p + "mlp.up_proj.weight"]
        sd[p + "feed_forward.w2.weight"] = w[p + "mlp.down_proj.weight"]
        sd[p + "attention_norm.weight"] = w[p + "input_layernorm.weight"]
        sd[p + "ffn_norm.weight"] = w[p + "post_attention_layernorm.weight"]
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    theta = (src.get("rope_parameters") or {}).get("rope_theta", src.get("rope_theta", 10000.0))
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "attn_implementation": "eager", "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "hidden_act": "silu", "hidden_size": src["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": src["intermediate_size"], "max_position_embeddings": src["max_position_embeddings"],
        "model_type": "internlm2", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv, "rms_norm_eps": src["rms_norm_eps"], "rope_scaling": rope_scaling,
        "rope_theta": theta, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.41.0", "use_cache": True, "vocab_size": n,
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dest / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, n - 2], "pad_token_id": 2}, indent=2) + "\n")
    base = n - len(SPECIALS)

    def entry(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>")}
    decoder.update({str(base + off): entry(c) for c, off in SPECIALS.items()})
    specials_list = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>"]
    tc = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": specials_list,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>", "sp_model_kwargs": {}, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>",
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (dest / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": specials_list, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
         "unk_token": "<unk>"}, indent=2) + "\n")
    for name in REMOTE_FILES:
        (dest / name).write_text(_remote_code(marker_path(dest)))
    return dest


def reference_logits(folder, input_ids=None, *, weights=None, embeds=None):
    """InternLM2's forward written by hand from the PACKED weights (fp32): RMSNorm, rotary embedding
    (with linear or dynamic-NTK scaling when configured), grouped-query attention from ``wqkv`` slices, SwiGLU."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    # ``weights``: packed InternLM2 tensors to use instead of the folder's; ``embeds``: (T, hidden) inputs
    w = {k: v.float() for k, v in (weights or load_file(str(folder / "model.safetensors"))).items()}
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg["hidden_size"] // H
    G = H // KV
    eps = cfg["rms_norm_eps"]
    ids = torch.as_tensor(input_ids) if embeds is None else None
    T = ids.shape[-1] if embeds is None else embeds.shape[0]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    pos = torch.arange(T, dtype=torch.float32)
    rs, base = cfg.get("rope_scaling") or {}, cfg["rope_theta"]
    if rs.get("type") == "linear":
        pos = pos / rs["factor"]
    elif rs.get("type") == "dynamic" and T > cfg["max_position_embeddings"]:
        # InternLM2's dynamic NTK: a larger base once the sequence outgrows max_position_embeddings
        f, m = rs["factor"], cfg["max_position_embeddings"]
        base = base * ((f * T / m) - (f - 1)) ** (D / (D - 2))
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # x: (heads, T, D); rotate the two halves of each head
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.tok_embeddings.weight"][ids] if embeds is None else embeds.float()
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        qkv = (h @ w[p + "attention.wqkv.weight"].T).view(T, KV, G + 2, D)
        q = qkv[:, :, :G].reshape(T, H, D).transpose(0, 1)
        k = qkv[:, :, G].transpose(0, 1).repeat_interleave(G, 0)
        v = qkv[:, :, G + 1].transpose(0, 1).repeat_interleave(G, 0)
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(1, 2) / D ** 0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(T, H * D) @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        gate, up = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["output.weight"].T


def copy_without_marker(src, dst) -> Path:
    """A writable copy of the fixture folder (tests that change files work on this)."""
    shutil.copytree(src, dst)
    return Path(dst)
