"""Build a LLaVA from real SmolLM2-135M (language) + a small random CLIP tower + projector.

No package ships CLIP weights, so the vision side is random but structurally real; the language
side, tokenizer and chat template are real. The result is an ordinary transformers folder.
"""
from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"


# ChatML without SmolLM2's default system prompt: 20 fewer tokens a sample, which the demo's
# 2-core time budget notices. Training, evaluation and export all use this same template.
COMPACT_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                  "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_llava(text_dir, out_dir, image_size: int = 224, patch_size: int = 32, vision_hidden: int = 256,
                vision_layers: int = 4, seed: int = 0, chat_template: str | None = None,
                vision_feature_layer: int = -2, position_std: float | None = None, prepare_vision=None) -> Path:
    """Write ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` to ``out_dir`` and return it.

    ``<image>`` is added to the tokenizer as the image placeholder (a special, input-only token);
    that addition is a graft like any other and is recorded in ``tokengraft.json``.
    ``position_std`` rescales the random tower's position embeddings (they start at std 0.02, 50x
    weaker than its patch features); ``prepare_vision(model, processor)`` runs before the save
    (the demo pretrains its tower there: `tokengraft.demo.vision`)."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    from ..graft import graft
    from ..io import save_folder

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(text_dir, trust_remote_code=False)
    if chat_template is not None:
        tok.chat_template = chat_template
    lm = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32, trust_remote_code=False)
    vcfg = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                            num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                            patch_size=patch_size)
    n_patches = (image_size // patch_size) ** 2
    cfg = LlavaConfig(text_config=lm.config, vision_config=vcfg, image_token_id=0,  # fixed below
                      vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
                      image_seq_length=n_patches, tie_word_embeddings=lm.config.tie_word_embeddings)
    model = LlavaForConditionalGeneration(cfg)
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    if not lm.config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config = lm.generation_config
    manifest = graft(model, tok, [{"content": IMAGE_TOKEN, "role": "input", "init": "mean"}],
                     log=lambda *a: None)
    model.config.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    improc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1, chat_template=tok.chat_template)
    if position_std is not None:
        with torch.no_grad():
            pos = model.model.vision_tower.embeddings.position_embedding.weight
            pos.mul_(position_std / pos.std())
    if prepare_vision is not None:
        prepare_vision(model, processor)
    return save_folder(out_dir, model, tok, manifest, processor=processor)
