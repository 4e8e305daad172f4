"""`tokengraft demo`: the main job on the embedded default."""
from __future__ import annotations

import argparse
import os

from ._common import add_output, number


KNOBS = ("steps", "n_train", "n_eval", "bins", "batch_size", "lr", "rows_lr", "seed", "mode", "init",
         "vision_steps")


def _defaults() -> dict:
    """run_demo's own defaults: one source for the demo and its --help."""
    import inspect

    from ..demo.run import run_demo

    return {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}


def register(sub, name):
    p = sub.add_parser(
        name, help="end-to-end demo: tiny real LLaVA, grounding tokens, train, evaluate, export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the whole tokengraft pipeline on an embedded default, offline:\n"
                    "  1. build a LLaVA from real SmolLM2-135M + a small CLIP tower + projector; no CLIP\n"
                    "     weights ship offline, so the tower is pretrained first to see where shapes are\n"
                    "  2. generate a grounding dataset over real photos (scikit-image) with drawn shapes;\n"
                    "     answers use new tokens: <ref>red circle</ref><box><loc_1><loc_2><loc_5><loc_6></box>\n"
                    "  3. graft the tokens, print the manifest and the KL on ordinary text (invisible graft)\n"
                    "  4. train the new rows + projector with a progress bar and new-token accuracy\n"
                    "  5. evaluate on held-out images (exact match, per-token accuracy, box IoU), plot the\n"
                    "     new-token curves and draw predicted boxes\n"
                    "  6. export and verify a full checkpoint, reload it with plain transformers, answer\n"
                    "The defaults finish in about 3 minutes on 2 idle CPU cores (bench/RESULTS.md, demo).",
        epilog="outputs (under OUT): llava/ llava-box/ data/ run/ (metrics.jsonl, curves PNG) export/\n"
               "predictions.png summary.json. An earlier demo folder is replaced; any other existing\n"
               "folder is refused.\n\nexample:\n  tokengraft demo -o demo-out --steps 200")
    add_output(p, required=False, default="demo-out",
               help="output folder; an earlier demo folder there is replaced, any other is refused")
    d = _defaults()
    for flag, key, typ, (lo, hi), what in (
            ("--steps", "steps", int, (1, 10**7), "training steps"),
            ("--train-samples", "n_train", int, (1, 10**7), "training samples"),
            ("--eval-samples", "n_eval", int, (1, 10**7), "held-out samples"),
            ("--bins", "bins", int, (1, 10**4), "location bins per axis, one token each; at most 16 (each grid "
                                                "cell >= 8 px)"),
            ("--batch-size", "batch_size", int, (1, 1 << 16), "samples per step"),
            ("--lr", "lr", float, (0, 10), "learning rate of the projector (and LoRA)"),
            ("--rows-lr", "rows_lr", float, (0, 10), "learning rate of the new rows"),
            ("--vision-steps", "vision_steps", int, (0, 10**7), "pretraining steps of the small vision tower, "
                                                               "which no package ships weights for (0: leave it random)"),
            ("--seed", "seed", int, (0, 2**32 - 1), "seed of the model, data and training")):
        shown = "--lr" if d[key] is None else d[key]
        p.add_argument(flag, dest=key, type=number(typ, lo, hi, above=typ is float), default=None,
                       metavar="N" if typ is int else "X",
                       help=f"{what} (default {shown})")
    p.add_argument("--mode", dest="mode", choices=("rows", "lora"), default=None,
                   help=f"rows: only the new rows + projector learn; lora: also LoRA on the language model "
                        f"(default {d['mode']})")
    p.add_argument("--init", dest="init", default=None,
                   help="init of the new tokens: a tokengraft method (auto, mean, ...) or `transformers` "
                        "(the mean of the existing rows, as resize_token_embeddings(mean_resizing=True)) "
                        "for the comparison (default auto)")
    return p


def run(args) -> int:
    from ..compat import TRAIN_NEEDS, require

    require(TRAIN_NEEDS, "tokengraft demo")  # it trains
    from ..demo.run import run_demo
    from ..errors import TokengraftError
    from ..outdir import FolderError

    if os.path.lexists(args.output) and not os.path.isdir(args.output):
        raise FolderError(f"{args.output}: exists and is not a folder; choose another --output")

    kw = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    if any(kw.get(k, 1) < 1 for k in ("steps", "n_train", "n_eval", "batch_size")) or kw.get("bins", 2) < 2 \
            or kw.get("vision_steps", 0) < 0:
        raise TokengraftError("--steps, --train-samples, --eval-samples and --batch-size must be >= 1, --bins >= 2 "
                              "and --vision-steps >= 0")
    run_demo(args.output, **kw)
    return 0
