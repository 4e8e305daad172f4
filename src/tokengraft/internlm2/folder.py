"""An InternLM2 folder loaded as a Llama model (nothing in it imported or run), and a bridged model
written back in the folder's own layout (``export --layout internlm2``)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from ..compat import set_config_dtype
from .config import MODEL_TYPE, InternLM2Error, _dims, check_config, llama_config
from .tokenizer import load_tokenizer
from .weights import from_llama, read_json, read_weights, to_llama

# -- the folder -----------------------------------------------------------------------------------

def load_folder(path, dtype=None):
    """(LlamaForCausalLM, tokenizer, None, manifest) for an InternLM2 folder. Nothing in the folder is
    executed or imported; the manifest (the folder's own, or a fresh one) records the bridge."""
    from ..manifest import Manifest
    from ..vocab import fingerprint, vocab_of

    path = Path(path)
    cfg = read_json(path / "config.json")
    lcfg = llama_config(cfg, str(path / "config.json"))
    dtype = dtype or torch.float32
    model = llama_model(to_llama(read_weights(path), cfg), lcfg, dtype, str(path))
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


def llama_model(sd: dict, lcfg, dtype, where: str):
    """A LlamaForCausalLM holding ``sd`` (Llama key names), built on the meta device and filled tensor by
    tensor, so the model is never in memory twice; every weight must find its place."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(lcfg)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise InternLM2Error(f"{where}: weights do not match config.json (missing {missing[:3]}, unexpected {extra[:3]})")
    for k in list(sd):  # one tensor at a time: never two full copies of the model in memory
        sd[k] = sd.pop(k).to(dtype)
    model.load_state_dict(sd, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=lcfg)  # buffers were on meta: rebuild them
    set_config_dtype(model.config, dtype)
    return model.eval()


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
    from ..hf import is_tied

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


def save_folder(model, tokenizer, out, original_folder, manifest=None, overwrite: bool = False, check=None) -> Path:
    """Write ``model`` (a bridged Llama) in the original InternLM2 layout of ``original_folder``: packed
    ``wqkv`` and InternLM2 key names in the original dtype and shard files, the original config.json
    (``auto_map`` included; ``vocab_size`` = rows), the original tokenizer files with the new tokens
    in ``added_tokens_decoder``, every other file of the folder copied as data, and the manifest.
    ``check(tmp)`` runs on the finished temporary folder before it is renamed into place; an exception
    from it leaves nothing behind."""
    from safetensors.torch import save_file

    from ..outdir import atomic_folder
    from ..portable import make_portable

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
        make_portable(tmp)
        if check is not None:
            check(tmp)
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


def export_internlm2(model, tokenizer, out, manifest, original_folder=None, overwrite: bool = False, check=None) -> Path:
    """What ``export --layout internlm2`` calls: ``save_folder`` against the InternLM2 folder the model
    was bridged from (``original_folder``, else the one the manifest records)."""
    src = Path(original_folder) if original_folder else bridge_source(manifest)
    if src is None:
        raise InternLM2Error("--layout internlm2: the manifest records no InternLM2 source folder (this model "
                             "was not read from an InternLM2 folder); pass the original InternLM2 folder")
    if not (src / "config.json").is_file():
        raise InternLM2Error(f"--layout internlm2: the InternLM2 source folder {src} is gone; pass it where it is now")
    return save_folder(model, tokenizer, out, src, manifest=manifest, overwrite=overwrite, check=check)
