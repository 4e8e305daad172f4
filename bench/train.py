"""Benchmark: step time, peak memory and checkpoint bytes of tokengraft's `rows` and `lora` modes
vs the common alternative (PEFT LoRA + modules_to_save=[embed_tokens, lm_head]) and vs LoRA with
no new tokens, on the SmolLM2 LLaVA with the grounding dataset (20 new tokens).

    .venv/bin/python bench/train.py [--steps 6] [--batch 8] [--rounds 2] [--results bench/RESULTS.md]

Each configuration runs in its own process (peak RSS is per process); rounds alternate the
configurations so machine load affects them alike. Goals: step time <= 1.05x LoRA without new
tokens; checkpoint bytes <= 1.01x the LoRA adapter alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("lora_no_new", "rows", "lora", "lora_modules_to_save")


def setup(name: str, llava: str, data: dict, batch: int, n_batches: int) -> dict:
    """Model, optimizer, batches and a step/save function for one configuration."""
    import torch

    from tokengraft.graft import graft
    from tokengraft.io import load_folder
    from tokengraft.train.data import Collator, LlavaDataset, load_records
    from tokengraft.train.metrics import token_stats
    from tokengraft.train.params import lora_config, param_groups, prepare
    from tokengraft.train.run import RunInfo, save_parts

    torch.manual_seed(0)
    model, tok, proc, man = load_folder(llava)
    tokens = data["tokens"] if name != "lora_no_new" else []
    if tokens:
        man = graft(model, tok, [{"content": t, "init": "mean"} for t in tokens], manifest=man, log=lambda *a: None)
    ids = tok.convert_tokens_to_ids(tokens)
    img = model.config.image_token_id
    ds = LlavaDataset(load_records(data["train"]), tok, proc, data["image_folder"], "chatml", max_length=128,
                      image_token_id=img, log=lambda *a: None)
    batches = [Collator(tok.pad_token_id)([ds[(s * batch + i) % len(ds)] for i in range(batch)])
               for s in range(n_batches)]
    is_new = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    if ids:
        is_new[torch.tensor(ids)] = True
    plan = None
    if name in ("rows", "lora"):
        plan = prepare(model, name, ids, man.tied)
        train_model = plan.model
        groups = param_groups(model if name == "rows" else train_model, plan.rows, 1e-3, 0.0, None, None)
    else:
        from peft import get_peft_model

        cfg = lora_config(model)
        if name == "lora_modules_to_save":
            cfg.modules_to_save = ["embed_tokens", "lm_head"]
        train_model = get_peft_model(model, cfg)
        groups = [{"params": [p for p in train_model.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    train_model.train()

    def step(b) -> float:
        b = dict(b)
        t0 = time.perf_counter()
        labels = b.pop("labels")
        out = train_model(**b)
        total, _ = token_stats(out.logits, labels, is_new)
        (total / (labels[:, 1:] != -100).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def save() -> int:
        out_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        if plan is not None:
            info = RunInfo(base_model=llava, base_vocab_fingerprint="-", mode=name, new_tokens=tokens, tied=man.tied)
            save_parts(out_dir, train_model, model, plan.rows, info, man, tok)
            weights = ["new_rows.safetensors", "adapter_model.safetensors"]
        else:
            train_model.save_pretrained(out_dir)
            weights = ["adapter_model.safetensors"]
        n = sum((out_dir / w).stat().st_size for w in weights if (out_dir / w).exists())
        shutil.rmtree(out_dir, ignore_errors=True)
        return n

    def opt_bytes() -> int:
        return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))

    return {"step": step, "save": save, "opt_bytes": opt_bytes, "batches": batches,
            "trainable": sum(p.numel() for p in train_model.parameters() if p.requires_grad)}


def one(name: str, llava: str, data: dict, steps: int, batch: int) -> dict:
    """One configuration in this process: peak RSS, checkpoint bytes, optimizer state, step time."""
    s = setup(name, llava, data, batch, steps + 2)
    times = [s["step"](b) for b in s["batches"]][2:]  # first steps warm up allocators and kernels
    return {"config": name, "step_s": statistics.median(times), "step_times": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ckpt_bytes": s["save"](), "optimizer_state_bytes": s["opt_bytes"](), "trainable": s["trainable"]}


def interleaved(llava: str, data: dict, steps: int, batch: int) -> dict:
    """Step-time ratios vs LoRA-without-new-tokens with every configuration in one process, taking
    turns step by step, so a busy machine slows them alike; the median of per-round ratios."""
    setups = {c: setup(c, llava, data, batch, steps + 1) for c in CONFIGS}
    ratios = {c: [] for c in CONFIGS}
    for r in range(steps + 1):
        t = {c: setups[c]["step"](setups[c]["batches"][r]) for c in (CONFIGS if r % 2 == 0 else CONFIGS[::-1])}
        if r:  # round 0 warms up
            for c in CONFIGS:
                ratios[c].append(t[c] / t["lora_no_new"])
            print("interleaved round", r, {c: round(v, 3) for c, v in t.items()}, flush=True)
    return {c: statistics.median(v) for c, v in ratios.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--llava", default=None, help="LLaVA folder (default: build one in the cache)")
    ap.add_argument("--results", default="bench/RESULTS.md")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="also measure step-time ratios with all configurations in one process, N rounds")
    ap.add_argument("--interleave-only", action="store_true",
                    help="only the interleaved ratios, appended to the existing `## train` section")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        d = json.loads(a.data)
        print("RESULT " + json.dumps(one(a.one, a.llava, d, a.steps, a.batch)))
        return 0

    from tokengraft.demo.assets import cache_dir, smollm2_dir
    from tokengraft.demo.data import make_grounding_dataset
    from tokengraft.demo.llava import build_llava

    llava = a.llava or str(cache_dir() / "bench-llava")
    if not Path(llava).exists():
        build_llava(smollm2_dir(), llava)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    d = make_grounding_dataset(work, n_train=32, n_eval=0, bins=16, seed=0)
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
    if a.interleave_only:
        ratios = interleaved(llava, d, a.interleave or a.steps, a.batch)
        text = _ratio_text(ratios, a)
        print(text)
        write_section(Path(a.results), text, append=True)
        return 0
    res: dict[str, list] = {c: [] for c in CONFIGS}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for r in range(a.rounds):
        for c in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
            p = subprocess.run([sys.executable, __file__, "--one", c, "--llava", llava, "--data", json.dumps(d),
                                "--steps", str(a.steps), "--batch", str(a.batch)], capture_output=True, text=True,
                               env=env)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            res[c].append(json.loads(line[7:]))
            print(f"round {r} {c}: {res[c][-1]['step_s']:.3f} s/step", flush=True)
    best = {c: {"step_s": min(x["step_s"] for x in v), "peak_rss_mb": max(x["peak_rss_mb"] for x in v),
                "ckpt_bytes": v[0]["ckpt_bytes"], "opt_bytes": v[0]["optimizer_state_bytes"],
                "trainable": v[0]["trainable"]} for c, v in res.items()}
    base = best["lora_no_new"]
    rows = [f"| {c} | {b['step_s']:.3f} | {b['step_s'] / base['step_s']:.3f} | {b['peak_rss_mb']:.0f} | "
            f"{b['ckpt_bytes']:,} | {b['ckpt_bytes'] / base['ckpt_bytes']:.4f} | {b['opt_bytes']:,} | "
            f"{b['trainable']:,} |" for c, b in best.items()]
    table = "\n".join(["| config | step s (min of medians) | x LoRA no new | peak RSS MB | checkpoint bytes | "
                       "x LoRA adapter | optimizer state bytes | trainable params |", "|---|---|---|---|---|---|---|---|"]
                      + rows)
    goals = (f"goals: lora step time {best['lora']['step_s'] / base['step_s']:.3f}x LoRA-without-new-tokens "
             f"(goal <= 1.05); lora checkpoint {best['lora']['ckpt_bytes'] / base['ckpt_bytes']:.4f}x the adapter "
             f"alone (goal <= 1.01); alternative (modules_to_save) checkpoint "
             f"{best['lora_modules_to_save']['ckpt_bytes'] / base['ckpt_bytes']:.1f}x")
    print(table)
    print(goals)
    cmd = (f".venv/bin/python bench/train.py --steps {a.steps} --batch {a.batch} --rounds {a.rounds}")
    section = (f"\n## train\n\n`{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; SmolLM2-135M LLaVA, "
               f"20 new tokens, batch {a.batch}, CPU, {os.cpu_count()} cores shared with other jobs)\n\n"
               f"{table}\n\n{goals}\n")
    if a.interleave:
        section += _ratio_text(interleaved(llava, d, a.interleave, a.batch), a)
    write_section(Path(a.results), section)
    return 0


def _ratio_text(ratios: dict, a) -> str:
    cmd = f".venv/bin/python bench/train.py --interleave-only --interleave {a.interleave or a.steps} --batch {a.batch}"
    return (f"\nInterleaved step time (all four in one process taking turns step by step, median of per-round "
            f"ratios; `{cmd}`): " + ", ".join(f"{c} {v:.3f}x" for c, v in ratios.items()) +
            f" of LoRA without new tokens (goal for lora: <= 1.05x).\n")


def write_section(path: Path, section: str, append: bool = False) -> None:
    """Replace (or append) the `## train` section, leaving every other section alone; ``append``
    adds ``section`` at the end of the existing `## train` section instead."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.strip() == "## train"), None)
    if append and start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:end]).rstrip("\n") + "\n" + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(path)
        return
    if start is None:
        new = text.rstrip("\n") + "\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]).rstrip("\n") + "\n" + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
