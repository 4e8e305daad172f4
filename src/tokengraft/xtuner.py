"""XTuner LLaVA artifacts -> a ``LlavaForConditionalGeneration`` folder carrying the user's tokens.

XTuner trains LLaVA as three modules under its own names (``FORMATS.md``): ``llm.`` + the language
model's own names, ``projector.model.0`` / ``projector.model.2`` (Linear, GELU, Linear) and
``visual_encoder.`` + the CLIP vision model's names; with LoRA, ``llm.base_model.model.<name>
.lora_A.default.weight``. Its checkpoints hold only what was trained, so the language model and the
vision tower come from the folders the run was built on.

The import, in order:
1. the LLM (``--llm``) and the CLIP tower (``--visual-encoder``) load with transformers, fp32;
2. the checkpoint's tensors (``iter_N.pth`` file or DeepSpeed folder, read with tokengraft's safe
   readers; or XTuner's split export: ``llm/`` or ``llm_adapter/``, ``projector/``,
   ``visual_encoder/`` or ``visual_encoder_adapter/``) go on top, LoRA merged into its base weights;
   if XTuner resized the LLM for the user's tokens, the LLM is resized the same way first;
3. the modules are assembled into a LLaVA in memory (``load_state_dict`` on the model's own
   modules: the installed transformers decides the on-disk layout when it saves);
4. the user's tokens, then ``<image>``, then a pad token (if the tokenizer has none) are grafted in
   that order, so no id collides with a row the checkpoint trained; every row is initialized and the
   rows are padded to a multiple of 64; trained rows of the user's tokens are kept;
5. XTuner's image features (layer -2, CLS dropped) become ``vision_feature_layer=-2`` and
   ``vision_feature_select_strategy="default"``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.errors import XTunerError
from .checkpoint.lora import lora_ranks, merge_lora, merge_peft, unwrap_peft_names
from .checkpoint.xtuner_layout import (check_named_rows, checkpoint_rows, lora_setting, read_xtuner, split_export,
                                        split_parts)
from .compat import check_readable, dtype_kwargs, llava_parts, resize_rows, set_image_token_id

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
XTUNER_FEATURE_LAYER = -2  # XTuner's LLaVAModel: visual_select_layer=-2, features[:, 1:] (CLS dropped)


@dataclass
class ImportReport:
    out: str
    rows: int
    tokenizer_size: int
    tied: bool
    image_token_id: int
    pad_token_id: int | None
    tokens: dict[str, int]  # the user's tokens -> ids
    kept_trained_rows: list[str] = field(default_factory=list)  # user tokens whose rows came from the checkpoint
    merged_lora: list[str] = field(default_factory=list)  # "llm: 14 module(s), scale 2" ...
    loaded: dict[str, int] = field(default_factory=dict)  # part -> tensors taken from the checkpoint
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"imported XTuner LLaVA -> {self.out}: {self.rows} rows ({self.tokenizer_size} tokens), "
               f"{'tied' if self.tied else 'untied'}, <image> id {self.image_token_id}, pad id {self.pad_token_id}"]
        if self.tokens:
            out.append("tokens: " + ", ".join(f"{k}={v}" for k, v in self.tokens.items()))
        out += [f"from checkpoint: {k}: {v} tensor(s)" for k, v in self.loaded.items()]
        out += [f"merged LoRA: {m}" for m in self.merged_lora]
        if self.kept_trained_rows:
            out.append("trained rows kept for: " + ", ".join(self.kept_trained_rows))
        out += [f"note: {n}" for n in self.notes]
        return out


@dataclass
class _Inputs:
    """Where each part comes from, and the checkpoint's tensors per part."""

    src: Path | None
    llm: object
    visual_encoder: object
    llm_adapter: object
    visual_encoder_adapter: object
    parts: dict
    cfg_text: str | None
    notes: list[str]
    source_arch: str | None = None  # the LLM's own architecture when a bridge read it (internlm2)


@dataclass
class _LLM:
    """The language model with the checkpoint applied, and what the graft step needs to know."""

    tok: object
    lm: object
    n_base: int  # tokens of the LLM's tokenizer
    rows_ck: int | None  # vocabulary rows of the checkpoint
    tied: bool
    trained_in: bool  # the checkpoint saved the embedding's full rows
    trained_out: bool  # ... and the head's
    merged: str


# -- the import --------------------------------------------------------------------------------

def _load_into(module, tensors: dict, where: str) -> int:
    """Copy ``tensors`` (module-relative names) into ``module``; every tensor must find its place."""
    own = module.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise XTunerError(f"{where}: {len(unknown)} checkpoint tensor(s) have no place in the model, e.g. "
                          f"{unknown[0]!r}; was the run built on another model folder?")
    bad = [k for k, v in tensors.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise XTunerError(f"{where}: {k} is {tuple(tensors[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the "
                          f"model; was the run built on another model folder?")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))
    return len(tensors)


def _apply(module, plain: dict, lora: dict, alpha, use_rslora: bool, where: str) -> str:
    """Copy the checkpoint's full tensors into ``module``, then merge its LoRA pairs, in place."""
    if plain:
        _load_into(module, plain, where)
    if not lora:
        return ""
    if alpha is None:
        raise XTunerError(f"{where}: the checkpoint holds LoRA weights (rank {lora_ranks(lora, where)}) but no config "
                          f"says lora_alpha; pass --{'visual-' if where != 'llm' else ''}lora-alpha (XTuner's LLaVA "
                          f"configs use 256 for the LLM, 16 for the visual encoder)")
    return merge_lora(module.state_dict(), lora, alpha, use_rslora, where)


def import_xtuner(source, out, *, llm=None, visual_encoder=None, projector=None, llm_adapter=None,
                  visual_encoder_adapter=None, tokens=None, tokens_file=None, tokenizer=None,
                  lora_alpha: float | None = None, visual_lora_alpha: float | None = None,
                  dtype: str = "fp32", overwrite: bool = False, max_shard_size="5GB", log=print) -> ImportReport:
    """Build ``out``: a LlavaForConditionalGeneration folder (+ processor, tokenizer, tokengraft.json).

    ``source``: an ``iter_N.pth`` file, an XTuner DeepSpeed folder, or a split-export folder
    (``llm/`` or ``llm_adapter/``, ``projector/``, ``visual_encoder/``), or None when the split parts
    are passed one by one. ``llm``: the HF folder the run was built on (base of ``llm_adapter``).
    ``visual_encoder``: the CLIP folder. ``tokens``: the user's tokens, in the order XTuner added
    them (rows beyond the LLM's tokenizer are matched to them by that order)."""
    from .graft import parse_tokens
    from .hf import DTYPES, is_tied, rows_of

    if dtype not in DTYPES:
        raise XTunerError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise XTunerError(f"{out}: already exists; choose another output folder or pass --overwrite")
    user = parse_tokens(tokens, tokens_file)
    if any(s.content == IMAGE_TOKEN for s in user):
        raise XTunerError(f"token {IMAGE_TOKEN!r} is added by the import itself; remove it from --tokens")
    inp = _inputs(source, llm, visual_encoder, projector, llm_adapter, visual_encoder_adapter)
    loaded: dict[str, int] = {}
    L = _language_model(inp, user, tokenizer, lora_alpha, loaded)                     # 1. + 2.
    clip, vmerged = _vision_tower(inp, visual_lora_alpha, loaded)
    model = _assemble(L.lm, clip, inp.parts["projector"], L.tied)                      # 3.
    loaded["projector"] = len(inp.parts["projector"])
    manifest, ids, keep, img_id = _graft_tokens(model, L, user, inp.notes)             # 4.
    processor = _processor(inp.visual_encoder, clip.config, L.tok)                     # 5.
    merged = [m for m in (L.merged, vmerged) if m]
    _save(model, L.tok, processor, manifest, out, inp, merged, DTYPES[dtype], overwrite, max_shard_size)
    report = ImportReport(out=str(out), rows=rows_of(model), tokenizer_size=len(L.tok),
                          tied=is_tied(model), image_token_id=img_id, pad_token_id=L.tok.pad_token_id, tokens=ids,
                          kept_trained_rows=[c for c, (a, b) in keep.items() if a is not None or b is not None],
                          merged_lora=merged, loaded=loaded, notes=inp.notes)
    for line in report.lines():
        log(line)
    return report


def _inputs(source, llm, visual_encoder, projector, llm_adapter, visual_encoder_adapter) -> _Inputs:
    """Every part's origin: a checkpoint file/folder, XTuner's split export, or parts passed one by one."""
    notes: list[str] = []
    parts = {"llm": {}, "projector": {}, "visual_encoder": {}}
    cfg_text = None
    src = Path(source) if source is not None else None
    if src is not None:
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such file or folder")
        split = split_export(src) if src.is_dir() and not (src / "mp_rank_00_model_states.pt").is_file() else {}
        if split:  # a full merged llm/ wins; llm_adapter/ needs --llm as its base
            llm = split.get("llm", llm)
            llm_adapter = llm_adapter or split.get("llm_adapter")
            projector = projector or split.get("projector")
            visual_encoder = split.get("visual_encoder", visual_encoder)
            visual_encoder_adapter = visual_encoder_adapter or split.get("visual_encoder_adapter")
        else:
            sd, cfg_text, n = read_xtuner(src)
            notes += n
            parts = split_parts(sd)
    if projector is not None:
        from .checkpoint import read_state_dict

        parts["projector"] = dict(read_state_dict(projector)[0])
    if llm is None:
        raise XTunerError("no language model: pass --llm DIR (the LLM folder the XTuner run was built on)")
    if visual_encoder is None:
        raise XTunerError("no vision tower: pass --visual-encoder DIR (the CLIP folder the XTuner run was built on)")
    if not parts["projector"]:
        raise XTunerError(f"{src or 'inputs'}: no projector weights (projector.model.0/2); pass --projector DIR "
                          f"(XTuner's projector/ folder) or the iter_N.pth of the fine-tune")
    return _Inputs(src, llm, visual_encoder, llm_adapter, visual_encoder_adapter, parts, cfg_text, notes)


def _language_model(inp: _Inputs, user: list, tokenizer, lora_alpha, loaded: dict) -> _LLM:
    """1-2. The LLM folder, its PEFT adapter merged, resized as XTuner resized it, the checkpoint on top."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import is_tied, rows_of
    from .internlm2.config import is_internlm2_folder

    if is_internlm2_folder(inp.llm):
        return _internlm2_language_model(inp, user, tokenizer, lora_alpha, loaded)
    check_readable(inp.llm)  # transformers 4.x: refused rather than misread (compat.py)
    tok = AutoTokenizer.from_pretrained(str(tokenizer or inp.llm), trust_remote_code=False)
    n_base = len(tok)
    plain, lora = unwrap_peft_names(inp.parts["llm"])
    check_named_rows(plain, n_base, len(user))  # before the slow load
    lm = AutoModelForCausalLM.from_pretrained(str(inp.llm), **dtype_kwargs(torch.float32), trust_remote_code=False)
    if inp.llm_adapter is not None:
        lm = merge_peft(lm, inp.llm_adapter, "llm")
        inp.notes.append(f"merged PEFT adapter {inp.llm_adapter}")
    if getattr(lm.config, "model_type", None) not in ("llama", "mistral", "qwen2", "vicuna"):
        inp.notes.append(f"language model type {lm.config.model_type!r} is outside the tested scope (LLaMA family)")
    emb_key = next((k for k in lm.state_dict() if k.endswith("embed_tokens.weight")), None)
    rows_ck = checkpoint_rows(plain, lora, emb_key)
    if rows_ck is not None and rows_ck < rows_of(lm):
        raise XTunerError(f"the checkpoint's vocabulary rows ({rows_ck}) are fewer than the LLM's ({rows_of(lm)}); "
                          f"was the run built on another LLM folder than {inp.llm}?")
    if rows_ck is not None and rows_ck > rows_of(lm):
        resize_rows(lm, rows_ck)  # XTuner resized the LLM before training
        inp.notes.append(f"the checkpoint has {rows_ck} vocabulary rows, the LLM {n_base} tokens: rows {n_base}.."
                         f"{rows_ck - 1} are taken to be the given tokens in order (XTuner stores no vocabulary)")
    tied = is_tied(lm)
    st = lora_setting(inp.cfg_text, "llm_lora")
    merged = _apply(lm, plain, lora, lora_alpha if lora_alpha is not None else st.get("lora_alpha"),
                    st.get("use_rslora", False), "llm")
    if plain or lora:
        loaded["llm"] = len(plain) + sum(len(v) for v in lora.values())
    if tied and not is_tied(lm):
        raise XTunerError("loading the checkpoint untied the LLM's head; not supported")
    # rows of the user's tokens that XTuner trained *and saved* (full tensors; a LoRA'd head's
    # new rows sat on XTuner's unsaved resize init, so they are re-initialized instead)
    head_key = next((k for k in lm.state_dict() if k.endswith("lm_head.weight")), None)
    trained_in = emb_key in plain if emb_key else False
    trained_out = trained_in if tied else head_key in plain
    return _LLM(tok, lm, n_base, rows_ck, tied, trained_in, trained_out, merged)


def _internlm2_language_model(inp: _Inputs, user: list, tokenizer, lora_alpha, loaded: dict) -> _LLM:
    """1-2. for an InternLM2 LLM: the checkpoint applied in InternLM2's packed layout, then bridged to Llama."""
    from .xtuner_internlm2 import language_model

    if inp.llm_adapter is not None:
        raise XTunerError(f"{inp.llm_adapter}: a separate PEFT adapter on an InternLM2 LLM is not supported; pass the "
                          f"iter_N.pth (or DeepSpeed folder) of the run, which holds the same LoRA weights")
    st = lora_setting(inp.cfg_text, "llm_lora")
    lm, tok, n_base, rows_ck, t_in, t_out, merged, n = language_model(
        inp.llm, inp.parts["llm"], tokenizer=tokenizer, alpha=lora_alpha if lora_alpha is not None else st.get("lora_alpha"),
        use_rslora=st.get("use_rslora", False), n_user=len(user), check_named_rows=check_named_rows)
    if n:
        loaded["llm"] = n
    inp.source_arch = "internlm2"
    inp.notes.append(f"InternLM2 LLM {inp.llm} read by the built-in bridge (written as Llama; no remote code)")
    if rows_ck is not None and rows_ck > n_base:
        inp.notes.append(f"the checkpoint has {rows_ck} vocabulary rows, the LLM {n_base} tokens: rows {n_base}.."
                         f"{rows_ck - 1} are taken to be the given tokens in order (XTuner stores no vocabulary)")
    return _LLM(tok, lm, n_base, rows_ck, False, t_in, t_out, merged)


def _vision_tower(inp: _Inputs, visual_lora_alpha, loaded: dict):
    """2. The CLIP tower, its adapter merged, the checkpoint's trained / LoRA tensors on top."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(str(inp.visual_encoder), **dtype_kwargs(torch.float32),
                                           trust_remote_code=False)
    if inp.visual_encoder_adapter is not None:
        clip = merge_peft(clip, inp.visual_encoder_adapter, "visual_encoder")
        inp.notes.append(f"merged PEFT adapter {inp.visual_encoder_adapter}")
    vplain, vlora = unwrap_peft_names(inp.parts["visual_encoder"])
    merged = ""
    if vplain or vlora:
        st = lora_setting(inp.cfg_text, "visual_encoder_lora")
        merged = _apply(clip, vplain, vlora, visual_lora_alpha if visual_lora_alpha is not None
                        else st.get("lora_alpha"), st.get("use_rslora", False), "visual_encoder")
        loaded["visual_encoder"] = len(vplain) + sum(len(v) for v in vlora.values())
    return clip, merged


def _graft_tokens(model, L: _LLM, user: list, notes: list[str]):
    """4. The user's tokens, then <image>, then a pad token (if the tokenizer has none), in that
    order, so no id collides with a row the checkpoint trained; trained rows of the user's tokens kept."""
    from .graft import graft

    tok, n_base, rows_ck = L.tok, L.n_base, L.rows_ck
    keep = {}
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for i, s in enumerate(user):
        rid = n_base + i
        if rows_ck is not None and rid < rows_ck and s.content not in tok.get_vocab():
            keep[s.content] = (emb[rid].detach().clone() if L.trained_in else None,
                               head[rid].detach().clone() if L.trained_out and not L.tied else None)
    if rows_ck is not None and len(user) < rows_ck - n_base:
        notes.append(f"checkpoint rows {n_base + len(user)}..{rows_ck - 1} have no token (more rows than tokens "
                     f"given); they are treated as padding and may be reused")
    specs = [*user, {"content": IMAGE_TOKEN, "role": "input", "init": "mean"}]
    add_pad = tok.pad_token is None
    if add_pad and PAD_TOKEN not in tok.get_vocab():
        specs.append({"content": PAD_TOKEN, "role": "input", "init": "mean"})
    manifest = graft(model, tok, specs, pad_to_multiple_of=64, log=lambda *a: None)
    if add_pad:
        tok.pad_token = PAD_TOKEN
    ids = {s.content: tok.convert_tokens_to_ids(s.content) for s in user}
    order = {s.content: i for i, s in enumerate(user)}
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for content, (vin, vout) in keep.items():
            if ids[content] != n_base + order[content]:
                raise XTunerError(f"token {content!r} landed at id {ids[content]}, not at its trained row; "
                                  f"the LLM tokenizer differs from the run's")
            if vin is not None:
                emb[ids[content]] = vin
            if vout is not None:
                head[ids[content]] = vout
            t = manifest.token(content)
            if t is not None and (vin is not None or vout is not None):
                t.init = "xtuner checkpoint row (by order)"
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    set_image_token_id(model.config, img_id)
    if img_id in set(ids.values()) or tok.pad_token_id in set(ids.values()):
        raise XTunerError("internal: <image> or the pad token collides with a user token")  # graft forbids this
    return manifest, ids, keep, img_id


def _save(model, tok, processor, manifest, out: Path, inp: _Inputs, merged: list[str], dtype, overwrite,
          max_shard_size) -> None:
    """5. Config, generation config and manifest made true to the weights, then one atomic write."""
    from .hf import finalize
    from .outdir import atomic_folder
    from .portable import make_portable

    manifest = finalize(model, tok, processor, manifest)
    manifest.record("import-xtuner", source=str(inp.src) if inp.src else None, llm=str(inp.llm),
                    source_arch=inp.source_arch or model.config.text_config.model_type,
                    visual_encoder=str(inp.visual_encoder), merged_lora=merged, notes=inp.notes)
    with atomic_folder(out, overwrite) as tmp:
        model.to(dtype)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        make_portable(tmp)
        manifest.save(tmp)


def _assemble(lm, clip, projector: dict, tied: bool):
    """LlavaForConditionalGeneration from an LLM, a CLIP vision model and XTuner projector tensors."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    extra = sorted({k.split(".")[1] for k in projector if k.startswith("model.")} - {"0", "2"})
    if extra or "model.0.weight" not in projector or "model.2.weight" not in projector:
        raise XTunerError(f"projector: expected XTuner's depth-2 MLP (model.0, model.2), got keys "
                          f"{sorted(projector)[:6]}; other projector depths do not map to transformers' Llava")
    vcfg = clip.config
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    cfg = LlavaConfig(text_config=lm.config, vision_config=vcfg, image_token_index=0,  # set after the graft
                      vision_feature_layer=XTUNER_FEATURE_LAYER, vision_feature_select_strategy="default",
                      image_seq_length=n_patches, projector_hidden_act="gelu",
                      multimodal_projector_bias="model.0.bias" in projector, tie_word_embeddings=tied)
    model = LlavaForConditionalGeneration(cfg).float()
    part = llava_parts(model)  # the module names differ between transformers 4.x and 5
    _load_into(part["text"], lm.model.state_dict(), "llm")
    if not tied:
        _load_into(part["lm_head"], lm.lm_head.state_dict(), "llm.lm_head")
    _load_into(part["vision_tower"], clip.state_dict(), "visual_encoder")
    proj = {k.replace("model.0.", "linear_1.").replace("model.2.", "linear_2."): v for k, v in projector.items()}
    _load_into(part["projector"], proj, "projector")
    model.generation_config = lm.generation_config
    return model.eval()


def _processor(visual_encoder, vcfg, tok):
    from transformers import CLIPImageProcessor, LlavaProcessor

    vdir = Path(visual_encoder)
    if (vdir / "preprocessor_config.json").is_file():
        improc = CLIPImageProcessor.from_pretrained(str(vdir), trust_remote_code=False)
    else:  # CLIP's own defaults at the tower's resolution
        improc = CLIPImageProcessor(size={"shortest_edge": vcfg.image_size},
                                    crop_size={"height": vcfg.image_size, "width": vcfg.image_size})
    return LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=vcfg.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=tok.chat_template)
