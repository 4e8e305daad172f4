"""The shape of the code (issue 10): small modules, and a row map that walks the pipeline once.

"Enters each module once": while `convert` gathers rows by token identity, the tokengraft frames on
the stack, read outward-in, never leave a module and come back to it (no ping-pong between, say,
``checkpoint.stream`` and ``checkpoint.remap``). The check runs a real conversion of a real folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import word_tokenizer, words

PKG = Path(__file__).resolve().parents[1] / "src" / "tokengraft"
MAX_LINES = 400


def test_no_module_over_the_line_budget():
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines())
             for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    assert len(sizes) > 40
    big = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them along their seams): {big}"


def module_walk(stack_modules: list[str]) -> list[str]:
    """Consecutive frames of one module collapsed: the modules a call passed through, in order."""
    walk: list[str] = []
    for m in stack_modules:
        if not walk or walk[-1] != m:
            walk.append(m)
    return walk


def reentered(walk: list[str]) -> list[str]:
    return sorted({m for m in walk if walk.count(m) > 1})


def test_walk_checker_can_fail():
    assert reentered(module_walk(["a", "a", "b", "c"])) == []
    assert reentered(module_walk(["a", "b", "a"])) == ["a"]


def _gather_stacks(run) -> list[list[str]]:
    """Run ``run()``; for every call into a RowMap gather, the tokengraft modules on the stack."""
    from tokengraft import vocab

    targets = {vocab.RowMap.apply.__code__, vocab.RowMap.apply_chunk.__code__}
    stacks: list[list[str]] = []

    def prof(frame, event, arg):
        if event == "call" and frame.f_code in targets:
            mods, f = [], frame
            while f is not None:
                name = f.f_globals.get("__name__", "")
                if name.startswith("tokengraft"):
                    mods.append(name)
                f = f.f_back
            stacks.append(list(reversed(mods)))

    sys.setprofile(prof)
    try:
        run()
    finally:
        sys.setprofile(None)
    return stacks


@pytest.mark.parametrize("form", ["hf-folder", "pth-file"])
def test_convert_row_map_walk_enters_each_module_once(tmp_path, form):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokengraft.checkpoint.convert import convert

    torch.manual_seed(0)
    src_vocab = words(40) + ["<a>", "<b>"]
    cfg = LlamaConfig(vocab_size=len(src_vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    src = tmp_path / "src"
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(src)
    word_tokenizer(src_vocab).save_pretrained(src)
    out = tmp_path / "out"
    kw = {}
    if form == "pth-file":  # an XTuner-style state dict in one pickle, with its tokenizer given apart
        kw["source_tokenizer"] = str(src)
        src = tmp_path / "iter_1.pth"
        torch.save({"state_dict": {f"llm.{k}": v for k, v in model.state_dict().items()}}, src)
        out = tmp_path / "iter_1_new.pth"
    target = tmp_path / "target"
    word_tokenizer(words(40) + ["<b>", "<c>", "<a>"]).save_pretrained(target)

    stacks = _gather_stacks(lambda: convert(src, target, out, log=lambda *a: None, **kw))
    assert stacks, "convert never gathered rows through RowMap (the one gather)"
    for s in stacks:
        walk = module_walk(s)
        assert walk[0] == "tokengraft.checkpoint.convert" and walk[-1] == "tokengraft.vocab", walk
        assert not reentered(walk), f"the row-map walk re-enters {reentered(walk)}: {' -> '.join(walk)}"
