"""import-xtuner of an InternLM2-based XTuner LLaVA (the original report's model family).

The LLM folder is InternLM2 (packed ``wqkv``, ``auto_map``, remote-code files that write a marker if
imported: see internlm2_fixture). Checkpoints are written the way XTuner writes them: ``llm.`` +
InternLM2 names, ``visual_encoder.``, ``projector.model.{0,2}``; a full fine-tune whose vocabulary XTuner
grew by 3 rows, and a LoRA run on ``wqkv``/``wo``/``w1..w3``/``output``. The reference forward is
written by hand: CLIP layer -2 without CLS -> Linear, GELU, Linear -> spliced into the embeddings ->
InternLM2 computed directly from the PACKED weights (tests/internlm2_fixture.reference_logits).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from internlm2_fixture import build_internlm2, marker_path, reference_logits

pytest.importorskip("sentencepiece")

IMG, N_PATCH = 32, 16
TOKENS = ["<box>", "</box>", "<ref>"]
N_BASE = 32006  # the fixture tokenizer: 32,000 pieces + InternLM2's 6 added tokens


@pytest.fixture(scope="module")
def parts(smollm2_dir, mistral_v1_dir, tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("il2_xtuner")
    llm = build_internlm2(smollm2_dir, mistral_v1_dir, root / "internlm2", layers=1)
    torch.manual_seed(3)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=IMG, patch_size=8)).eval()
    clip.save_pretrained(root / "clip")
    hidden = json.loads((llm / "config.json").read_text())["hidden_size"]
    torch.manual_seed(4)
    proj = nn.Sequential(nn.Linear(32, hidden), nn.GELU(), nn.Linear(hidden, hidden)).eval()
    return {"llm": llm, "clip_dir": root / "clip", "clip": clip, "proj": proj}


def _packed(llm_dir) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(llm_dir / "model.safetensors")).items()}


def _save_pth(path, llm_sd: dict, proj, clip=None, cfg_text="model = dict(type='LLaVAModel')"):
    sd = {f"llm.{k}": v.clone() for k, v in llm_sd.items()}
    sd.update({f"projector.model.{k}": v.clone() for k, v in proj.state_dict().items()})
    if clip is not None:
        sd.update({f"visual_encoder.{k}": v.clone() for k, v in clip.state_dict().items()})
    torch.save({"meta": {"cfg": cfg_text, "iter": 10}, "state_dict": sd}, path)


@torch.no_grad()
def _reference(llm_dir, packed, clip, proj, before, after, pix):
    feats = clip(pix, output_hidden_states=True).hidden_states[-2][0, 1:]  # layer -2, CLS dropped
    emb = packed["model.tok_embeddings.weight"]
    x = torch.cat([emb[torch.tensor(before)], proj(feats), emb[torch.tensor(after)]])
    return reference_logits(llm_dir, weights=packed, embeds=x)


@torch.no_grad()
def _imported(out, before, after, pix):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    img = model.config.image_token_id
    text = model(input_ids=torch.tensor([before + after])).logits[0]
    image = model(input_ids=torch.tensor([before + [img] * N_PATCH + after]), pixel_values=pix).logits[0]
    return text, image, model


def _probe(out, with_tokens: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    before = tok("<|im_start|>user\nlook", add_special_tokens=True)["input_ids"]
    after = tok(" at the <ref>cat</ref><box> here" if with_tokens else " at the cat here",
                add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(7)
    return tok, before, after, torch.randn(1, 3, IMG, IMG, generator=g)


def _compare(out, llm_dir, packed, parts, clip, with_tokens, cols):
    tok, before, after, pix = _probe(out, with_tokens)
    text, image, model = _imported(out, before, after, pix)
    no_img = reference_logits(llm_dir, weights=packed, embeds=packed["model.tok_embeddings.weight"][torch.tensor(before + after)])
    ref = _reference(llm_dir, packed, clip, parts["proj"], before, after, pix)
    assert float((text[:, :cols] - no_img[:, :cols]).abs().max()) <= 1e-4
    assert float((image[:, :cols] - ref[:, :cols]).abs().max()) <= 1e-4
    return tok, model


def test_full_finetune_with_three_grown_rows(parts, tmp_path):
    from tokengraft.xtuner import import_xtuner

    llm = parts["llm"]
    packed = _packed(llm)
    g = torch.Generator().manual_seed(11)
    for k in ("model.tok_embeddings.weight", "output.weight"):  # XTuner grew the vocabulary by 3 rows
        packed[k] = torch.cat([packed[k], 0.02 * torch.randn(3, packed[k].shape[1], generator=g)])
    for k in packed:  # and the full fine-tune moved every weight
        packed[k] = packed[k] + 0.01 * torch.randn(packed[k].shape, generator=g)
    clip = parts["clip"]
    _save_pth(tmp_path / "iter_10.pth", packed, parts["proj"], clip)

    rep = import_xtuner(tmp_path / "iter_10.pth", tmp_path / "out", llm=llm, visual_encoder=parts["clip_dir"],
                        tokens=",".join(TOKENS), log=lambda *a: None)
    assert not marker_path(llm).exists()  # the folder's modeling/tokenization code never ran
    assert rep.tokens == {t: N_BASE + i for i, t in enumerate(TOKENS)} and rep.kept_trained_rows == TOKENS
    assert rep.loaded["llm"] == len(packed) and not rep.tied
    tok, model = _compare(tmp_path / "out", llm, packed, parts, clip, with_tokens=True, cols=N_BASE + 3)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[N_BASE:N_BASE + 3], packed["model.tok_embeddings.weight"][N_BASE:])  # rows XTuner trained
    assert model.config.text_config.model_type == "llama" and not list((tmp_path / "out").glob("*.py"))
    man = json.loads((tmp_path / "out" / "tokengraft.json").read_text())
    assert man["history"][-1]["source_arch"] == "internlm2"


def test_lora_on_packed_wqkv_and_output(parts, tmp_path):
    """LoRA pairs in InternLM2's names (XTuner adapts the packed wqkv); alpha from the config text."""
    from tokengraft.xtuner import import_xtuner

    llm = parts["llm"]
    base = _packed(llm)
    rows = base["model.tok_embeddings.weight"].shape[0] + 3  # XTuner resized before wrapping with LoRA
    g = torch.Generator().manual_seed(12)
    r, alpha = 4, 8
    lora, merged = {}, dict(base)
    merged["output.weight"] = torch.cat([base["output.weight"], torch.zeros(3, base["output.weight"].shape[1])])
    merged["model.tok_embeddings.weight"] = torch.cat([base["model.tok_embeddings.weight"],
                                                       torch.zeros(3, base["output.weight"].shape[1])])
    for mod in ("model.layers.0.attention.wqkv", "model.layers.0.attention.wo", "model.layers.0.feed_forward.w1",
                "model.layers.0.feed_forward.w2", "model.layers.0.feed_forward.w3", "output"):
        w = merged[f"{mod}.weight"]
        a = 0.05 * torch.randn(r, w.shape[1], generator=g)
        b = 0.05 * torch.randn(w.shape[0], r, generator=g)
        lora[f"base_model.model.{mod}.lora_A.default.weight"] = a
        lora[f"base_model.model.{mod}.lora_B.default.weight"] = b
        merged[f"{mod}.weight"] = w + (alpha / r) * (b @ a)
    assert lora["base_model.model.output.lora_B.default.weight"].shape[0] == rows
    cfg = "llm_lora=dict(type='peft.LoraConfig', r=4, lora_alpha=8, lora_dropout=0.05)"
    _save_pth(tmp_path / "iter_5.pth", lora, parts["proj"], cfg_text=cfg)

    rep = import_xtuner(tmp_path / "iter_5.pth", tmp_path / "out", llm=llm, visual_encoder=parts["clip_dir"],
                        tokens=TOKENS, log=lambda *a: None)
    assert rep.merged_lora and "alpha 8" in rep.merged_lora[0] and "6 module(s)" in rep.merged_lora[0]
    assert not marker_path(llm).exists()
    # on old tokens (XTuner's new rows were never saved, so they are re-initialized: not compared)
    _compare(tmp_path / "out", llm, merged, parts, parts["clip"], with_tokens=False, cols=N_BASE)


def test_a_separate_adapter_on_internlm2_is_one_line(parts, tmp_path):
    from tokengraft.checkpoint.errors import XTunerError
    from tokengraft.xtuner import import_xtuner

    torch.save({"state_dict": {f"projector.model.{k}": v for k, v in parts["proj"].state_dict().items()}},
               tmp_path / "p.pth")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(XTunerError, match="InternLM2 LLM is not supported"):
        import_xtuner(tmp_path / "p.pth", tmp_path / "out", llm=parts["llm"], visual_encoder=parts["clip_dir"],
                      llm_adapter=tmp_path / "adapter", log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_deepspeed_folder_lora_needs_alpha(parts, tmp_path):
    """XTuner's DeepSpeed folder (mp_rank_00_model_states.pt, no config text) of a LoRA run on InternLM2."""
    from tokengraft.checkpoint.errors import XTunerError
    from tokengraft.xtuner import import_xtuner

    llm = parts["llm"]
    base = _packed(llm)
    g = torch.Generator().manual_seed(13)
    lora, merged = {}, dict(base)
    for mod in ("model.layers.0.attention.wqkv", "model.layers.0.feed_forward.w2"):
        w = base[f"{mod}.weight"]
        a, b = 0.05 * torch.randn(2, w.shape[1], generator=g), 0.05 * torch.randn(w.shape[0], 2, generator=g)
        lora[f"llm.base_model.model.{mod}.lora_A.default.weight"] = a
        lora[f"llm.base_model.model.{mod}.lora_B.default.weight"] = b
        merged[f"{mod}.weight"] = w + (4 / 2) * (b @ a)
    folder = tmp_path / "iter_10.pth"
    folder.mkdir()
    module = {**lora, **{f"projector.model.{k}": v.clone() for k, v in parts["proj"].state_dict().items()}}
    torch.save({"module": module, "ds_version": "0.14.0", "global_steps": 10}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(XTunerError, match="lora-alpha"):
        import_xtuner(folder, tmp_path / "out", llm=llm, visual_encoder=parts["clip_dir"], log=lambda *a: None)
    assert not (tmp_path / "out").exists()
    rep = import_xtuner(folder, tmp_path / "out", llm=llm, visual_encoder=parts["clip_dir"], lora_alpha=4,
                        log=lambda *a: None)
    assert "2 module(s)" in rep.merged_lora[0] and not marker_path(llm).exists()
    _compare(tmp_path / "out", llm, merged, parts, parts["clip"], with_tokens=False, cols=N_BASE)


def test_split_export_with_internlm2_llm_folder_via_cli(parts, tmp_path):
    """`pth_to_hf --save-format xtuner`: llm/ (a fine-tuned InternLM2 folder, remote-code files and all),
    projector/, visual_encoder/; through the real command line."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import save_file

    split = tmp_path / "hf"
    shutil.copytree(parts["llm"], split / "llm")  # its planted .py files report to parts["llm"]'s marker
    packed = _packed(parts["llm"])
    g = torch.Generator().manual_seed(14)
    packed = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in packed.items()}
    save_file({k: v.contiguous() for k, v in packed.items()}, str(split / "llm" / "model.safetensors"))
    (split / "projector").mkdir()
    save_file({f"model.{k}": v.contiguous() for k, v in parts["proj"].state_dict().items()},
              str(split / "projector" / "model.safetensors"))
    shutil.copytree(parts["clip_dir"], split / "visual_encoder")

    r = subprocess.run([sys.executable, "-m", "tokengraft", "import-xtuner", str(split), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "InternLM2" in r.stdout + r.stderr and not marker_path(parts["llm"]).exists()
    _compare(tmp_path / "out", split / "llm", packed, parts, parts["clip"], with_tokens=False, cols=N_BASE)
    man = json.loads((tmp_path / "out" / "tokengraft.json").read_text())
    assert man["history"][-1]["source_arch"] == "internlm2"
