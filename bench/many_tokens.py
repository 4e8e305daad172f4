"""Benchmark: thousands of new tokens on real SmolLM2-135M (tied head), side by side in one run.

For k = 8, 100, 1,000, 10,000 new tokens (a round-robin of location bins ``<loc_0>``..``<loc_999>``,
semantic IDs ``<a_0>``..``<c_255>`` and generated codes ``<code_0>``..) this measures:

* ``tokengraft add MODEL --tokens-file TOKENS.json -o OUT`` wall time and peak RSS (a child
  process, measured by /usr/bin/time), next to transformers' own path in a child process:
  ``tok.add_tokens(..., special_tokens=True)`` + ``resize_token_embeddings(mean_resizing=True)`` +
  ``save_pretrained``;
* KL(base || grafted) per position (mean) and the probability mass the new rows take (largest over
  positions, and mean) on held-out prose the calibration never saw, for both outputs;
* ``--mode rows`` trainable parameters and the time of one optimizer step (batch 1 x 128 tokens);
* ``tokengraft doctor OUT`` and ``tokengraft convert BASE --to OUT`` wall time.

Goals (marked met / not met): ``add`` of 10,000 tokens <= 1x transformers' time and <= 60 s;
new-token mass at init <= 1e-3 for k = 10,000; rows-mode trainable parameters == k*H (tied).

    .venv/bin/python bench/many_tokens.py           # k = 8, 100, 1000, 10000
    .venv/bin/python bench/many_tokens.py --quick   # k = 8, 100, 1000
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from convert import run  # noqa: E402  (wall, peak RSS of one child process)

PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
MASS_GOAL = 1e-3
ADD_SECONDS_GOAL = 60.0

TRANSFORMERS_SCRIPT = """
import json, sys, torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer
src, tokens, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(src)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
toks = [AddedToken(t, special=True, normalized=False) for t in json.load(open(tokens))]
tok.add_tokens(toks, special_tokens=True)
model.resize_token_embeddings(len(tok), mean_resizing=True)
model.save_pretrained(out)
tok.save_pretrained(out)
"""


def token_names(k: int) -> list[str]:
    """k distinct names, round-robin over the three families a user adds in bulk."""
    fams = [[f"<loc_{i}>" for i in range(1000)],
            [f"<{c}_{i}>" for c in "abc" for i in range(256)],
            [f"<code_{i}>" for i in range(k)]]
    out, seen, i = [], set(), 0
    while len(out) < k:
        fam = fams[i % 3]
        j = i // 3
        if j < len(fam) and fam[j] not in seen:
            out.append(fam[j])
            seen.add(fam[j])
        elif j >= len(fam):  # this family is used up: take the next generated code
            t = f"<code_{len(out) + 100000}>"
            out.append(t)
            seen.add(t)
        i += 1
    return out


def head_rows(folder: Path) -> torch.Tensor:
    """The output head of a saved folder (the embedding when tied), float32."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as g:
            if "lm_head.weight" in g.keys():
                return g.get_tensor("lm_head.weight").float()
    for f in files:
        with safe_open(str(f), "pt") as g:
            for key in g.keys():
                if key.endswith("embed_tokens.weight"):
                    return g.get_tensor(key).float()
    raise SystemExit(f"{folder}: no head or embedding tensor")


def rows_step(folder: Path, n_base: int) -> tuple[int, int, float, int]:
    """(trainable params, hidden size, seconds for one optimizer step, optimizer state elements)
    of ``--mode rows`` on a grafted folder."""
    from transformers import AutoModelForCausalLM

    from tokengraft.hf import is_tied
    from tokengraft.train.params import prepare

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    man = json.loads((folder / "tokengraft.json").read_text())
    ids = [t["id"] for t in man["tokens"]]
    plan = prepare(model, "rows", ids, is_tied(model))
    params = [p for p in plan.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.cat([torch.randint(0, n_base, (1, 96)), torch.tensor([ids[:32]])], dim=1)
    for step in range(2):  # the first step allocates the optimizer state; time the second
        t0 = time.perf_counter()
        loss = plan.model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
    state = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return plan.trainable, model.config.hidden_size, dt, state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="k up to 1,000 only")
    ap.add_argument("--ks", help="comma-separated k values (overrides the default set)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.demo.assets import smollm2_dir
    from tokengraft.probe import head_inputs, heldout_text, kl_of_rows

    ks = [int(k) for k in args.ks.split(",")] if args.ks else ([8, 100, 1000] if args.quick else [8, 100, 1000, 10000])
    base = Path(smollm2_dir())
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tg-bench-many-"))
    work.mkdir(parents=True, exist_ok=True)
    btok = AutoTokenizer.from_pretrained(base)
    bmodel = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    n_base = len(btok)
    # text without the new tokens never looks their rows up: one set of head inputs serves every output
    hidden = head_inputs(bmodel, btok, heldout_text(), max_tokens=4096)
    del bmodel
    results = []
    try:
        for k in ks:
            names = token_names(k)
            tf = work / f"tokens-{k}.json"
            tf.write_text(json.dumps(names))
            out_tg, out_hf = work / f"tg-{k}", work / f"hf-{k}"
            tg = run([PY, "-m", "tokengraft", "add", base, "--tokens-file", tf, "-o", out_tg, "--overwrite"])
            shutil.rmtree(out_hf, ignore_errors=True)
            hf = run([PY, "-c", TRANSFORMERS_SCRIPT, base, tf, out_hf])
            r = {"k": k, "tg_s": tg[0], "tg_rss": tg[1], "hf_s": hf[0], "hf_rss": hf[1]}
            for tag, folder in (("tg", out_tg), ("hf", out_hf)):
                w = head_rows(folder)
                per = kl_of_rows(hidden, w, range(n_base, w.shape[0]))  # new + padding rows
                mass = -torch.expm1(-per)
                r |= {f"{tag}_kl": float(per.mean()), f"{tag}_mass_max": float(mass.max()),
                      f"{tag}_mass_mean": float(mass.mean())}
                del w
            r["trainable"], r["hidden"], r["step_s"], r["opt_state"] = rows_step(out_tg, n_base)
            r["doctor_s"] = run([PY, "-m", "tokengraft", "doctor", out_tg])[0]
            out_cv = work / f"cv-{k}"
            shutil.rmtree(out_cv, ignore_errors=True)
            r["convert_s"], r["convert_rss"] = run([PY, "-m", "tokengraft", "convert", base, "--to", out_tg,
                                                    "-o", out_cv])[:2]
            results.append(r)
            print(f"k={k}: done ({json.dumps({a: round(b, 8) if isinstance(b, float) else b for a, b in r.items()})})",
                  flush=True)
            for d in (out_hf, out_cv):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(table(results, n_base)))


def table(results: list[dict], n_base: int) -> list[str]:
    gb = 2**30
    lines = [f"SmolLM2-135M (tied, H=576, V={n_base}); held-out prose; mass = probability the new+padding rows take",
             f"{'k':>6} | {'add s tg / hf':>15} | {'RSS GB tg / hf':>15} | {'KL tg / hf (nats)':>21} | "
             f"{'max mass tg / hf':>19} | {'mean mass tg':>12} | {'rows params':>11} | {'=k*H':>4} | "
             f"{'step s':>6} | {'doctor s':>8} | {'convert s':>9}"]
    for r in results:
        lines.append(
            f"{r['k']:>6} | {r['tg_s']:>6.1f} / {r['hf_s']:>6.1f} | {r['tg_rss'] / gb:>6.2f} / {r['hf_rss'] / gb:>6.2f} | "
            f"{r['tg_kl']:>9.2e} / {r['hf_kl']:>9.2e} | {r['tg_mass_max']:>8.2e} / {r['hf_mass_max']:>8.2e} | "
            f"{r['tg_mass_mean']:>12.2e} | {r['trainable']:>11} | {'yes' if r['trainable'] == r['k'] * r['hidden'] else 'NO':>4} | "
            f"{r['step_s']:>6.2f} | {r['doctor_s']:>8.1f} | {r['convert_s']:>9.1f}")
    big = max(results, key=lambda r: r["k"])
    goals = [
        (f"add of k={big['k']} <= 1x transformers' time", big["tg_s"] <= big["hf_s"],
         f"{big['tg_s']:.1f} s vs {big['hf_s']:.1f} s"),
        (f"add of k={big['k']} <= {ADD_SECONDS_GOAL:.0f} s here", big["tg_s"] <= ADD_SECONDS_GOAL, f"{big['tg_s']:.1f} s"),
        (f"new-token mass at init <= {MASS_GOAL:.0e} at k={big['k']} (largest over positions)",
         big["tg_mass_max"] <= MASS_GOAL, f"{big['tg_mass_max']:.2e} (transformers' mean init: {big['hf_mass_max']:.2e})"),
        ("rows-mode trainable params == k*H for every k (O(k*H), never V*H)",
         all(r["trainable"] == r["k"] * r["hidden"] for r in results),
         ", ".join(f"k={r['k']}: {r['trainable']} params, AdamW state {r['opt_state']}" for r in results)),
    ]
    if big["k"] < 10000:
        lines.append(f"(--quick / --ks: the goals are stated for k=10,000; here judged at k={big['k']})")
    for name, ok, detail in goals:
        lines.append(f"goal: {name}: {'met' if ok else 'NOT met'} ({detail})")
    return lines


if __name__ == "__main__":
    main()
