"""Resume helpers: the new rows' Adam moments follow their tokens through a token change (via the
checkpoint package's one moment remap), and a corrupt checkpoint file is named in one line."""
from __future__ import annotations

import pytest
import torch


def test_moments_move_by_token_identity():
    from tokengraft.train.params import NewRows
    from tokengraft.train.resume import remap_moments
    from tokengraft.vocab import RowMap

    old, new = ["<a>", "<b>", "<c>"], ["<c>", "<new>", "<a>"]
    saved = NewRows([10, 11, 12], hidden=4, rows=20, tied=False)
    other = torch.nn.Parameter(torch.zeros(3, 4))  # same shape as the old rows: must be left alone
    opt = torch.optim.Adam([{"params": list(saved.parameters())}, {"params": [other]}])
    for k, p in enumerate([*saved.parameters(), other]):  # a different gradient per parameter
        p.grad = (torch.arange(12, dtype=torch.float32).view(3, 4) + 1) * (k + 1) * (-1) ** k
    opt.step()
    before = {n: opt.state[p]["exp_avg"].clone() for n, p in saved.named_parameters()}
    other_before = opt.state[other]["exp_avg"].clone()

    # the run now trains new tokens: rows (and their moments) as the checkpoint left them, then remapped
    rows = NewRows([10, 13, 12], hidden=4, rows=20, tied=False)
    opt2 = torch.optim.Adam([{"params": list(rows.parameters())}, {"params": [other]}])
    opt2.load_state_dict(opt.state_dict())  # what transformers does on resume: shapes still the old ones
    remap_moments(opt2, rows, RowMap.by_identity(old, new))
    for n, p in rows.named_parameters():
        got = opt2.state[p]["exp_avg"]
        assert got.shape == (3, 4)
        assert torch.equal(got[0], before[n][2]) and torch.equal(got[2], before[n][0])  # <c>, <a> moved
        assert torch.equal(got[1], torch.zeros(4))  # <new> starts from zero, as a fresh parameter
    assert torch.equal(opt2.state[other]["exp_avg"], other_before)


def test_corrupt_optimizer_file_is_named(tmp_path):
    from tokengraft.train.config import TrainError
    from tokengraft.train.resume import check_checkpoint

    ck = tmp_path / "checkpoint-2"
    ck.mkdir()
    for name in ("run.json", "new_rows.safetensors"):
        (ck / name).write_text("{}")
    (ck / "trainer_state.json").write_text('{"global_step": 2}')
    torch.save({"state": {0: {"exp_avg": torch.ones(64, 64)}}}, ck / "optimizer.pt")
    check_checkpoint(ck)  # intact: passes
    raw = bytearray((ck / "optimizer.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (ck / "optimizer.pt").write_bytes(bytes(raw))
    with pytest.raises(TrainError, match="optimizer.pt"):
        check_checkpoint(ck)
    (ck / "trainer_state.json").write_text('{"global_step": "x"}')
    with pytest.raises(TrainError, match="trainer_state.json"):
        check_checkpoint(ck)
