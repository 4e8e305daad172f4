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

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from .errors import TokengraftError

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
XTUNER_FEATURE_LAYER = -2  # XTuner's LLaVAModel: visual_select_layer=-2, features[:, 1:] (CLS dropped)
PREFIXES = ("llm.", "projector.", "visual_encoder.")


class XTunerError(TokengraftError):
    """A bad or unsupported XTuner artifact: says what, where, and what to do."""


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


# -- reading XTuner artifacts ------------------------------------------------------------------

def read_xtuner(path) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """(state dict with XTuner names, the run's config text or None, notes) from an ``iter_N.pth``
    file or a DeepSpeed folder. Never runs code from the file (tokengraft.checkpoint's safe readers)."""
    from .checkpoint import read_state_dict

    sd, info = read_state_dict(path)
    cfg = None
    meta = (info.container or {}).get("meta") if isinstance(info.container, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("cfg"), str):
        cfg = meta["cfg"]
    unknown = sorted({k.split(".", 1)[0] for k in sd if not k.startswith(PREFIXES)})
    if unknown:
        raise XTunerError(f"{path}: keys under {unknown} are not XTuner LLaVA names (expected llm., projector., "
                          f"visual_encoder.); is this an XTuner LLaVA checkpoint?")
    notes = list(info.notes)
    if info.inert:
        notes.append(f"{len(info.inert)} non-tensor object type(s) in the file were left inert (never run): "
                     + ", ".join(info.inert[:4]))
    return sd, cfg, notes


def split_parts(sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{"llm": {...}, "projector": {...}, "visual_encoder": {...}} with the prefixes removed."""
    parts: dict[str, dict] = {p[:-1]: {} for p in PREFIXES}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        parts[head][rest] = v
    return parts


def lora_setting(cfg_text: str | None, block: str) -> dict:
    """``lora_alpha``/``r``/``use_rslora`` of the ``llm_lora=dict(...)`` (or ``visual_encoder_lora``)
    block of an mmengine config dump. Parsed as text: the config is never executed."""
    if not cfg_text:
        return {}
    m = re.search(rf"\b{block}\s*=\s*dict\(", cfg_text)
    if not m:
        return {}
    depth, i = 1, m.end()
    while i < len(cfg_text) and depth:
        depth += {"(": 1, ")": -1}.get(cfg_text[i], 0)
        i += 1
    body = cfg_text[m.end():i]
    out = {}
    for name, cast in (("lora_alpha", float), ("r", int)):
        v = re.search(rf"\b{name}\s*=\s*([0-9.]+)", body)
        if v:
            out[name] = cast(v.group(1))
    out["use_rslora"] = bool(re.search(r"\buse_rslora\s*=\s*True", body))
    return out


# -- LoRA (pure tensor functions) ----------------------------------------------------------------

_LORA = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?$")


def unwrap_peft_names(part: dict) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Split a peft-wrapped state dict (``base_model.model.X``) into plain tensors (X.weight, with
    ``base_layer`` / ``modules_to_save.default`` unwrapped) and LoRA pairs per module X."""
    plain, lora = {}, {}
    for k, v in part.items():
        m = _LORA.match(k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
            continue
        if "lora_magnitude_vector" in k:
            raise XTunerError(f"{k}: DoRA adapters are not supported; merge them with peft first")
        if k.startswith("base_model.model."):
            k = k[len("base_model.model."):]
            if ".original_module." in k:
                continue  # the frozen copy beside modules_to_save: the trained copy wins
            k = k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        plain[k] = v
    return plain, lora


def merge_lora(weights: dict[str, torch.Tensor], lora: dict[str, dict[str, torch.Tensor]], alpha: float | None,
               use_rslora: bool = False, where: str = "llm") -> str:
    """Add ``scale * B @ A`` to each ``<module>.weight`` tensor of ``weights``, in place (so a
    module's ``state_dict()`` merges into the module without a second copy of the weights).
    Embedding LoRA (``lora_embedding_A`` r x vocab, ``B`` hidden x r) adds ``(B @ A).T``."""
    if not lora:
        return ""
    ranks = set()
    for mod, ab in lora.items():
        a = ab.get("lora_A", ab.get("lora_embedding_A"))
        b = ab.get("lora_B", ab.get("lora_embedding_B"))
        if a is None or b is None:
            raise XTunerError(f"{where}: LoRA of {mod} has only {sorted(ab)}; the checkpoint is incomplete")
        ranks.add(a.shape[0])
    if alpha is None:
        raise XTunerError(f"{where}: the checkpoint holds LoRA weights (rank {sorted(ranks)}) but no config says "
                          f"lora_alpha; pass --{'visual-' if where != 'llm' else ''}lora-alpha (XTuner's LLaVA "
                          f"configs use 256 for the LLM, 16 for the visual encoder)")
    for mod, ab in lora.items():
        key = f"{mod}.weight"
        if key not in weights:
            raise XTunerError(f"{where}: LoRA on {mod}, but the model has no {key}")
        w = weights[key]
        if "lora_A" in ab:
            a, b = ab["lora_A"].float(), ab["lora_B"].float()
            r = a.shape[0]
            delta = b @ a
        else:
            a, b = ab["lora_embedding_A"].float(), ab["lora_embedding_B"].float()
            r = a.shape[0]
            delta = (b @ a).T
        scale = alpha / (r ** 0.5 if use_rslora else r)
        if delta.shape != w.shape:
            raise XTunerError(f"{where}: LoRA of {mod} gives {tuple(delta.shape)}, the weight is {tuple(w.shape)}")
        with torch.no_grad():
            w.add_((scale * delta).to(w.dtype))
    return f"{where}: {len(lora)} module(s), rank {sorted(ranks)}, alpha {alpha:g}"


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
    return merge_lora(module.state_dict(), lora, alpha, use_rslora, where) if lora else ""


def _merge_peft_folder(model, adapter, where):
    from peft import PeftModel

    a = Path(adapter)
    if not (a / "adapter_config.json").is_file():
        raise XTunerError(f"{a}: no adapter_config.json; expected XTuner's {where}_adapter/ (a PEFT adapter folder)")
    try:
        return PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    except RuntimeError as e:
        raise XTunerError(f"{a}: the adapter does not fit the {where} ({str(e).strip().splitlines()[-1]})") from None


def _split_export(folder: Path) -> dict:
    """XTuner's `pth_to_hf --save-format xtuner` layout, found inside ``folder``."""
    found = {n: folder / n for n in ("llm", "llm_adapter", "projector", "visual_encoder", "visual_encoder_adapter")
             if (folder / n).is_dir()}
    return found


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
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    from .export import DTYPES
    from .graft import graft, parse_tokens
    from .hf import is_tied, rows_of
    from .io import atomic_folder

    if dtype not in DTYPES:
        raise XTunerError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise XTunerError(f"{out}: already exists; choose another output folder or pass --overwrite")
    user = parse_tokens(tokens, tokens_file)
    for s in user:
        if s.content in (IMAGE_TOKEN,):
            raise XTunerError(f"token {s.content!r} is added by the import itself; remove it from --tokens")
    notes: list[str] = []
    parts = {"llm": {}, "projector": {}, "visual_encoder": {}}
    cfg_text = None
    src = Path(source) if source is not None else None
    if src is not None:
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such file or folder")
        split = _split_export(src) if src.is_dir() and not (src / "mp_rank_00_model_states.pt").is_file() else {}
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

        psd, _ = read_state_dict(projector)
        parts["projector"] = {k: v for k, v in psd.items()}
    if llm is None:
        raise XTunerError("no language model: pass --llm DIR (the LLM folder the XTuner run was built on)")
    if visual_encoder is None:
        raise XTunerError("no vision tower: pass --visual-encoder DIR (the CLIP folder the XTuner run was built on)")
    if not parts["projector"]:
        raise XTunerError(f"{src or 'inputs'}: no projector weights (projector.model.0/2); pass --projector DIR "
                          f"(XTuner's projector/ folder) or the iter_N.pth of the fine-tune")

    # 1. language model (+ what the checkpoint trained), LoRA merged first
    tok = AutoTokenizer.from_pretrained(str(tokenizer or llm))
    lm = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.float32)
    if llm_adapter is not None:
        lm = _merge_peft_folder(lm, llm_adapter, "llm")
        notes.append(f"merged PEFT adapter {llm_adapter}")
    if getattr(lm.config, "model_type", None) not in ("llama", "mistral", "qwen2", "vicuna"):
        notes.append(f"language model type {lm.config.model_type!r} is outside the tested scope (LLaMA family)")
    n_base = len(tok)
    plain, lora = unwrap_peft_names(parts["llm"])
    lm_sd = lm.state_dict()
    emb_key = next((k for k in lm_sd if k.endswith("embed_tokens.weight")), None)
    rows_ck = None
    for k, v in plain.items():
        if k == emb_key or (k.endswith("lm_head.weight") and v.dim() == 2):
            rows_ck = max(rows_ck or 0, v.shape[0])
    for mod, ab in lora.items():
        if mod.endswith("lm_head") and "lora_B" in ab:
            rows_ck = max(rows_ck or 0, ab["lora_B"].shape[0])
        if mod.endswith("embed_tokens") and "lora_embedding_A" in ab:
            rows_ck = max(rows_ck or 0, ab["lora_embedding_A"].shape[1])
    if rows_ck is not None and rows_ck < rows_of(lm):
        raise XTunerError(f"the checkpoint's vocabulary rows ({rows_ck}) are fewer than the LLM's ({rows_of(lm)}); "
                          f"was the run built on another LLM folder than {llm}?")
    saved_rows = any(k == emb_key or (k.endswith("lm_head.weight") and v.dim() == 2) for k, v in plain.items())
    if rows_ck is not None and saved_rows and rows_ck - n_base > len(user):
        # trained rows of tokens we cannot name would be thrown away (or given to other tokens)
        raise XTunerError(f"the checkpoint has {rows_ck - n_base} trained vocabulary row(s) beyond the LLM's "
                          f"{n_base} tokens (rows {n_base}..{rows_ck - 1}) but --tokens names {len(user)}; pass "
                          f"--tokens (or --tokens-file) with the tokens the XTuner run added, in order")
    if rows_ck is not None and rows_ck > rows_of(lm):
        lm.resize_token_embeddings(rows_ck, mean_resizing=False)  # XTuner resized the LLM before training
        notes.append(f"the checkpoint has {rows_ck} vocabulary rows, the LLM {n_base} tokens: rows {n_base}.."
                     f"{rows_ck - 1} are taken to be the given tokens in order (XTuner stores no vocabulary)")
    tied = is_tied(lm)
    loaded, merged = {}, []
    st = lora_setting(cfg_text, "llm_lora")
    merged.append(_apply(lm, plain, lora, lora_alpha if lora_alpha is not None else st.get("lora_alpha"),
                         st.get("use_rslora", False), "llm"))
    if plain or lora:
        loaded["llm"] = len(plain) + sum(len(v) for v in lora.values())
    if tied and not is_tied(lm):
        raise XTunerError("loading the checkpoint untied the LLM's head; not supported")
    # rows of the user's tokens that XTuner trained *and saved* (full tensors; a LoRA'd head's
    # new rows sat on XTuner's unsaved resize init, so they are re-initialized instead)
    head_key = next((k for k in lm.state_dict() if k.endswith("lm_head.weight")), None)
    trained_in = emb_key in plain if emb_key else False
    trained_out = trained_in if tied else head_key in plain

    # 2. vision tower (+ trained / LoRA tensors)
    clip = CLIPVisionModel.from_pretrained(str(visual_encoder), dtype=torch.float32)
    if visual_encoder_adapter is not None:
        clip = _merge_peft_folder(clip, visual_encoder_adapter, "visual_encoder")
        notes.append(f"merged PEFT adapter {visual_encoder_adapter}")
    vplain, vlora = unwrap_peft_names(parts["visual_encoder"])
    if vplain or vlora:
        st = lora_setting(cfg_text, "visual_encoder_lora")
        merged.append(_apply(clip, vplain, vlora, visual_lora_alpha if visual_lora_alpha is not None
                             else st.get("lora_alpha"), st.get("use_rslora", False), "visual_encoder"))
        loaded["visual_encoder"] = len(vplain) + sum(len(v) for v in vlora.values())

    # 3. assemble the LLaVA from the modules' own in-memory names
    model = _assemble(lm, clip, parts["projector"], tied)
    loaded["projector"] = len(parts["projector"])
    del lm

    # 4. tokens: the user's, then <image>, then a pad token; keep rows the checkpoint trained
    keep = {}
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for i, s in enumerate(user):
        rid = n_base + i
        if rows_ck is not None and rid < rows_ck and s.content not in tok.get_vocab():
            keep[s.content] = (emb[rid].detach().clone() if trained_in else None,
                               head[rid].detach().clone() if trained_out and not tied else None)
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
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for content, (vin, vout) in keep.items():
            if ids[content] != n_base + user.index(next(u for u in user if u.content == content)):
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
    model.config.image_token_id = img_id
    taken = set(ids.values())
    if img_id in taken or (tok.pad_token_id in taken):
        raise XTunerError("internal: <image> or the pad token collides with a user token")  # graft forbids this

    # 5. processor and save
    processor = _processor(visual_encoder, clip.config, tok)
    from .export import finalize

    manifest = finalize(model, tok, processor, manifest)
    manifest.record("import-xtuner", source=str(src) if src else None, llm=str(llm),
                    visual_encoder=str(visual_encoder), merged_lora=[m for m in merged if m], notes=notes)
    with atomic_folder(out, overwrite) as tmp:
        model.to(DTYPES[dtype])
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        manifest.save(tmp)
    report = ImportReport(out=str(out), rows=rows_of(model), tokenizer_size=len(tok), tied=is_tied(model),
                          image_token_id=img_id, pad_token_id=tok.pad_token_id, tokens=ids,
                          kept_trained_rows=[c for c, (a, b) in keep.items() if a is not None or b is not None],
                          merged_lora=[m for m in merged if m], loaded=loaded, notes=notes)
    for line in report.lines():
        log(line)
    return report


def _assemble(lm, clip, projector: dict, tied: bool):
    """LlavaForConditionalGeneration from an LLM, a CLIP vision model and XTuner projector tensors."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    extra = sorted({k.split(".")[1] for k in projector if k.startswith("model.")} - {"0", "2"})
    if extra or "model.0.weight" not in projector or "model.2.weight" not in projector:
        raise XTunerError(f"projector: expected XTuner's depth-2 MLP (model.0, model.2), got keys "
                          f"{sorted(projector)[:6]}; other projector depths do not map to transformers' Llava")
    vcfg = clip.config
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    cfg = LlavaConfig(text_config=lm.config, vision_config=vcfg, image_token_id=0,  # set after the graft
                      vision_feature_layer=XTUNER_FEATURE_LAYER, vision_feature_select_strategy="default",
                      image_seq_length=n_patches, projector_hidden_act="gelu",
                      multimodal_projector_bias="model.0.bias" in projector, tie_word_embeddings=tied)
    model = LlavaForConditionalGeneration(cfg).float()
    _load_into(model.model.language_model, lm.model.state_dict(), "llm")
    if not tied:
        _load_into(model.lm_head, lm.lm_head.state_dict(), "llm.lm_head")
    _load_into(model.model.vision_tower, clip.state_dict(), "visual_encoder")
    proj = {k.replace("model.0.", "linear_1.").replace("model.2.", "linear_2."): v for k, v in projector.items()}
    _load_into(model.model.multi_modal_projector, proj, "projector")
    model.generation_config = lm.generation_config
    return model.eval()


def _processor(visual_encoder, vcfg, tok):
    from transformers import CLIPImageProcessor, LlavaProcessor

    vdir = Path(visual_encoder)
    if (vdir / "preprocessor_config.json").is_file():
        improc = CLIPImageProcessor.from_pretrained(str(vdir))
    else:  # CLIP's own defaults at the tower's resolution
        improc = CLIPImageProcessor(size={"shortest_edge": vcfg.image_size},
                                    crop_size={"height": vcfg.image_size, "width": vcfg.image_size})
    return LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=vcfg.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=tok.chat_template)
