"""`tokengraft train CONFIG.yaml`: SFT with new tokens. Every config key is also a --flag."""
from __future__ import annotations

import argparse
import dataclasses
import typing

from ._common import number

HELP = {  # config key -> (metavar, help)
    "model": ("DIR", "base model folder: a causal LM or a LLaVA (with its processor)"),
    "data": ("FILE", "training data, LLaVA JSON or JSONL (id, image, conversations[from, value])"),
    "output_dir": ("DIR", "the run folder (checkpoints, metrics, final trained parts)"),
    "image_folder": ("DIR", "folder the records' image paths are relative to"),
    "eval_data": ("FILE", "held-out LLaVA data for greedy-generation eval (new-token precision/recall)"),
    "eval_holdout": ("N", "without --eval-data: hold out the last N training records for eval"),
    "tokens": ("LIST", "tokens to add and train: '<box>,</box>' or \"from-data PATTERN\" (every match in the data)"),
    "tokens_file": ("FILE", "YAML/JSON tokens file (content, description, role, init, stop)"),
    "init": ("METHOD", "override every token's init: auto|mean|hewitt|subword|describe|distill|copy:TOK"),
    "pad_to_multiple_of": ("N", "when rows must grow, round up to a multiple of N (default 64)"),
    "mode": ("MODE", "rows | lora | full (default rows; see MODES below)"),
    "template": ("NAME", "chat template: tokenizer (its own) | vicuna | chatml | internlm2 | llama3"),
    "train_on": ("WHAT", "assistant (loss on assistant turns only, default) | all"),
    "max_length": ("N", "maximum tokens per sample; longer samples are truncated, never inside an image"),
    "max_steps": ("N", "optimizer steps"),
    "batch_size": ("N", "samples per device per step (global batch = this x processes x grad_accum)"),
    "grad_accum": ("N", "gradient accumulation steps"),
    "lr": ("LR", "learning rate"),
    "weight_decay": ("WD", "weight decay (matrices only; never embeddings, norms, biases)"),
    "rows_lr": ("LR", "the new rows' own learning rate (default: --lr)"),
    "rows_weight_decay": ("WD", "the new rows' own weight decay (default 0)"),
    "scheduler": ("NAME", "transformers LR scheduler: constant, linear, cosine, ..."),
    "warmup_steps": ("N", "LR warm-up steps"),
    "lora_r": ("R", "LoRA rank (lora mode)"),
    "lora_alpha": ("A", "LoRA alpha"),
    "lora_dropout": ("P", "LoRA dropout"),
    "lora_targets": ("LIST", "LoRA target linears (default q,k,v,o,gate,up,down _proj of the language model)"),
    "train_projector": (None, "also train the multimodal projector (rows, lora)"),
    "train_vision": (None, "full mode: also train the vision tower (frozen by default)"),
    "logging_steps": ("N", "log metrics every N steps"),
    "save_steps": ("N", "checkpoint every N steps"),
    "save_total_limit": ("N", "keep only the newest N checkpoints"),
    "eval_steps": ("N", "generation eval every N steps (0: only at the end)"),
    "eval_max_new_tokens": ("N", "tokens generated per eval sample"),
    "seed": ("N", "random seed (data order, init noise)"),
    "bf16": (None, "train in bfloat16"),
    "resume": ("[CKPT]", "continue the run in --output-dir from its newest checkpoint (or from CKPT)"),
    "overwrite": (None, "start over in an --output-dir that holds a training run (never any other folder)"),
    "allow_text_tags": (None, "train although the data has tag-like strings that are not tokens"),
    "allow_missing_tokens": (None, "train although some new tokens never appear in the data"),
    "preflight_only": (None, "run the pre-flight over the data and stop"),
    "stop_after": ("N", "stop with a checkpoint after N steps (a planned interruption; resume later)"),
    "progress": (None, "progress bar (default on)"),
    "tensorboard": (None, "also write TensorBoard events when tensorboard is installed (default on)"),
    "workers": ("N", "data-loader worker processes"),
    "fsdp": (None, "shard the model with torch FSDP2 across torchrun processes (every mode)"),
    "deepspeed": ("DS.json", "DeepSpeed ZeRO-3 config: partition every weight across torchrun processes "
                             "(mode rows, fp32, stage 3, no offload; batch keys \"auto\"; see docs/train.md)"),
}

EPILOG = """\
MODES
  rows   only the new tokens' input and output rows train (tied models: one shared row), optionally
         the projector (--train-projector). Optimizer state is O(new rows x hidden); every other
         weight, base embedding rows included, stays bit-identical. Checkpoints are kilobytes.
  lora   PEFT LoRA on the language model's linear layers plus the new rows. The embedding and
         head are never copied (no modules_to_save); the adapter is saved in PEFT's format.
  full   everything except the vision tower trains; the new rows have their own --rows-lr and
         --rows-weight-decay.

CONFIG
  A YAML file whose keys are the flags' long names with underscores, e.g.
    model: ./llava
    data: data/train.json
    image_folder: data/images
    tokens: 'from-data <loc_\\d+>|</?box>|</?ref>'
    mode: rows
    output_dir: runs/box
    max_steps: 200
    lr: 1.0e-3
  Flags override the file.

PRE-FLIGHT
  Before training, one pass over all the data lists missing/unreadable images, samples longer than
  --max-length, how often each new token appears, and tag-like strings (<box>, [IMG], <|x|>) that
  are not in the vocabulary. Missing images, unknown tags and never-seen new tokens stop the run.

RUN FOLDER
  run.json, tokengraft.json, tokenizer/processor, new_rows.safetensors, adapter/ (lora: a PEFT
  adapter with the new rows as trainable tokens; PeftModel.from_pretrained reads it),
  model.safetensors (full only), metrics.jsonl, new_tokens.png, checkpoint-N/ (+ optimizer,
  scheduler, RNG state). See docs/train.md.

MANY PROCESSES
  torchrun --nproc_per_node 2 -m tokengraft train CONFIG.yaml   (gloo on CPU, NCCL on GPUs)
  torchrun --nproc_per_node 2 -m tokengraft train CONFIG.yaml --fsdp   (FSDP2; rows, lora, full)
  torchrun --nproc_per_node 2 -m tokengraft train CONFIG.yaml --deepspeed ds_zero3.json   (ZeRO-3; rows)

EXAMPLES
  tokengraft train cfg.yaml
  tokengraft train cfg.yaml --mode lora --max-steps 500 --output-dir runs/lora
  tokengraft train cfg.yaml --preflight-only
  tokengraft train cfg.yaml --resume

EXIT STATUS
  0 success; 2 bad input or a pre-flight problem (one line on stderr)."""


def register(sub, name):
    from ..train.config import RANGES, TrainConfig, base_type

    p = sub.add_parser(name, help="fine-tune with new tokens (rows | lora | full), checkpoints, resume",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Supervised fine-tuning on LLaVA-format data with new special tokens: graft them\n"
                                   "(if not already), check the data, train only what should train, log new-token\n"
                                   "metrics, and write a run folder holding only the trained parts.")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML config (keys = the long flag names)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        metavar, text = HELP.get(f.name, (None, f.name))
        tp = base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{text} (default: {default})" if default not in (None, "", False) else text
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const=True, default=argparse.SUPPRESS, metavar="CKPT", help=text)
        elif tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif tp in (int, float):
            lo, hi, above = RANGES[f.name]
            p.add_argument(flag, type=number(tp, lo, hi, above=above, key=f.name), default=argparse.SUPPRESS,
                           metavar=metavar, help=text)
        else:
            p.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=text)
    return p


def load_config(path) -> dict:
    from pathlib import Path

    import yaml

    from ..train.config import TrainError

    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainError(f"{p}: config file not found") from None
    except yaml.YAMLError as e:
        raise TrainError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise TrainError(f"{p}: expected a mapping of keys (model, data, tokens, ...)")
    return {k.replace("-", "_"): v for k, v in d.items()}


def config_from_args(args):
    from ..train.config import TrainConfig

    d = load_config(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in vars(args).items():
        if k in names:
            d[k] = v
    for key in ("lora_targets",):
        if isinstance(d.get(key), str):
            d[key] = [s.strip() for s in d[key].split(",") if s.strip()]
    return TrainConfig.from_dict(d, where=args.config or "flags")


def run(args) -> int:
    import sys

    from ..compat import TRAIN_NEEDS, require

    require(TRAIN_NEEDS, "tokengraft train")  # before the trainer's imports, which differ in 4.x
    from ..train.loop import train

    cfg = config_from_args(args)
    try:
        train(cfg)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM at a step boundary (outdir.Terminated)
        from ..outdir import Terminated

        msg = interrupted(cfg.output_dir)
        if isinstance(e, Terminated):
            print(f"tokengraft train: terminated (SIGTERM){msg[len('interrupted'):]}", file=sys.stderr)
            return 143
        print(f"tokengraft train: {msg}", file=sys.stderr)
        return 130
    return 0


def interrupted(output_dir) -> str:
    """What an interruption left: the checkpoint to resume from, or a folder a plain rerun restarts."""
    from ..train.run import last_checkpoint

    last = last_checkpoint(output_dir) if output_dir else None
    if last is not None:
        return f"interrupted; the last checkpoint is {last}: continue with the same command and --resume"
    return ("interrupted before the first checkpoint; nothing to resume: run the same command again "
            "(no --overwrite needed)")
