"""Property tests of RowMap: apply, the chunked gather; remap there and back is the identity on
shared tokens."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokengraft.checkpoint.remap import remap_state_dict
from tokengraft.vocab import NEW, RowMap

POOL = [f"t{i}" for i in range(14)]


@st.composite
def vocab(draw):
    """A vocabulary of distinct tokens in random order, plus rows (some padding beyond it)."""
    toks = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=10, unique=True))
    rows = len(toks) + draw(st.integers(0, 3))
    return toks, rows


def table(rows, cols=3, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def identity_map(a, b):
    return RowMap.by_identity(a[0], b[0], a[1], b[1])


@settings(max_examples=150, deadline=None)
@given(vocab(), vocab())
def test_by_identity_moves_rows_with_tokens(a, b):
    rm = identity_map(a, b)
    x = table(a[1])
    y = rm.apply(x)
    assert y.shape == (b[1], 3)
    for t, tok in enumerate(b[0]):
        if tok in a[0]:
            assert torch.equal(y[t], x[a[0].index(tok)])
        else:
            assert rm.source[t] == NEW and rm.new_tokens[t] == tok and torch.count_nonzero(y[t]) == 0
    assert set(rm.dropped.values()) == set(a[0]) - set(b[0])


@settings(max_examples=150, deadline=None)
@given(vocab(), vocab(), st.integers(1, 5))
def test_chunked_gather_equals_whole_gather(a, b, step):
    """apply_chunk (the streaming path) builds exactly what apply builds, new rows from fill."""
    rm = identity_map(a, b)
    x = table(a[1])
    fill = torch.arange(len(rm.new_rows) * x.shape[1], dtype=x.dtype).reshape(len(rm.new_rows), x.shape[1]) + 1000
    whole = rm.apply(x, fill=fill)
    parts = [rm.apply_chunk(lambda ids: x[ids], s, min(s + step, rm.target_rows), fill)
             for s in range(0, rm.target_rows, step)]
    assert torch.equal(torch.cat(parts) if parts else whole, whole)


@settings(max_examples=60, deadline=None)
@given(vocab(), vocab())
def test_remap_there_and_back_is_identity_on_shared_tokens(a, b):
    h = 16  # wider than any generated vocabulary, so no other tensor looks vocabulary-sized
    sd = {"model.embed_tokens.weight": table(a[1], h, 1), "lm_head.weight": table(a[1], h, 2),
          "lm_head.bias": table(a[1], 1, 3)[:, 0], "model.norm.weight": torch.ones(h)}
    there, r1 = remap_state_dict(sd, a[0], b[0], source_rows=a[1], target_rows=b[1])
    back, r2 = remap_state_dict(there, b[0], a[0], source_rows=b[1], target_rows=a[1])
    for k in sd:
        assert back[k].shape == sd[k].shape
    for s, tok in enumerate(a[0]):
        if tok in b[0]:
            for k in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
                assert torch.equal(back[k][s], sd[k][s]), (k, tok)
    assert torch.equal(back["model.norm.weight"], sd["model.norm.weight"])
    assert set(r1.dropped.values()) == set(a[0]) - set(b[0])
    assert set(r1.new.values()) - {None} == set(b[0]) - set(a[0])
