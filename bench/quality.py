"""How good are new tokens at step 0, and how fast are they learned, per init?

Side by side, one run, on real SmolLM2-135M (tied): tokengraft's `distill`, `auto`, `describe`,
`subword`, transformers' mean init (`resize_token_embeddings(mean_resizing=True)`) and random
N(0, 0.02) rows. Per init and seed:
- zero-shot KL: next-token distributions after the description vs after the token, held-out prose;
- KL(base || grafted) on held-out prose (nats/token) and the largest new-token probability;
- steps to 60% / 90% new-token accuracy (every step) on two tasks:
  * text: a synthetic SFT set that uses `<think>`/`</think>`/`<tool_call>`/`</tool_call>`; only the
    new rows train (tied: in and out);
  * grounding: the demo's earlier task (a LLaVA of SmolLM2 + a small *random* CLIP tower, real
    photos with drawn shapes of random sizes, answers `<ref>..</ref><box><loc_i>x4</box>`); the new
    rows and the projector train. The demo now pretrains its tower and puts shapes on the location
    grid (docs/demo.md); this task keeps the random tower its RESULTS.md figures were measured on.

    .venv/bin/python bench/quality.py [--quick] [--seeds 3] [--steps 60] [--tasks text,grounding]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

TOKENS = [{"content": "<think>", "description": "let me think step by step"},
          {"content": "</think>", "description": "end of thinking"},
          {"content": "<tool_call>", "description": "call the function"},
          {"content": "</tool_call>", "description": "end of the function call"}]
BINS = 4
GROUNDING = ([{"content": "<ref>", "description": "the name of the object"},
              {"content": "</ref>", "description": "end of the object name"},
              {"content": "<box>", "description": "the box around the object"},
              {"content": "</box>", "description": "end of the box"}]
             + [{"content": f"<loc_{i}>", "description": f"position {i + 1} of {BINS} across the image"}
                for i in range(BINS)])
INITS = ("tokengraft:distill", "tokengraft:auto", "tokengraft:describe", "tokengraft:subword", "transformers", "random")


def sft_texts(n: int, seed: int) -> list[str]:
    """A small synthetic SFT set: questions answered with a thought, then a tool call."""
    rng = random.Random(seed)
    tools = [("weather", "city"), ("calc", "expr"), ("search", "query"), ("time", "zone")]
    words = ["Paris", "Tokyo", "3+4", "cats", "UTC", "Berlin", "12*7", "rivers", "PST", "Lima"]
    out = []
    for _ in range(n):
        tool, arg = rng.choice(tools)
        w = rng.choice(words)
        out.append(f"User: please use {tool} for {w}.\nAssistant: <think> The user wants {tool} of {w}. </think> "
                   f"<tool_call> {{\"name\": \"{tool}\", \"{arg}\": \"{w}\"}} </tool_call>")
    return out


def build(how: str, seed: int, folder=None, tokens=TOKENS):
    """(model, tokenizer, processor, n_base): ``folder`` (default SmolLM2) with ``tokens`` added by ``how``."""
    from transformers import AddedToken

    from tokengraft.demo.assets import smollm2_dir
    from tokengraft.graft import graft
    from tokengraft.io import load_folder

    model, tok, proc, manifest = load_folder(folder or smollm2_dir(), dtype=torch.float32)
    model.eval()
    n_base = len(tok)
    if how.startswith("tokengraft:"):
        graft(model, tok, [dict(t) for t in tokens], init=how.split(":", 1)[1], manifest=manifest, processor=proc,
              log=lambda *_: None)
    else:
        tok.add_tokens([AddedToken(t["content"], special=True, normalized=False) for t in tokens], special_tokens=True)
        model.resize_token_embeddings(len(tok), mean_resizing=(how == "transformers"))
        if how == "random":
            with torch.no_grad():
                g = torch.Generator().manual_seed(seed)
                w = model.get_input_embeddings().weight
                w[n_base:] = torch.randn(w.shape[0] - n_base, w.shape[1], generator=g) * 0.02
    return model, tok, proc, n_base


def measure(model, tok, n_base, tokens):
    from tokengraft.distill import zero_shot_kl
    from tokengraft.probe import head_inputs, heldout_text, kl_of_rows, mass_of

    ids = tok.convert_tokens_to_ids([t["content"] for t in tokens])
    emb = model.get_input_embeddings().weight
    zs = float(zero_shot_kl(model, tok, ids, [t["description"] for t in tokens], emb[ids].detach(),
                            heldout_text()).mean())
    hidden = head_inputs(model, tok, heldout_text(), max_tokens=512)
    kl = kl_of_rows(hidden, model.get_output_embeddings().weight, range(n_base, emb.shape[0]))
    return zs, float(kl.mean()), mass_of(kl)


def text_batches(tok, seed, steps, batch):
    texts = sft_texts(steps * batch, seed)
    for step in range(steps):
        enc = tok(texts[step * batch: (step + 1) * batch], return_tensors="pt", padding=True)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def grounding_folder(root, seed: int, n: int):
    """The demo's LLaVA (built once per seed) and a grounding set of ``n`` samples."""
    from pathlib import Path

    from tokengraft.demo.assets import smollm2_dir
    from tokengraft.demo.data import make_grounding_dataset
    from tokengraft.demo.llava import COMPACT_CHATML, build_llava

    root = Path(root) / f"seed{seed}"
    if not (root / "llava").exists():
        build_llava(smollm2_dir(), root / "llava", seed=seed, image_size=128, vision_layers=2,
                    chat_template=COMPACT_CHATML)
        make_grounding_dataset(root / "data", n_train=n, n_eval=0, bins=BINS, seed=seed, image_size=128)
    return root / "llava", root / "data"


def grounding_batches(tok, proc, model, data, seed, steps, batch):
    import json

    from tokengraft.train.data import Collator, LlavaDataset

    recs = json.loads((data / "train.json").read_text())
    ds = LlavaDataset(recs, tok, proc, data / "images", image_token_id=model.config.image_token_id,
                      log=lambda *_: None)
    collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    for step in range(steps):
        yield collate([ds[order[(step * batch + i) % len(ds)]] for i in range(batch)])


def learn(model, n_base, batches, lr):
    """Steps to 60% and 90% new-token accuracy (per step batch); only rows >= n_base train (and a
    LLaVA's projector, as in the demo)."""
    emb = model.get_input_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(False)
    emb.requires_grad_(True)
    extra = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
    for p in extra:
        p.requires_grad_(True)
    opt = torch.optim.Adam([emb] + extra, lr=lr)
    model.train()
    hits, accs = {0.6: None, 0.9: None}, []
    for step, b in enumerate(batches, start=1):
        labels = b.pop("labels")[:, 1:]
        logits = model(**b).logits[:, :-1]
        mask = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
        new = mask & (labels >= n_base)
        acc = float((logits.argmax(-1)[new] == labels[new]).float().mean())
        accs.append(acc)
        opt.zero_grad()
        loss.backward()
        emb.grad[:n_base] = 0  # only the new rows learn
        opt.step()
        for t in hits:
            if hits[t] is None and acc >= t:
                hits[t] = step
    return hits, accs


def fmt(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/r"
    return f"{statistics.mean(xs):.3g} ± {statistics.pstdev(xs):.2g}" if len(xs) > 1 else f"{xs[0]:.3g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 20 steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--tasks", default="text,grounding")
    ap.add_argument("--workdir", default=None, help="where the grounding LLaVAs and data go (default: a temp folder)")
    args = ap.parse_args(argv)
    seeds, steps = (1, 20) if args.quick else (args.seeds, args.steps)
    import tempfile

    work = args.workdir or tempfile.mkdtemp(prefix="tg-quality-")
    tables = {}
    for task in args.tasks.split(","):
        rows = tables.setdefault(task, [])
        for how in args.inits.split(","):
            res = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                folder, data = grounding_folder(work, seed, steps * args.batch) if task == "grounding" else (None, None)
                t0 = time.perf_counter()
                model, tok, proc, n_base = build(how, seed, folder, GROUNDING if task == "grounding" else TOKENS)
                t_init = time.perf_counter() - t0
                zs, kl, mass = measure(model, tok, n_base, GROUNDING if task == "grounding" else TOKENS)
                batches = (grounding_batches(tok, proc, model, data, seed, steps, args.batch) if task == "grounding"
                           else text_batches(tok, seed, steps, args.batch))
                torch.manual_seed(seed)
                hits, accs = learn(model, n_base, batches, args.lr)
                res.append((zs, kl, mass, hits[0.6], hits[0.9], t_init))
                print(f"{task:<9} {how:<20} seed {seed}: zero-shot KL {zs:.3f}  prose KL {kl:.2e}  max new-token p "
                      f"{mass:.2e}  steps to 60% {hits[0.6]}  to 90% {hits[0.9]}  init {t_init:.1f}s  acc/step "
                      + " ".join(f"{a:.2f}" for a in accs), flush=True)
            rows.append((how, res))
    print(f"\nCommand: .venv/bin/python bench/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{seeds} seed(s), {steps} steps, batch {args.batch}, lr {args.lr}; n/r = not reached; mean ± spread (pstdev)\n")
    for task, rows in tables.items():
        print(f"\ntask: {task}\n")
        print("| init | zero-shot KL | prose KL (nats/token) | max new-token p | steps to 60% | steps to 90% | init time s |")
        print("|---|---|---|---|---|---|---|")
        for how, res in rows:
            cols = list(zip(*res))
            r60, r90 = (f" ({sum(x is not None for x in cols[i])}/{len(res)})" for i in (3, 4))
            print(f"| {how} | {fmt(cols[0])} | {fmt(cols[1])} | {fmt(cols[2])} | {fmt(cols[3])}{r60} | {fmt(cols[4])}{r90} "
                  f"| {fmt(cols[5])} |")


if __name__ == "__main__":
    main()
