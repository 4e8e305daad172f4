"""InternLM2 folders read and written without their remote code.

InternLM2 (``model_type: internlm2``) is the Llama architecture with renamed weights and a packed
attention projection; its hub folders ship ``modeling_internlm2.py`` / ``tokenization_internlm2.py``
that transformers would only run with ``trust_remote_code``. Here those files are data: the weights
are renamed and unpacked into a :class:`transformers.LlamaForCausalLM`, and the sentencepiece
``tokenizer.model`` becomes a transformers Llama tokenizer that encodes exactly as InternLM2's own
tokenizer does (sentencepiece on each stretch of text between special tokens).

``to_llama`` / ``from_llama`` are pure maps between the two key layouts (bit-exact both ways), so
convert, export and the XTuner importer can reuse them on raw state dicts.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import TokengraftError

MODEL_TYPE = "internlm2"


class InternLM2Error(TokengraftError):
    pass


def is_internlm2(config: dict | None) -> bool:
    return bool(config) and config.get("model_type") == MODEL_TYPE


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
        if kind != "linear":
            raise InternLM2Error(f"{where}: 'rope_scaling' type {kind!r} cannot be represented exactly by the bridge "
                                 f"(only 'linear' or null); set rope_scaling to null in a copy of the folder if "
                                 f"you only use contexts up to max_position_embeddings")
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
    if cfg.get("rope_scaling"):
        rope.update(rope_type="linear", factor=float(cfg["rope_scaling"]["factor"]))
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_parameters=rope,
        initializer_range=cfg.get("initializer_range", 0.02), attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"), use_cache=cfg.get("use_cache", True))


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
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InternLM2Error(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: sharded or single safetensors first, then ``.bin``."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            files = sorted(set(read_json(folder / index).get("weight_map", {}).values()))
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
            from .checkpoint.safe_pickle import safe_load

            part = safe_load(f)
            part = part.get("state_dict", part) if isinstance(part, dict) else part
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise InternLM2Error(f"{f}: expected a dict of tensors")
        sd.update(part)
    return sd


# -- tokenizer ------------------------------------------------------------------------------------

PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
SP_BPE = 2


def _sp_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise InternLM2Error(f"reading {path} needs the sentencepiece and protobuf packages "
                             f"(pip install sentencepiece protobuf): {e}") from None
    from google.protobuf.message import DecodeError

    m = pb.ModelProto()
    try:
        m.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise InternLM2Error(f"{path}: not a sentencepiece model ({e})") from None
    return m


def _check_sp(m, path: Path) -> None:
    """The sentencepiece options the bridge reproduces; anything else is refused by name."""
    ts, ns = m.trainer_spec, m.normalizer_spec
    bad = []
    if ts.model_type != SP_BPE:
        bad.append(f"trainer_spec.model_type {ts.model_type} (only BPE, 2)")
    if ts.treat_whitespace_as_suffix:
        bad.append("trainer_spec.treat_whitespace_as_suffix")
    if ns.remove_extra_whitespaces:
        bad.append("normalizer_spec.remove_extra_whitespaces")
    if ns.precompiled_charsmap or ns.name not in ("identity", ""):
        bad.append(f"normalizer_spec.name {ns.name!r} (only 'identity')")
    if bad:
        raise InternLM2Error(f"{path}: sentencepiece option(s) the bridge cannot reproduce exactly: {', '.join(bad)}")


def _sp_backend(m):
    """A ``tokenizers`` pipeline that segments like sentencepiece's BPE on one stretch of text.

    Sentencepiece merges the adjacent pair whose result has the highest score, so merges are ranked by
    the score of the piece they make (ties: lower id first); words start at whitespace (a run of
    whitespace stays with the word after it when whitespace-only pieces are allowed)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    pieces = m.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece for p in pieces if p.type == PIECE_NORMAL}
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != PIECE_NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            a, b = p.piece[:cut], p.piece[cut:]
            if a in mergeable and b in mergeable:
                ranked.append((-p.score, i, cut, a, b))
    ranked.sort()
    unk = next((p.piece for p in pieces if p.type == PIECE_UNKNOWN), None)
    bpe = BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk, fuse_unk=True,
              byte_fallback=m.trainer_spec.byte_fallback)
    ws = "\u2581"
    norm = [normalizers.Replace(" ", ws)]
    if m.normalizer_spec.add_dummy_prefix:
        norm.insert(0, normalizers.Prepend(ws))
    words = f"{ws}+[^{ws}]*|[^{ws}]+" if m.trainer_spec.allow_whitespace_only_pieces else f"{ws}[^{ws}]*|[^{ws}]+"
    pre = pre_tokenizers.Split(Regex(words), behavior="isolated") if m.trainer_spec.split_by_whitespace else None
    dec = [decoders.Replace(ws, " "), decoders.ByteFallback(), decoders.Fuse()]
    if m.normalizer_spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    return bpe, normalizers.Sequence(norm), pre, decoders.Sequence(dec)


def load_tokenizer(folder):
    """InternLM2's tokenizer as a transformers Llama tokenizer, without its remote code: the pieces and
    merges of ``tokenizer.model``, InternLM2's added tokens (``added_tokens_decoder``) at their ids, its
    bos/eos flags and chat template."""
    from transformers import AddedToken, LlamaTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    sp_file = folder / "tokenizer.model"
    if not sp_file.is_file():
        raise InternLM2Error(f"{folder}: no tokenizer.model; an InternLM2 folder keeps its sentencepiece model there")
    tc = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    m = _sp_proto(sp_file)
    _check_sp(m, sp_file)

    def tok_str(v, default):
        return v.get("content", default) if isinstance(v, dict) else (v or default)

    special = {k: tok_str(tc.get(k), d) for k, d in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    with tempfile.TemporaryDirectory(prefix="tokengraft-internlm2-") as tmp:
        shutil.copy(sp_file, Path(tmp) / "tokenizer.model")  # the model file alone: nothing else is read
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=bool(tc.get("add_bos_token", True)),
                                             add_eos_token=bool(tc.get("add_eos_token", False)), **special)
    backend = tok.backend_tokenizer  # its post-processor (bos/eos) and added pieces are kept
    backend.model, backend.normalizer, backend.pre_tokenizer, backend.decoder = _sp_backend(m)
    # A plain tokenizers-backed class: transformers' LlamaTokenizer would rebuild its own pre-tokenizer
    # on reload (tokenizer.json's pipeline ignored), so a saved copy would no longer encode like InternLM2.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special, add_bos_token=bool(tc.get("add_bos_token", True)),
                                  add_eos_token=bool(tc.get("add_eos_token", False)),
                                  clean_up_tokenization_spaces=bool(tc.get("clean_up_tokenization_spaces", False)))

    n = len(m.pieces)
    decoder = sorted(((int(i), v) for i, v in (tc.get("added_tokens_decoder") or {}).items()), key=lambda x: x[0])
    for i, v in decoder:
        content = v["content"] if isinstance(v, dict) else str(v)
        if i < n:
            if m.pieces[i].piece != content:
                raise InternLM2Error(f"{folder / 'tokenizer_config.json'}: added token {content!r} at id {i}, but "
                                     f"tokenizer.model has {m.pieces[i].piece!r} there")
        elif i != len(tok):
            raise InternLM2Error(f"{folder / 'tokenizer_config.json'}: added token {content!r} at id {i}, but the "
                                 f"next free id is {len(tok)}; added tokens must follow the model's pieces without gaps")
        opts = v if isinstance(v, dict) else {}
        at = AddedToken(content, special=bool(opts.get("special", True)), normalized=bool(opts.get("normalized", False)),
                        lstrip=bool(opts.get("lstrip", False)), rstrip=bool(opts.get("rstrip", False)),
                        single_word=bool(opts.get("single_word", False)))
        tok.add_tokens([at], special_tokens=at.special)
        if tok.convert_tokens_to_ids(content) != i:
            raise InternLM2Error(f"added token {content!r} landed at id {tok.convert_tokens_to_ids(content)}, "
                                 f"not at its id {i}")
    extra = [tok_str(t, None) for t in tc.get("additional_special_tokens") or []]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": [t for t in extra if t]})
    pad = tc.get("pad_token")
    if pad:
        tok.pad_token = tok_str(pad, None)
    if tc.get("chat_template"):
        tok.chat_template = tc["chat_template"]
    if tc.get("model_max_length"):
        tok.model_max_length = tc["model_max_length"]
    _self_check(tok, sp_file)
    return tok


def sp_reference_ids(sp_file, text: str, added: dict[str, int], bos_id: int | None = None) -> list[int]:
    """What InternLM2's own tokenizer computes, straight from the sentencepiece library: ``bos_id``
    (if given), then the text cut at its added tokens (``added``: content -> id), every other stretch
    ``SentencePieceProcessor.encode``d."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    ids = [] if bos_id is None else [bos_id]
    chunks = [text]
    if added:
        pattern = "(" + "|".join(re.escape(s) for s in sorted(added, key=len, reverse=True)) + ")"
        chunks = re.split(pattern, text)
    for c in chunks:
        if c:
            ids += [added[c]] if c in added else sp.encode(c)
    return ids


# prose, code indentation, runs of spaces, a leading space, bytes outside the pieces
_PROBE = ("Beautiful is better than ugly.\nExplicit is better than implicit.\n\n"
          "def f(x):\n    return  x  # two\n\tpass\n leading, trailing   naïve café 日本語 😀 ∑ 1234567")


def _self_check(tok, sp_file: Path) -> None:
    """Refuse a tokenizer.model whose encoding the bridge does not reproduce (checked on a probe text
    with the sentencepiece library, when it is installed)."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return
    added = {t.content: i for i, t in tok.added_tokens_decoder.items()}
    text = _PROBE + "".join(f"{t} x{t}\ny " for t in list(added)[:12])
    want = sp_reference_ids(sp_file, text, added)
    got = tok(text, add_special_tokens=False)["input_ids"]
    if got != want:
        at = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise InternLM2Error(f"{sp_file}: the bridge does not tokenize this sentencepiece model exactly "
                             f"(ids differ from sentencepiece at position {at}); please report it")


# -- the folder -----------------------------------------------------------------------------------

def load_folder(path, dtype=None):
    """(LlamaForCausalLM, tokenizer, None, manifest) for an InternLM2 folder. Nothing in the folder is
    executed or imported; the manifest (the folder's own, or a fresh one) records the bridge."""
    from transformers import LlamaForCausalLM

    from .manifest import Manifest
    from .vocab import fingerprint, vocab_of

    path = Path(path)
    cfg = read_json(path / "config.json")
    lcfg = llama_config(cfg, str(path / "config.json"))
    sd = to_llama(read_weights(path), cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(lcfg)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise InternLM2Error(f"{path}: weights do not match config.json (missing {missing[:3]}, unexpected {extra[:3]})")
    dtype = dtype or torch.float32
    for k in list(sd):  # one tensor at a time: never two full copies of the model in memory
        sd[k] = sd.pop(k).to(dtype)
    model.load_state_dict(sd, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=lcfg)  # buffers were on meta: rebuild them
    model.config.dtype = dtype
    model.eval()
    if (path / "generation_config.json").is_file():  # JSON only
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    tok = load_tokenizer(path)
    if len(tok) > lcfg.vocab_size:
        raise InternLM2Error(f"{path}: the tokenizer has {len(tok)} tokens but the model only {lcfg.vocab_size} rows")
    manifest = Manifest.find(path)
    if manifest is None:
        vocab = vocab_of(tok)
        manifest = Manifest(base_fingerprint=fingerprint(vocab), base_size=len(vocab), rows=lcfg.vocab_size,
                            tied=False, vocab_fingerprint=fingerprint(vocab))
    manifest.record("bridge", source_arch=MODEL_TYPE, source=str(path.resolve()))
    return model, tok, None, manifest


def bridge_source(manifest) -> Path | None:
    """The InternLM2 folder a bridged model came from (the latest ``bridge`` entry of the manifest's
    history), or None: what ``save_folder`` needs as ``original_folder`` for an InternLM2 export."""
    for entry in reversed(getattr(manifest, "history", None) or []):
        if entry.get("op") == "bridge" and entry.get("source_arch") == MODEL_TYPE and entry.get("source"):
            return Path(entry["source"])
    return None


# -- writing the InternLM2 layout back ------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# files of the original folder that save_folder writes itself (everything else is copied as data)
_REWRITTEN = {"config.json", "tokenizer_config.json", "tokenizer.json", "generation_config.json",
              "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json"}


def _check_model_fits(model, cfg: dict, where: str) -> None:
    from .hf import is_tied

    c = model.config
    heads, kv, hd, _ = _dims(cfg)
    want = {"hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_hidden_layers"],
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": cfg["intermediate_size"]}
    got = {k: getattr(c, k, None) for k in want}
    if got != want or getattr(c, "head_dim", hd) != hd:
        diff = ", ".join(f"{k} {got[k]} vs {want[k]}" for k in want if got[k] != want[k])
        raise InternLM2Error(f"{where}: the model does not have this InternLM2 folder's shape ({diff or 'head_dim'}); "
                             f"pass the folder the model was loaded from")
    if is_tied(model):
        raise InternLM2Error("the model's head is tied to its embedding; InternLM2 keeps a separate 'output' head")


def _new_tokens(tokenizer, original_tok) -> list[tuple[int, object]]:
    """(id, AddedToken) of every token the tokenizer has beyond the original InternLM2 tokenizer;
    the original ids must be unchanged."""
    n = len(original_tok)
    if len(tokenizer) < n or tokenizer.convert_ids_to_tokens(list(range(n))) != original_tok.convert_ids_to_tokens(list(range(n))):
        raise InternLM2Error("the tokenizer is not an extension of the original InternLM2 tokenizer (ids changed); "
                             "write the Llama layout instead, or pass the folder the model was loaded from")
    added = tokenizer.added_tokens_decoder
    missing = [i for i in range(n, len(tokenizer)) if i not in added]
    if missing:
        raise InternLM2Error(f"ids {missing[:5]} are not added tokens; only added tokens can be written to InternLM2")
    return [(i, added[i]) for i in range(n, len(tokenizer))]


def _token_entry(t) -> dict:
    return {"content": t.content, "lstrip": bool(t.lstrip), "normalized": bool(t.normalized),
            "rstrip": bool(t.rstrip), "single_word": bool(t.single_word), "special": bool(t.special)}


def save_folder(model, tokenizer, out, original_folder, manifest=None, overwrite: bool = False) -> Path:
    """Write ``model`` (a bridged Llama) in the original InternLM2 layout of ``original_folder``: packed
    ``wqkv`` and InternLM2 key names in the original dtype and shard files, the original config.json
    (``auto_map`` included; ``vocab_size`` = rows), the original tokenizer files with the new tokens
    in ``added_tokens_decoder``, every other file of the folder copied as data, and the manifest."""
    from safetensors.torch import save_file

    from .outdir import atomic_folder

    original_folder = Path(original_folder)
    cfg = read_json(original_folder / "config.json")
    check_config(cfg, str(original_folder / "config.json"))
    _check_model_fits(model, cfg, str(original_folder))
    rows = model.get_input_embeddings().weight.shape[0]
    sd = from_llama({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    dtype = _DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype"), next(iter(sd.values())).dtype)
    sd = {k: v.to("cpu", dtype).contiguous() for k, v in sd.items()}
    new = _new_tokens(tokenizer, load_tokenizer(original_folder))

    with atomic_folder(out, overwrite) as tmp:
        for f in original_folder.iterdir():  # data only: *.py files are copied, never imported
            if f.is_file() and f.name not in _REWRITTEN and f.suffix not in (".safetensors", ".bin") \
                    and f.name != "tokengraft.json":
                shutil.copy2(f, tmp / f.name)
        index = original_folder / "model.safetensors.index.json"
        if index.is_file():  # keep the original sharding: each tensor in the file it came from
            wmap = read_json(index)["weight_map"]
            unknown = sorted(set(sd) - set(wmap))
            if unknown:
                raise InternLM2Error(f"{index}: no shard for {unknown[:3]}")
            for fname in sorted(set(wmap.values())):
                save_file({k: sd[k] for k in sd if wmap[k] == fname}, str(tmp / fname), metadata={"format": "pt"})
            total = sum(t.numel() * t.element_size() for t in sd.values())
            (tmp / index.name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap},
                                                     indent=2) + "\n")
        else:
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows}, indent=2, ensure_ascii=False) + "\n")
        _write_generation_config(model, original_folder, tmp)
        _write_tokenizer_files(original_folder, tmp, new)
        if manifest is not None:
            manifest = copy.deepcopy(manifest)
            manifest.record("layout", layout=MODEL_TYPE, source_arch=MODEL_TYPE)
            manifest.save(tmp)
    return Path(out)


def _write_generation_config(model, original_folder: Path, tmp: Path) -> None:
    """The original generation config, plus the rows graft asked never to generate (padding rows)."""
    src = original_folder / "generation_config.json"
    gen = read_json(src) if src.is_file() else {}
    suppress = getattr(getattr(model, "generation_config", None), "suppress_tokens", None)
    if suppress:
        gen["suppress_tokens"] = list(suppress)
    if gen:
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _write_tokenizer_files(original_folder: Path, tmp: Path, new: list) -> None:
    tc_path = original_folder / "tokenizer_config.json"
    tc = read_json(tc_path) if tc_path.is_file() else {}
    if new:
        tc["added_tokens_decoder"] = {**(tc.get("added_tokens_decoder") or {}),
                                      **{str(i): _token_entry(t) for i, t in new}}
        extra = tc.get("additional_special_tokens")
        if isinstance(extra, list):
            tc["additional_special_tokens"] = extra + [t.content for _, t in new if t.special and t.content not in extra]
    if tc:
        (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    tj_path = original_folder / "tokenizer.json"
    if tj_path.is_file():  # some InternLM2 folders ship a fast tokenizer too: it learns the same tokens
        tj = read_json(tj_path)
        tj["added_tokens"] = list(tj.get("added_tokens") or []) + [{"id": i, **_token_entry(t)} for i, t in new]
        (tmp / "tokenizer.json").write_text(json.dumps(tj, indent=2, ensure_ascii=False) + "\n")
    smap = tmp / "special_tokens_map.json"
    if new and smap.is_file():
        sm = read_json(smap)
        extra = sm.get("additional_special_tokens")
        if isinstance(extra, list):
            sm["additional_special_tokens"] = extra + [t.content for _, t in new if t.special and t.content not in extra]
            smap.write_text(json.dumps(sm, indent=2, ensure_ascii=False) + "\n")


def export_internlm2(model, tokenizer, out, manifest, original_folder=None, overwrite: bool = False) -> Path:
    """What ``export --layout internlm2`` calls: ``save_folder`` against the InternLM2 folder the model
    was bridged from (``original_folder``, else the one the manifest records)."""
    src = Path(original_folder) if original_folder else bridge_source(manifest)
    if src is None:
        raise InternLM2Error("--layout internlm2: the manifest records no InternLM2 source folder (this model "
                             "was not read from an InternLM2 folder); pass the original InternLM2 folder")
    if not (src / "config.json").is_file():
        raise InternLM2Error(f"--layout internlm2: the InternLM2 source folder {src} is gone; pass it where it is now")
    return save_folder(model, tokenizer, out, src, manifest=manifest, overwrite=overwrite)
