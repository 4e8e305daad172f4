"""Does adding tokens change what the model says about ordinary text?

On real SmolLM2-135M (tied head) and held-out real prose, add 8 tokens with each strategy and
measure KL(base || grafted) per token and the largest probability mass the new rows take at any
position. Alternatives, measured in the same run: transformers' ``resize_token_embeddings``
(default ``mean_resizing=True``), random N(0, 0.02) rows (axolotl's default), mean + N(0, 1/d)
(LLaMA-Factory's noise_init), and a plain subword mean. "semantic" is the cosine between a new
token's input row and the mean of its pieces (1.0 = fully semantic, ~0 = none).

    .venv/bin/python bench/invisibility.py            # prints a table, updates bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _results import machine, update_section  # noqa: E402

TOKENS = ["<box>", "</box>", "<ref>", "</ref>", "<think>", "</think>", "<loc_3>", "<loc_17>"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

    from tokengraft import graft
    from tokengraft.init import markup_words
    from tokengraft.demo.assets import smollm2_dir
    from tokengraft.probe import head_inputs, heldout_text, kl_of_rows, mass_of

    d = smollm2_dir()
    base_tok = AutoTokenizer.from_pretrained(d)
    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hidden = head_inputs(base, base_tok, heldout_text(), max_tokens=4096)
    W = base.lm_head.weight.detach().clone()
    n = W.shape[0]
    pieces = {t: base_tok(markup_words(t), add_special_tokens=False)["input_ids"] for t in TOKENS}
    subword = torch.stack([W[pieces[t]].mean(0) for t in TOKENS])

    def fresh():
        return copy.deepcopy(base), copy.deepcopy(base_tok)

    def add_plain(m, tok):
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in TOKENS], special_tokens=True)
        return [tok.convert_tokens_to_ids(t) for t in TOKENS]

    def with_rows(fill):
        def run():
            m, tok = fresh()
            ids = add_plain(m, tok)
            m.resize_token_embeddings(len(tok), mean_resizing=False)
            with torch.no_grad():
                m.get_input_embeddings().weight[ids] = fill()
            return m, ids
        return run

    def hf_default():
        m, tok = fresh()
        ids = add_plain(m, tok)
        m.resize_token_embeddings(len(tok))  # mean_resizing=True by default
        return m, ids

    def tg(init, pad):
        def run():
            m, tok = fresh()
            man = graft(m, tok, TOKENS, init=init, pad_to_multiple_of=pad, log=lambda *_: None)
            return m, [t.id for t in man.tokens]
        return run

    g = torch.Generator().manual_seed(0)
    mu = W.mean(0)
    cases = [
        ("tokengraft auto (default, pad 64)", tg(None, 64)),
        ("tokengraft auto, no padding", tg(None, 1)),
        ("tokengraft mean", tg("mean", 64)),
        ("tokengraft hewitt", tg("hewitt", 64)),
        ("tokengraft subword", tg("subword", 64)),
        ("transformers resize (mean_resizing)", hf_default),
        ("random N(0, 0.02) (axolotl)", with_rows(lambda: torch.randn(8, W.shape[1], generator=g) * 0.02)),
        ("mean + N(0, 1/d) (LLaMA-Factory noise_init)",
         with_rows(lambda: mu + torch.randn(8, W.shape[1], generator=g) / W.shape[1] ** 0.5)),
        ("plain subword mean", with_rows(lambda: subword)),
    ]
    rows = []
    for name, run in cases:
        t0 = time.perf_counter()
        m, ids = run()
        secs = time.perf_counter() - t0
        Wg = m.get_output_embeddings().weight.detach()
        per_pos = kl_of_rows(hidden, Wg, range(n, Wg.shape[0]))  # base rows are untouched: W == Wg[:n]
        kl, mass = float(per_pos.mean()), mass_of(per_pos)
        sem = torch.nn.functional.cosine_similarity(m.get_input_embeddings().weight.detach()[ids], subword).mean()
        rows.append((name, kl, mass, float(sem), Wg.shape[0] - n, secs))
        print(f"{name:<45} KL {kl:9.2e}  max mass {mass:9.2e}  semantic {float(sem):5.2f}  rows +{Wg.shape[0] - n}")
    ref = next(r for r in rows if r[0].startswith("transformers"))
    lines = ["Command: `.venv/bin/python bench/invisibility.py`", f"Machine: {machine()}", "",
             f"Real SmolLM2-135M-Instruct (tied), 8 new tokens, {hidden.shape[0]} positions of held-out "
             "standard-library prose (not the calibration text).", "",
             "| strategy | KL(base‖grafted) nats/token | x transformers | max new-row mass | semantic (cos to subword mean) | rows added |",
             "|---|---|---|---|---|---|"]
    for name, kl, mass, sem, added, _ in rows:
        lines.append(f"| {name} | {kl:.2e} | {kl / ref[1]:.2f} | {mass:.2e} | {sem:.2f} | {added} |")
    auto = rows[0]
    lines += ["", f"Goal `auto` KL <= 1e-6: {'met' if auto[1] <= 1e-6 else 'NOT met'} ({auto[1]:.2e})."]
    if not args.no_write:
        update_section("invisibility", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
