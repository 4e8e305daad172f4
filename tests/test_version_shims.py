"""tokengraft.compat, the one place that knows transformers versions apart: each shim on both sides
of its version line (the installed 5.x for real, 4.48 by the version it reports), on real
transformers objects. The same code under real transformers 4.48 is exercised by
tests/test_xtuner_real.py (XTuner's venv)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokengraft import compat


@pytest.fixture
def as_448(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: (4, 48, 0))


def test_version_is_read_without_importing_transformers():
    code = ("import sys, tokengraft.compat as c; v = c.transformers_version(); "
            "assert 'transformers' not in sys.modules, sorted(sys.modules); print(v)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("(5,"), r.stderr


def test_dtype_keyword_follows_the_version(as_448, monkeypatch):
    import torch

    assert compat.dtype_kwargs(torch.bfloat16) == {"torch_dtype": torch.bfloat16}
    monkeypatch.setattr(compat, "transformers_version", lambda: (4, 56, 0))
    assert compat.dtype_kwargs(torch.bfloat16) == {"dtype": torch.bfloat16}


def test_train_refuses_an_old_transformers_in_one_line(as_448):
    with pytest.raises(compat.VersionError) as e:
        compat.require(compat.TRAIN_NEEDS, "tokengraft train")
    msg = str(e.value)
    assert "\n" not in msg and "needs transformers >= 5.24" in msg and "has 4.48.0" in msg
    compat.require((4, 48), "tokengraft add")  # the core's floor: no error


def _saved_by_5(tmp_path, tiny_tok_dir):
    """A tiny Llama folder exactly as transformers 5 saves it (rope only in rope_parameters)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=50000.0)
    out = tmp_path / "saved_by_5"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_old_transformers_refuses_what_it_would_misread(as_448, tmp_path, smollm2_dir):
    folder = _saved_by_5(tmp_path, smollm2_dir)
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in cfg and cfg["rope_parameters"]["rope_theta"] == 50000.0  # the premise
    with pytest.raises(compat.VersionError) as e:
        compat.check_readable(folder)
    msg = str(e.value)
    assert "rope_theta 10000 (its default) instead of 50000.0" in msg and "and 1 more" in msg, msg
    assert f"tokengraft export {folder} -o DST" in msg and "\n" not in msg


def test_portable_folders_and_transformers_5_pass(as_448, tmp_path, smollm2_dir, monkeypatch):
    from tokengraft.portable import make_portable

    folder = _saved_by_5(tmp_path, smollm2_dir)
    make_portable(folder)
    compat.check_readable(folder)  # what tokengraft writes reads alike in 4.48: nothing to refuse
    monkeypatch.setattr(compat, "transformers_version", lambda: (5, 25, 0))
    compat.check_readable(_saved_by_5(tmp_path / "again", smollm2_dir))  # 5.x reads its own files right


def _tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=0))


def test_llava_parts_and_image_token_where_the_model_reads_them():
    model = _tiny_llava()
    part = compat.llava_parts(model)
    assert part["text"].embed_tokens is model.get_input_embeddings()
    assert part["lm_head"] is model.get_output_embeddings()
    assert part["projector"] is model.model.multi_modal_projector and part["vision_tower"] is model.model.vision_tower
    compat.set_image_token_id(model.config, 63)
    assert model.config.image_token_index == 63 == model.config.image_token_id
    assert json.loads(model.config.to_json_string())["image_token_index"] == 63


def test_resize_rows_skips_transformers_mean_resizing():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    compat.resize_rows(model, 128)
    assert model.get_input_embeddings().weight.shape[0] == 128 == model.config.vocab_size
    llava = _tiny_llava()
    compat.resize_rows(llava, 128)
    assert llava.get_input_embeddings().weight.shape[0] == 128
