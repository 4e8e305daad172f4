"""Benchmark: `tokengraft convert` vs the transformers path, adding 64 tokens to a ~1.7B checkpoint.

Builds a synthetic checkpoint with the real shapes of a 1.7B model (SmolLM2-1.7B: hidden 2048,
intermediate 8192, 24 layers, vocab 49,152, here untied, bf16, several shards; random values) in a
temporary folder, with the real SmolLM2 tokenizer. The target is that tokenizer + 64 new tokens.

Both paths run as subprocesses, one after the other, on the same (page-cached) files:
  tokengraft:   tokengraft convert SRC --to TARGET -o OUT
  transformers: from_pretrained -> resize_token_embeddings -> save_pretrained (+ tokenizer)
Wall time and peak RSS (wait4 rusage of each child) are reported with their ratios, next to the
I/O lower bound: the bytes that must be read and written. Keeping the source's sharding, every
shard holding a vocabulary tensor must be read and written whole; the other shards need no I/O
(a hard link). The same bytes copied with plain file reads/writes (`cp`-like) give the floor.

    .venv/bin/python bench/convert.py           # full size (~3.7 GB checkpoint, needs ~12 GB RAM)
    .venv/bin/python bench/convert.py --small   # 4 layers, hidden 1024: a quick check

Results are printed and appended to bench/RESULTS.md under `## convert`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 64


def shapes(hidden, inter, layers, vocab):
    s = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
              p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
              p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
              p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
              p + "post_attention_layernorm.weight": (hidden,)}
    s |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return s


def build_source(folder: Path, hidden, inter, layers, vocab, shard_bytes, tokenizer_dir):
    """Write a sharded bf16 safetensors checkpoint one shard at a time (bounded memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    plan, cur, size = [], [], 0
    for k, s in shapes(hidden, inter, layers, vocab).items():
        n = 2 * torch.Size(s).numel()
        if cur and size + n > shard_bytes:
            plan.append(cur)
            cur, size = [], 0
        cur.append((k, s))
        size += n
    plan.append(cur)
    weight_map, total = {}, 0
    for i, items in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for k, s in items:
            t = torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
            tensors[k] = t.to(torch.bfloat16)
            weight_map[k] = name
            total += tensors[k].numel() * 2
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(folder)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return plan, total


def build_target(folder: Path, tokenizer_dir, vocab_rows):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens([f"<tg_{i}>" for i in range(N_NEW)], special_tokens=True)
    tok.save_pretrained(folder)
    return len(tok)


TRANSFORMERS_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, target, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(target)
model.resize_token_embeddings(len(tok))
model.save_pretrained(out, max_shard_size=shard)
tok.save_pretrained(out)
"""


def run(cmd) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit status) of one child process, measured by /usr/bin/time.

    Not wait4() on our own child: a forked child inherits this (large) process's resident pages
    until it execs, which inflates its ru_maxrss."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf.name, *map(str, cmd)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"benchmark step failed: {' '.join(map(str, cmd))}")
        rss_kb = int(tf.read().strip().splitlines()[-1])
    return wall, rss_kb * 1024, p.returncode


def copy_floor(files: list[Path], dest: Path) -> float:
    """Seconds to read and write the same bytes with plain buffered file copies."""
    dest.mkdir()
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as a, open(dest / f.name, "wb") as b:
            shutil.copyfileobj(a, b, 16 * 2**20)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a quick run: 4 layers, hidden 1024")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from tokengraft.demo.assets import smollm2_dir

    hidden, inter, layers = (1024, 4096, 4) if args.small else (2048, 8192, 24)
    vocab = 49152
    shard = "300MB" if args.small else "1GB"
    shard_bytes = (300 if args.small else 1000) * 10**6
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tg-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tokdir = smollm2_dir()
        t0 = time.perf_counter()
        plan, total = build_source(work / "src", hidden, inter, layers, vocab, shard_bytes, tokdir)
        print(f"built synthetic checkpoint: {total / 1e9:.2f} GB, {len(plan)} shards, "
              f"{sum(len(p) for p in plan)} tensors ({time.perf_counter() - t0:.0f} s)")
        n_tokens = build_target(work / "target", tokdir, vocab)
        src = work / "src"
        idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        dirty = sorted({idx["model.embed_tokens.weight"], idx["lm_head.weight"]})
        dirty_bytes = sum((src / f).stat().st_size for f in dirty)
        vocab_bytes = 2 * vocab * hidden * 2
        new_vocab_bytes = 2 * n_tokens * hidden * 2

        tg = run([str(ROOT / ".venv/bin/python"), "-m", "tokengraft", "convert", str(src), "--to",
                  str(work / "target"), "-o", str(work / "out-tokengraft")])
        hf = run([str(ROOT / ".venv/bin/python"), "-c", TRANSFORMERS_SCRIPT, str(src), str(work / "target"),
                  str(work / "out-transformers"), shard])
        floor = copy_floor([src / f for f in dirty], work / "floor")
        py = run([str(ROOT / ".venv/bin/python"), "-c", "import torch, tokengraft.checkpoint.convert"])

        # sanity: same tensors out of both paths for the untouched parts, rows grew by 64
        from safetensors import safe_open
        out_idx = json.loads((work / "out-tokengraft" / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(work / "out-tokengraft" / out_idx["lm_head.weight"]), "pt") as f:
            assert f.get_slice("lm_head.weight").get_shape() == [n_tokens, hidden]
        linked = sum((work / "out-tokengraft" / f).stat().st_ino == (src / f).stat().st_ino
                     for f in set(idx.values()))

        rows = [
            ("tokengraft convert", tg[0], tg[1]),
            ("transformers from_pretrained+resize+save", hf[0], hf[1]),
            ("plain copy of the vocabulary shards (I/O floor)", floor, None),
            ("python + torch + tokengraft import only", py[0], py[1]),
        ]
        size = f"hidden {hidden}, {layers} layers, vocab {vocab} -> {n_tokens}, bf16, untied, {len(plan)} shards"
        lines = [f"checkpoint: {total / 1e9:.2f} GB ({size})",
                 f"{'path':<50} {'wall s':>8} {'peak RSS':>10}"]
        for name, w, r in rows:
            lines.append(f"{name:<50} {w:>8.1f} {'' if r is None else f'{r / 2**30:.2f} GB':>10}")
        lines += [
            f"speed-up (transformers / tokengraft wall):      {hf[0] / tg[0]:.1f}x",
            f"memory (transformers / tokengraft peak RSS):    {hf[1] / tg[1]:.1f}x",
            f"I/O lower bound keeping the sharding: read + write the {len(dirty)} vocabulary shard(s) = "
            f"{2 * dirty_bytes / 1e9:.2f} GB ({dirty_bytes / 1e9:.2f} GB each way); "
            f"{linked} of {len(set(idx.values()))} shards hard-linked (0 bytes)",
            f"format-free bound (vocab tensors only): read {vocab_bytes / 1e9:.2f} GB + write "
            f"{new_vocab_bytes / 1e9:.2f} GB",
            f"transformers reads {total / 1e9:.2f} GB and writes {(total + new_vocab_bytes - vocab_bytes) / 1e9:.2f} GB",
            f"tokengraft vs the I/O floor (same bytes, plain copy): {tg[0] / floor:.2f}x the floor's time end to "
            f"end, {(tg[0] - py[0]) / floor:.2f}x without the {py[0]:.1f} s interpreter start",
        ]
        print("\n".join(lines))
        cmd = ".venv/bin/python bench/convert.py" + (" --small" if args.small else "")
        append_results(cmd, lines)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def append_results(cmd: str, lines: list[str]) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"\n### {stamp}: `{cmd}` ({os.cpu_count()} CPU cores, warm page cache)\n```\n" + "\n".join(lines) + "\n```\n"
    if "\n## convert\n" not in text:
        text = text.rstrip("\n") + "\n\n## convert\n"
    # insert at the end of the `## convert` section, before the next `## ` heading
    head = text.index("\n## convert\n") + len("\n## convert\n")
    nxt = text.find("\n## ", head)
    text = text[:nxt] + block + text[nxt:] if nxt != -1 else text + block
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
