"""`tokengraft import-xtuner`: XTuner LLaVA artifacts -> a LlavaForConditionalGeneration folder."""
from __future__ import annotations

import argparse

from ._common import add_dtype, add_max_shard_size, add_output, add_overwrite, add_tokens, check_inputs, number

MAX_LORA_ALPHA = 1e5  # alpha / r scales the LoRA product; real configs use 8 to 512

DESCRIPTION = """\
Build a transformers LlavaForConditionalGeneration folder (model, LlavaProcessor, tokenizer,
tokengraft.json) from what an XTuner LLaVA run left behind, with your tokens added.

SOURCE is one of:
  - an iter_N.pth file (mmengine checkpoint; read with a restricted unpickler, no code runs);
  - an XTuner DeepSpeed folder (iter_N.pth/ holding mp_rank_00_model_states.pt);
  - XTuner's split export (`xtuner convert pth_to_hf --save-format xtuner`): a folder with
    llm/ or llm_adapter/, projector/, and visual_encoder/ or visual_encoder_adapter/.
XTuner checkpoints hold only what trained, so --llm (the LLM folder the run was built on; the base
of llm_adapter/) and --visual-encoder (the CLIP folder) are needed unless the split export has them.

What happens:
  1. LoRA is merged into its base weights first (lora_alpha from the run's config text in the
     .pth, or --lora-alpha / --visual-lora-alpha; a PEFT adapter folder knows its own);
  2. if XTuner resized the LLM for your tokens (more vocabulary rows in the checkpoint than the
     tokenizer has), rows beyond the tokenizer are taken to be --tokens in the order given, and
     their trained rows are kept (XTuner stores no vocabulary: this assumption is reported);
  3. the XTuner modules become Llava's (projector.model.0/2 -> multi_modal_projector.linear_1/2,
     visual_encoder -> vision_tower, llm -> the language model), loaded into the in-memory model
     so the installed transformers writes its own on-disk layout;
  4. your tokens, then <image>, then <pad> (only if the tokenizer has no pad token) are added in
     that order: no id collides with a trained row; every new row is initialized; rows are padded
     to a multiple of 64 and padding rows are suppressed in generation;
  5. XTuner's image features (hidden layer -2, CLS dropped) are written to the config as
     vision_feature_layer=-2, vision_feature_select_strategy="default".
Scope: LLaMA-architecture language models (LLaMA, Vicuna, Mistral, Qwen2, SmolLM2) and InternLM2
(an --llm folder with model_type internlm2 is read by the built-in bridge, its *.py never run; the
checkpoint's full tensors and LoRA on the packed wqkv/wo/w1..w3/output are applied in InternLM2's
layout, then written as Llama), with a CLIP tower and XTuner's depth-2 MLP projector. XTuner's pad-to-square image preprocessing is not part
of CLIPImageProcessor; pad images yourself for identical inputs.

OUT is written to a temporary sibling and renamed into place; inputs are never modified."""

EPILOG = """\
examples:
  tokengraft import-xtuner work_dirs/llava_ft/iter_5000.pth --llm ./vicuna-7b-v1.5 \\
      --visual-encoder ./clip-vit-large-patch14-336 --tokens '<box>,</box>,<ref>' -o ./llava-hf
  tokengraft import-xtuner ./xtuner-hf-export --llm ./vicuna-7b-v1.5 --tokens-file tokens.yaml -o ./llava-hf
  tokengraft export ./llava-hf -o ./llava-hf-checked --verify     # reload check with plain transformers

exit status: 0 on success, 2 on bad input (one-line reason); nothing is written on error.
docs: docs/xtuner.md"""


def register(subparsers, name):
    p = subparsers.add_parser(name, help="XTuner LLaVA checkpoint -> transformers LLaVA folder with your tokens",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", nargs="?",
                   help="iter_N.pth file, DeepSpeed folder, or split-export folder (read only)")
    add_output(p)
    p.add_argument("--llm", metavar="DIR", help="LLM folder the run was built on (HF layout, with tokenizer)")
    p.add_argument("--visual-encoder", metavar="DIR", help="CLIP folder the run was built on")
    p.add_argument("--projector", metavar="DIR", help="XTuner projector/ folder (when not in SOURCE)")
    p.add_argument("--llm-adapter", metavar="DIR", help="XTuner llm_adapter/ (PEFT) folder, merged into --llm")
    p.add_argument("--visual-encoder-adapter", metavar="DIR", help="XTuner visual_encoder_adapter/ folder")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder, if not the LLM folder's")
    add_tokens(p)  # in the order XTuner added them
    alpha = number(float, 0, MAX_LORA_ALPHA, above=True)
    p.add_argument("--lora-alpha", type=alpha, metavar="A",
                   help=f"LLM LoRA alpha, if the checkpoint has no config (> 0, at most {MAX_LORA_ALPHA:g})")
    p.add_argument("--visual-lora-alpha", type=alpha, metavar="A", help="visual encoder LoRA alpha, likewise")
    add_dtype(p)
    add_max_shard_size(p)
    add_overwrite(p)
    return p


def run(args) -> int:
    from ..xtuner import import_xtuner

    check_inputs(args.output, args.overwrite, {
        "SOURCE": args.source, "--llm": args.llm, "--visual-encoder": args.visual_encoder,
        "--projector": args.projector, "--llm-adapter": args.llm_adapter,
        "--visual-encoder-adapter": args.visual_encoder_adapter, "--tokenizer": args.tokenizer,
        "tokens file": args.tokens_file})
    import_xtuner(args.source, args.output, llm=args.llm, visual_encoder=args.visual_encoder,
                  projector=args.projector, llm_adapter=args.llm_adapter,
                  visual_encoder_adapter=args.visual_encoder_adapter, tokens=args.tokens,
                  tokens_file=args.tokens_file, tokenizer=args.tokenizer, lora_alpha=args.lora_alpha,
                  visual_lora_alpha=args.visual_lora_alpha, dtype=args.dtype, overwrite=args.overwrite,
                  max_shard_size=args.max_shard_size)
    return 0
