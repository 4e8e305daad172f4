"""`tokengraft demo`: the main job on the embedded default."""
from __future__ import annotations

import argparse
import os

from ._common import add_output


def register(sub, name):
    p = sub.add_parser(
        name, help="end-to-end demo: tiny real LLaVA, grounding tokens, train, evaluate, export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the whole tokengraft pipeline on an embedded default, offline:\n"
                    "  1. build a LLaVA from real SmolLM2-135M + a small CLIP tower + projector\n"
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
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--train-samples", type=int, default=256, help="training samples (default 256)")
    p.add_argument("--eval-samples", type=int, default=24, help="held-out samples (default 24)")
    p.add_argument("--bins", type=int, default=4, help="location bins per axis, one token each (default 4)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of the new rows and projector (default 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args) -> int:
    from ..demo.run import run_demo
    from ..errors import TokengraftError
    from ..outdir import FolderError

    if os.path.lexists(args.output) and not os.path.isdir(args.output):
        raise FolderError(f"{args.output}: exists and is not a folder; choose another --output")

    if args.steps < 1 or args.bins < 2 or args.train_samples < 1 or args.eval_samples < 1:
        raise TokengraftError("--steps, --train-samples and --eval-samples must be >= 1 and --bins >= 2")
    run_demo(args.output, steps=args.steps, n_train=args.train_samples, n_eval=args.eval_samples, bins=args.bins,
             lr=args.lr, seed=args.seed)
    return 0
