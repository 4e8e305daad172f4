"""How good are new tokens at step 0, and how fast are they learned, per init?

Side by side, one run, on real SmolLM2-135M (tied): tokengraft's `distill`, `auto`, `describe`,
`subword`, transformers' mean init (`resize_token_embeddings(mean_resizing=True)`) and random
N(0, 0.02) rows. Per init and seed:
- zero-shot KL: next-token distributions after the description vs after the token, held-out prose;
- KL(base || grafted) on held-out prose (nats/token) and the largest new-token probability;
- steps to 60% / 90% new-token accuracy (every step) on a synthetic text-only SFT task that uses
  `<think>`/`</think>`/`<tool_call>`/`</tool_call>`; only the new rows train (tied: in and out).

    .venv/bin/python bench/quality.py [--quick] [--seeds 3] [--steps 60]
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


def build(how: str, seed: int):
    from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

    from tokengraft.demo.assets import smollm2_dir
    from tokengraft.graft import graft

    d = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    n_base = len(tok)
    if how.startswith("tokengraft:"):
        graft(model, tok, [dict(t) for t in TOKENS], init=how.split(":", 1)[1], log=lambda *_: None)
    else:
        tok.add_tokens([AddedToken(t["content"], special=True, normalized=False) for t in TOKENS], special_tokens=True)
        model.resize_token_embeddings(len(tok), mean_resizing=(how == "transformers"))
        if how == "random":
            with torch.no_grad():
                g = torch.Generator().manual_seed(seed)
                w = model.get_input_embeddings().weight
                w[n_base:] = torch.randn(w.shape[0] - n_base, w.shape[1], generator=g) * 0.02
    return model, tok, n_base


def measure(model, tok, n_base):
    from tokengraft.distill import zero_shot_kl
    from tokengraft.probe import head_inputs, heldout_text, kl_of_rows, mass_of

    ids = tok.convert_tokens_to_ids([t["content"] for t in TOKENS])
    emb = model.get_input_embeddings().weight
    zs = float(zero_shot_kl(model, tok, ids, [t["description"] for t in TOKENS], emb[ids].detach(),
                            heldout_text()).mean())
    hidden = head_inputs(model, tok, heldout_text(), max_tokens=512)
    kl = kl_of_rows(hidden, model.get_output_embeddings().weight, range(n_base, emb.shape[0]))
    return zs, float(kl.mean()), mass_of(kl)


def learn(model, tok, n_base, seed, steps, batch, lr):
    """Steps to 60% and 90% new-token accuracy (per step batch); only rows >= n_base train."""
    texts = sft_texts(steps * batch, seed)
    emb = model.get_input_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(False)
    emb.requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    model.train()
    hits, accs = {0.6: None, 0.9: None}, []
    for step in range(1, steps + 1):
        enc = tok(texts[(step - 1) * batch: step * batch], return_tensors="pt", padding=True)
        ids = enc["input_ids"]
        labels = ids[:, 1:]
        logits = model(input_ids=ids, attention_mask=enc["attention_mask"]).logits[:, :-1]
        mask = enc["attention_mask"][:, 1:].bool()
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
    args = ap.parse_args(argv)
    seeds, steps = (1, 20) if args.quick else (args.seeds, args.steps)
    rows = []
    for how in args.inits.split(","):
        res = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            model, tok, n_base = build(how, seed)
            t_init = time.perf_counter() - t0
            zs, kl, mass = measure(model, tok, n_base)
            hits, accs = learn(model, tok, n_base, seed, steps, args.batch, args.lr)
            res.append((zs, kl, mass, hits[0.6], hits[0.9], t_init))
            print(f"{how:<20} seed {seed}: zero-shot KL {zs:.3f}  prose KL {kl:.2e}  max new-token p {mass:.2e}  "
                  f"steps to 60% {hits[0.6]}  to 90% {hits[0.9]}  init {t_init:.1f}s  acc/step "
                  + " ".join(f"{a:.2f}" for a in accs), flush=True)
        rows.append((how, res))
    print(f"\nCommand: .venv/bin/python bench/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{seeds} seed(s), {steps} steps, batch {args.batch}, lr {args.lr}; n/r = not reached; mean ± spread (pstdev)\n")
    print("| init | zero-shot KL | prose KL (nats/token) | max new-token p | steps to 60% | steps to 90% | init time s |")
    print("|---|---|---|---|---|---|---|")
    for how, res in rows:
        cols = list(zip(*res))
        reached = f" ({sum(x is not None for x in cols[4])}/{len(res)} reached)"
        print(f"| {how} | {fmt(cols[0])} | {fmt(cols[1])} | {fmt(cols[2])} | {fmt(cols[3])} | {fmt(cols[4])}{reached} | {fmt(cols[5])} |")


if __name__ == "__main__":
    main()
