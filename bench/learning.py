"""How fast are new tokens learned, per init strategy?

The demo task (tiny real LLaVA: SmolLM2-135M + small CLIP tower; grounding answers made of new
tokens) trained in `rows` mode + projector from the same seed with each init: tokengraft's
`auto`, `mean`, `subword`, `hewitt`, vs transformers' default (`resize_token_embeddings`, which
uses mean_resizing) and random N(0, 0.02) rows (axolotl's default). Reports the first logged step
where the running new-token top-1 accuracy reaches the target (default 90%), and the accuracy and
new-token loss at the end.

    .venv/bin/python bench/learning.py [--steps 120] [--target 0.9]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import machine, update_section  # noqa: E402


def variant_folder(base: Path, tokens: list[str], how: str, out: Path) -> Path:
    """A copy of the LLaVA with the tokens added the way ``how`` says (the alternatives)."""
    from transformers import AddedToken

    from tokengraft.graft import graft
    from tokengraft.hf import sync_config
    from tokengraft.io import load_folder, save_folder

    model, tok, proc, man = load_folder(base)
    if how.startswith("tokengraft:"):
        man = graft(model, tok, tokens, init=how.split(":", 1)[1], manifest=man, processor=proc, log=lambda *_: None)
    else:
        # the common path: add_tokens + resize (then the trainer grafts nothing: tokens exist)
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
        ids = tok.convert_tokens_to_ids(tokens)
        rows = model.get_input_embeddings().weight.shape[0]
        if how == "transformers":
            model.resize_token_embeddings(max(rows, len(tok)))  # default mean_resizing=True
            if rows >= len(tok):  # free rows reused: resize does nothing, so emulate its mean init
                with torch.no_grad():
                    w = model.get_input_embeddings().weight
                    w[ids] = w[: man.base_size].mean(0)
        elif how == "random":
            model.resize_token_embeddings(max(rows, len(tok)), mean_resizing=False)
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                w = model.get_input_embeddings().weight
                w[ids] = torch.randn(len(ids), w.shape[1], generator=g) * 0.02
        sync_config(model, model.get_input_embeddings().weight.shape[0], man.tied)
        man = None  # not a tokengraft graft: no manifest
    return save_folder(out, model, tok, man, processor=proc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--inits", default="tokengraft:auto,tokengraft:mean,tokengraft:subword,tokengraft:hewitt,transformers,random")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from tokengraft.demo.assets import smollm2_dir
    from tokengraft.demo.data import make_grounding_dataset
    from tokengraft.demo.llava import COMPACT_CHATML, build_llava
    from tokengraft.train.metrics import read_metrics
    from tokengraft.train.loop import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="tg-learning-"))
    results = []
    try:
        # the demo's model and data (tokengraft.demo.run defaults)
        llava = build_llava(smollm2_dir(), work / "llava", image_size=160, vision_layers=2, chat_template=COMPACT_CHATML)
        data = make_grounding_dataset(work / "data", n_train=256, n_eval=4, bins=4)
        for how in args.inits.split(","):
            folder = variant_folder(llava, data["tokens"], how, work / f"m-{how.replace(':', '-')}")
            t0 = time.perf_counter()
            run = train(TrainConfig(model=str(folder), data=str(data["train"]), image_folder=str(data["image_folder"]),
                                    tokens=data["tokens"], mode="rows", train_projector=True, max_steps=args.steps,
                                    lr=args.lr, batch_size=8, logging_steps=5, save_steps=args.steps,
                                    output_dir=str(work / f"run-{how.replace(':', '-')}"), progress=False,
                                    tensorboard=False, seed=0), log=lambda *_: None)
            secs = time.perf_counter() - t0
            rows = [r for r in read_metrics(Path(run) / "metrics.jsonl") if "new_token_acc" in r]
            hit = next((r["step"] for r in rows if r["new_token_acc"] >= args.target), None)
            last = rows[-1]
            results.append((how, hit, last["new_token_acc"], last.get("new_token_loss"), secs))
            print(f"{how:<22} steps to {args.target:.0%}: {hit or '>' + str(args.steps):>6}  final acc "
                  f"{last['new_token_acc']:.2f}  final new-token loss {last.get('new_token_loss', float('nan')):.3f}", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = next((r for r in results if r[0] == "transformers"), None)
    lines = [f"Command: `.venv/bin/python bench/learning.py --steps {args.steps} --target {args.target}`",
             f"Machine: {machine()}", "",
             "Demo task (256 samples, 4 location bins, 8 new tokens), `rows` mode + projector, batch 8, "
             f"lr {args.lr}, same seed for every init. Accuracy is over new-token label positions, "
             "averaged over each 5-step logging window.", "",
             f"| init | steps to {args.target:.0%} new-token accuracy | x transformers | final accuracy | final new-token loss |",
             "|---|---|---|---|---|"]
    for how, hit, acc, loss, _ in results:
        ratio = f"{hit / ref[1]:.2f}" if (hit and ref and ref[1]) else "n/a"
        lines.append(f"| {how} | {hit if hit else f'not reached in {args.steps}'} | {ratio} | {acc:.2f} | {loss:.3f} |")
    print("\n".join(lines))
    if not args.no_write:
        update_section("learning speed", "\n".join(lines))


if __name__ == "__main__":
    main()
