"""XTuner LLaVA artifacts -> LlavaForConditionalGeneration: the import equals a reference LLaVA forward.

Checkpoints are built here the way XTuner writes them (key names from FORMATS.md): a tiny
LlamaForCausalLM with the real Mistral v1 tokenizer, a tiny CLIP tower and a depth-2 projector.
The reference forward is written out by hand from the same weights: CLIP hidden states of layer -2
without CLS -> Linear, GELU, Linear -> spliced into the LLM's input embeddings -> LLM logits.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from conftest import tiny_llama

IMG = 32  # image size; patch 8 -> 16 patches (+ CLS, which XTuner drops)
N_PATCH = 16
TOKENS = ["<box>", "</box>"]


# -- building XTuner-style artifacts ------------------------------------------------------------

def _llama(tok, tied: bool, seed: int):
    return tiny_llama(tok, tied=tied, seed=seed)


@pytest.fixture(scope="module")
def base(tmp_path_factory, mistral_v1_dir):
    """Folders the XTuner runs were 'built on': untied LLM, tied LLM, CLIP tower (all random, tiny)."""
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("xtuner_base")
    tok = AutoTokenizer.from_pretrained(mistral_v1_dir, add_bos_token=True)
    for name, tied, seed in (("llm", False, 1), ("llm_tied", True, 2)):
        m = _llama(tok, tied, seed)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    torch.manual_seed(3)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=IMG, patch_size=8)).eval()
    clip.save_pretrained(root / "clip")
    return {"root": root, "llm": root / "llm", "llm_tied": root / "llm_tied", "clip": root / "clip", "tok": tok}


def _projector(seed=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64)).eval()


def _perturb(module, scale=0.02, seed=5, only=""):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if only in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


class _Marker:
    """A pickled object whose unpickling would call ``boom`` (which writes a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (sys.modules["mmengine_fake.evil"].boom, (self.path,))


def _save_mmengine(path, state_dict, cfg_text, marker_path):
    """torch.save an mmengine Runner-like dict, with custom non-tensor objects in message_hub."""
    mod = types.ModuleType("mmengine_fake.evil")

    def boom(p):
        open(p, "w").write("code from the checkpoint ran")

    boom.__module__, boom.__qualname__ = mod.__name__, "boom"
    mod.boom = boom

    class HistoryBuffer:
        def __init__(self):
            self._log_history = [1.0, 0.5]
    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = "mmengine_fake.logging", "HistoryBuffer"
    hb_mod = types.ModuleType("mmengine_fake.logging")
    hb_mod.HistoryBuffer = HistoryBuffer
    fake = {"mmengine_fake": types.ModuleType("mmengine_fake"), "mmengine_fake.evil": mod,
            "mmengine_fake.logging": hb_mod}
    saved = {k: sys.modules.get(k) for k in fake}
    sys.modules.update(fake)
    try:
        obj = {"meta": {"epoch": 1, "iter": 10, "cfg": cfg_text, "seed": 0, "mmengine_version": "0.10.6"},
               "state_dict": state_dict,
               "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"x": _Marker(marker_path)},
                               "resumed_keys": {}},
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
               "param_schedulers": []}
        torch.save(obj, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _xt(prefix, sd):
    return {f"{prefix}.{k}": v.detach().clone() for k, v in sd.items()}


def _proj_sd(proj):
    return {f"model.{k}": v for k, v in proj.state_dict().items()}


# -- the reference forward ----------------------------------------------------------------------

@torch.no_grad()
def reference_logits(lm, clip, proj, before_ids, after_ids, pixel_values):
    feats = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    img = proj(feats)[0]
    emb = lm.get_input_embeddings()
    x = torch.cat([emb(torch.tensor(before_ids)), img, emb(torch.tensor(after_ids))])
    return lm(inputs_embeds=x[None]).logits[0]


@torch.no_grad()
def imported_logits(out, before_ids, after_ids, pixel_values):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    img_id = model.config.image_token_id
    ids = torch.tensor([before_ids + [img_id] * N_PATCH + after_ids])
    return model(input_ids=ids, pixel_values=pixel_values).logits[0], model


def _probe(tok_dir, with_tokens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    before = tok("USER: look", add_special_tokens=True)["input_ids"]
    text = " at the <box> cat </box> ASSISTANT:" if with_tokens else " at the cat ASSISTANT:"
    after = tok(text, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(7)
    return before, after, torch.randn(1, 3, IMG, IMG, generator=g), tok


def _check(out, ref_lm, clip, proj, rows_ref, atol=2e-5):
    # the reference LLM knows the user's tokens only when the run trained their rows
    before, after, pix, tok = _probe(out, with_tokens=rows_ref > 32000)
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in TOKENS)
    ref = reference_logits(ref_lm, clip, proj, before, after, pix)
    got, model = imported_logits(out, before, after, pix)
    assert got.shape[0] == ref.shape[0]
    diff = float((got[:, :rows_ref] - ref[:, :rows_ref]).abs().max())
    assert diff <= atol, diff
    return model, tok


def _check_layout(model, tok, n_base=32000):
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    ids = [tok.convert_tokens_to_ids(t) for t in TOKENS]
    assert ids == [n_base, n_base + 1]  # the user's tokens first, in their order
    img, pad = cfg.image_token_id, tok.pad_token_id
    assert img == n_base + 2 and pad == n_base + 3  # then <image>, then the pad token: no collision
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tok) and cfg.text_config.vocab_size == rows
    w = model.get_input_embeddings().weight
    assert torch.isfinite(w).all() and (w[n_base:len(tok)].norm(dim=1) > 0).all()
    supp = set(model.generation_config.suppress_tokens or [])
    assert set(range(len(tok), rows)) <= supp


# -- tests ---------------------------------------------------------------------------------------

def test_pth_full_finetune_with_resized_vocab(base, tmp_path):
    """iter_N.pth of a full fine-tune (LLM resized for the user's tokens, vision tower trained)."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from tokengraft.xtuner import import_xtuner

    lm = AutoModelForCausalLM.from_pretrained(base["llm"], dtype=torch.float32).eval()
    lm.resize_token_embeddings(32002, mean_resizing=False)  # what the user's XTuner config did
    _perturb(lm)
    clip = CLIPVisionModel.from_pretrained(base["clip"]).eval()
    _perturb(clip, seed=6)
    proj = _projector()
    sd = {**_xt("llm", lm.state_dict()), **_xt("visual_encoder", clip.state_dict()), **_xt("projector", _proj_sd(proj))}
    marker = tmp_path / "ran.txt"
    _save_mmengine(tmp_path / "iter_10.pth", sd, "model = dict(type='LLaVAModel', freeze_llm=False)", str(marker))

    rep = import_xtuner(tmp_path / "iter_10.pth", tmp_path / "out", llm=base["llm"], visual_encoder=base["clip"],
                        tokens=",".join(TOKENS), log=lambda *a: None)
    assert not marker.exists()  # nothing from the pickle ran
    assert rep.kept_trained_rows == TOKENS and not rep.tied
    model, tok = _check(tmp_path / "out", lm, clip, proj, rows_ref=32002)
    _check_layout(model, tok)


def test_pth_lora_tied_alpha_from_config(base, tmp_path):
    """LoRA on the LLM (tied head), frozen vision tower; lora_alpha read from meta.cfg (as text)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from tokengraft.xtuner import import_xtuner

    lm = AutoModelForCausalLM.from_pretrained(base["llm_tied"], dtype=torch.float32).eval()
    pm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    _perturb(pm, scale=0.05, only="lora_")  # lora_B starts at zero: make the adapter do something
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in sd)
    proj = _projector(seed=8)
    xsd = {**_xt("llm", sd), **_xt("projector", _proj_sd(proj))}
    cfg = ("llm_lora=dict(\n        type='peft.LoraConfig',\n        r=4,\n        lora_alpha=8,\n"
           "        lora_dropout=0.05),\nvisual_encoder_lora=dict(type='peft.LoraConfig', r=64, lora_alpha=16)")
    _save_mmengine(tmp_path / "iter_5.pth", xsd, cfg, str(tmp_path / "ran.txt"))
    ref = pm.merge_and_unload().eval()
    clip = CLIPVisionModel.from_pretrained(base["clip"]).eval()

    rep = import_xtuner(tmp_path / "iter_5.pth", tmp_path / "out", llm=base["llm_tied"], visual_encoder=base["clip"],
                        tokens=TOKENS, log=lambda *a: None)
    assert rep.tied and rep.merged_lora and "alpha 8" in rep.merged_lora[0]
    model, tok = _check(tmp_path / "out", ref, clip, proj, rows_ref=32000)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied loads tied
    _check_layout(model, tok)


def _lora_deepspeed(base, folder, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(base["llm"], dtype=torch.float32).eval()
    pm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "lm_head"]))
    _perturb(pm, scale=0.05, seed=seed, only="lora_")
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    proj = _projector(seed=seed)
    folder.mkdir(parents=True)
    torch.save({"module": {**_xt("llm", sd), **_xt("projector", _proj_sd(proj))}, "ds_version": "0.14.0",
                "global_steps": 10}, folder / "mp_rank_00_model_states.pt")
    return pm.merge_and_unload().eval(), proj


def test_deepspeed_folder_lora_with_explicit_alpha(base, tmp_path):
    from transformers import CLIPVisionModel

    from tokengraft.xtuner import XTunerError, import_xtuner

    ref, proj = _lora_deepspeed(base, tmp_path / "iter_10.pth", seed=9)
    # a DeepSpeed folder carries no mmengine config: without --lora-alpha the import refuses
    with pytest.raises(XTunerError, match="lora-alpha"):
        import_xtuner(tmp_path / "iter_10.pth", tmp_path / "out", llm=base["llm"], visual_encoder=base["clip"],
                      tokens=TOKENS, log=lambda *a: None)
    assert not (tmp_path / "out").exists()
    import_xtuner(tmp_path / "iter_10.pth", tmp_path / "out", llm=base["llm"], visual_encoder=base["clip"],
                  tokens=TOKENS, lora_alpha=16, log=lambda *a: None)
    clip = CLIPVisionModel.from_pretrained(base["clip"]).eval()
    model, tok = _check(tmp_path / "out", ref, clip, proj, rows_ref=32000)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight  # untied stays untied
    _check_layout(model, tok)


def test_split_export_llm_adapter_projector_visual_encoder(base, tmp_path):
    """XTuner's `pth_to_hf --save-format xtuner`: llm_adapter/ + projector/ + visual_encoder/."""
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from tokengraft.xtuner import import_xtuner

    lm = AutoModelForCausalLM.from_pretrained(base["llm"], dtype=torch.float32).eval()
    pm = get_peft_model(lm, LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]))
    _perturb(pm, scale=0.05, seed=11, only="lora_")
    split = tmp_path / "hf"
    pm.save_pretrained(split / "llm_adapter")
    ref = pm.merge_and_unload().eval()
    proj = _projector(seed=12)
    (split / "projector").mkdir()
    save_file({k: v.contiguous() for k, v in _proj_sd(proj).items()}, str(split / "projector" / "model.safetensors"))
    (split / "projector" / "config.json").write_text(json.dumps(
        {"model_type": "projector", "visual_hidden_size": 32, "llm_hidden_size": 64, "depth": 2, "bias": True}))
    clip = CLIPVisionModel.from_pretrained(base["clip"]).eval()
    _perturb(clip, seed=13)
    clip.save_pretrained(split / "visual_encoder")

    import_xtuner(split, tmp_path / "out", llm=base["llm"], tokens=TOKENS, log=lambda *a: None)
    model, tok = _check(tmp_path / "out", ref, clip, proj, rows_ref=32000)
    _check_layout(model, tok)


def test_bad_inputs(base, tmp_path):
    from tokengraft.xtuner import XTunerError, import_xtuner

    (tmp_path / "out").mkdir()
    with pytest.raises(XTunerError, match="already exists"):
        import_xtuner(tmp_path / "nope.pth", tmp_path / "out", llm=base["llm"], visual_encoder=base["clip"])
    bad = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"model.layers.0.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(XTunerError, match="not XTuner LLaVA names"):
        import_xtuner(bad, tmp_path / "o2", llm=base["llm"], visual_encoder=base["clip"])
    wrong = tmp_path / "iter_2.pth"
    torch.save({"state_dict": {"llm.model.embed_tokens.weight": torch.zeros(31000, 64),
                               "projector.model.0.weight": torch.zeros(64, 32)}}, wrong)
    with pytest.raises(XTunerError, match="another LLM folder"):
        import_xtuner(wrong, tmp_path / "o3", llm=base["llm"], visual_encoder=base["clip"])
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_lora_setting_parses_text_only():
    from tokengraft.xtuner import lora_setting

    cfg = "llm_lora = dict(type=LoraConfig, r=512, lora_alpha=256, use_rslora=True),\nvisual_encoder_lora=dict(r=64, lora_alpha=16)"
    assert lora_setting(cfg, "llm_lora") == {"lora_alpha": 256.0, "r": 512, "use_rslora": True}
    assert lora_setting(cfg, "visual_encoder_lora") == {"lora_alpha": 16.0, "r": 64, "use_rslora": False}
    assert lora_setting(None, "llm_lora") == {}


def test_split_export_full_llm_and_visual_encoder_adapter(base, tmp_path):
    """Split export with a merged llm/ and a visual_encoder_adapter/ (LoRA on the CLIP tower)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from tokengraft.xtuner import import_xtuner

    split = tmp_path / "hf"
    lm = AutoModelForCausalLM.from_pretrained(base["llm"], dtype=torch.float32).eval()
    _perturb(lm, seed=21)
    lm.save_pretrained(split / "llm")
    base["tok"].save_pretrained(split / "llm")
    clip = CLIPVisionModel.from_pretrained(base["clip"]).eval()
    pc = get_peft_model(clip, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    _perturb(pc, scale=0.1, seed=22, only="lora_")
    pc.save_pretrained(split / "visual_encoder_adapter")
    ref_clip = pc.merge_and_unload().eval()
    proj = _projector(seed=23)
    (split / "projector").mkdir()
    save_file({k: v.contiguous() for k, v in _proj_sd(proj).items()}, str(split / "projector" / "model.safetensors"))

    rep = import_xtuner(split, tmp_path / "out", visual_encoder=base["clip"], tokens=TOKENS, log=lambda *a: None)
    assert any("visual_encoder_adapter" in n for n in rep.notes)
    model, tok = _check(tmp_path / "out", lm, ref_clip, proj, rows_ref=32000)
    _check_layout(model, tok)
