"""The 92,544 -> 92,547 scenario at small scale (1000 -> 1003 rows, hidden 16) with InternLM2's
untied key layout, as an mmengine iter_N.pth file and as a DeepSpeed folder."""
from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pickle

import pytest
import torch
from checkpoint_helpers import internlm2_llava_state, module_from_shapes, word_tokenizer, words

from tokengraft.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from tokengraft.checkpoint.convert import convert

V, H = 1000, 16
SRC = words(V - 2) + ["<box>", "<ref>"]  # the checkpoint's vocabulary (ids 998, 999)
TGT = words(V - 2) + ["<ref>", "<p>", "<box>", "</p>", "<quad>"]  # 1003: reordered + 3 new


def LogBuffer():
    """mmengine's message-hub HistoryBuffer as the file names it (the global
    mmengine.logging.history_buffer.HistoryBuffer, NEWOBJ + BUILD), written without mmengine."""
    from tokengraft.checkpoint.inert import _placeholder_class

    cls = _placeholder_class("mmengine.logging.history_buffer", "HistoryBuffer")
    buf = cls.__new__(cls)
    buf.__setstate__({"_log_history": np.array([1.0, 2.0]), "max_length": 1000000})
    return buf


def mmengine_checkpoint(path, state):
    trainable = [k for k in state if "projector" in k or "lora" in k or "tok_embeddings" in k]
    g = torch.Generator().manual_seed(1)
    opt_state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(state[k].shape, generator=g),
                     "exp_avg_sq": torch.rand(state[k].shape, generator=g)} for i, k in enumerate(trainable)}
    ckpt = {
        "meta": {"epoch": 0, "iter": 500, "cfg": "model = dict(type='LLaVAModel')", "seed": 0,
                 "mmengine_version": "0.10.6", "np_seed": np.int64(7)},
        "state_dict": collections.OrderedDict(state),
        "message_hub": {"log_scalars": {"train/loss": LogBuffer()}, "runtime_info": {"iter": 500},
                        "resumed_keys": {"iter": True}, "arr": np.arange(3)},
        "optimizer": {"state": opt_state, "param_groups": [{"lr": 2e-4, "params": list(range(len(trainable)))}]},
        "param_schedulers": [{"by_epoch": False}],
    }
    from tokengraft.checkpoint.repickle import safe_save

    safe_save(ckpt, path)  # torch.save's own pickler would import mmengine to name the class
    return ckpt, trainable


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtuner")
    state = internlm2_llava_state(V, H)
    ckpt, trainable = mmengine_checkpoint(d / "iter_500.pth", state)
    target = d / "target"
    word_tokenizer(TGT).save_pretrained(target)
    return d, state, ckpt, trainable, target


def test_real_mmengine_files_need_the_safe_unpickler(work):
    d, state, _, trainable, _ = work
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # torch's own safe mode
        torch.load(d / "iter_500.pth", weights_only=True)
    sd, info = read_state_dict(d / "iter_500.pth")
    assert info.format == "mmengine" and set(sd) == set(state)
    assert all(torch.equal(sd[k], state[k]) for k in state)
    assert any(n.endswith("HistoryBuffer") for n in info.inert)  # left inert, never imported
    assert info.optimizer is not None and len(info.optimizer["state"]) == len(trainable)


def _check_rows(new, state, atol=1e-5):
    emb, head = new["llm.model.tok_embeddings.weight"], new["llm.output.weight"]
    lora_b = new["llm.base_model.model.output.lora_B.default.weight"]
    old_emb, old_head = state["llm.model.tok_embeddings.weight"], state["llm.output.weight"]
    assert emb.shape == (V + 3, H) and head.shape == (V + 3, H) and lora_b.shape == (V + 3, 4)
    assert torch.equal(emb[: V - 2], old_emb[: V - 2]) and torch.equal(head[: V - 2], old_head[: V - 2])
    # by identity: <ref> 999 -> 998, <box> 998 -> 1000
    for s, t in ((999, 998), (998, 1000)):
        assert torch.equal(emb[t], old_emb[s]) and torch.equal(head[t], old_head[s])
        assert torch.equal(lora_b[t], state["llm.base_model.model.output.lora_B.default.weight"][s])
    for t in (999, 1001, 1002):  # new: head = mean of trained rows, LoRA delta zero
        assert torch.allclose(head[t], old_head.mean(0), atol=atol)
        assert torch.count_nonzero(lora_b[t]) == 0
    assert torch.equal(new["projector.model.0.weight"], state["projector.model.0.weight"])


def test_load_pth_into_target_with_three_more_tokens(work):
    d, state, _, _, target = work
    from transformers import AutoTokenizer

    model = module_from_shapes({k: (V + 3, *v.shape[1:]) if v.shape[0] == V else tuple(v.shape)
                                for k, v in state.items()})
    logs = []
    report = load_checkpoint(model, d / "iter_500.pth", AutoTokenizer.from_pretrained(target),
                             source_tokens="<box>,<ref>", log=logs.append)
    assert report.assumed is None and not logs
    assert set(report.new.values()) == {"<p>", "</p>", "<quad>"} and not report.dropped
    _check_rows(model.state_dict(), state)
    # the input side of a new token: mean of its sub-word pieces when the pieces exist, else the mean
    assert report.init["input:<p>"] in ("subword", "mean")


def test_without_vocabulary_rows_map_by_index_loudly(work):
    d, state, *_ = work
    model = module_from_shapes({k: (V + 3, *v.shape[1:]) if v.shape[0] == V else tuple(v.shape)
                                for k, v in state.items()})
    logs = []
    report = load_checkpoint(model, d / "iter_500.pth", None, log=logs.append)
    assert report.assumed and "BY INDEX" in report.assumed and any("BY INDEX" in m for m in logs)
    new = model.state_dict()
    assert torch.equal(new["llm.output.weight"][:V], state["llm.output.weight"])
    assert torch.allclose(new["llm.output.weight"][V:], state["llm.output.weight"].mean(0).expand(3, H), atol=1e-5)


def test_convert_pth_keeps_optimizer_moments(work, tmp_path):
    """Same format in, same format out: an iter_N.pth FILE of the same structure, moments remapped,
    everything else (meta, message hub objects, schedulers, step) as it was."""
    d, state, ckpt, trainable, target = work
    out = tmp_path / "iter_500_new.pth"
    report = convert(d / "iter_500.pth", target, out, source_tokens="<box>,<ref>", log=lambda *a: None)
    assert out.is_file()
    sd, info = read_state_dict(out)
    assert info.format == "mmengine" and list(sd) == list(state)
    _check_rows(sd, state)
    opt = info.optimizer
    i = trainable.index("llm.model.tok_embeddings.weight")
    old = ckpt["optimizer"]["state"][i]["exp_avg_sq"]
    new = opt["state"][i]["exp_avg_sq"]
    assert new.shape == (V + 3, H)
    assert torch.equal(new[998], old[999]) and torch.equal(new[1000], old[998]) and torch.equal(new[:998], old[:998])
    assert torch.count_nonzero(new[[999, 1001, 1002]]) == 0 and opt["state"][i]["step"] == 10
    j = trainable.index("projector.model.0.weight")
    assert torch.equal(opt["state"][j]["exp_avg"], ckpt["optimizer"]["state"][j]["exp_avg"])
    assert any(r["kind"] == "moment" for r in report.remapped)
    # where mmengine (here: a stand-in at its module path) and numpy exist, the file loads as the input did
    stand_in = tmp_path / "mm" / "mmengine" / "logging"
    stand_in.mkdir(parents=True)
    for f in (stand_in.parent / "__init__.py", stand_in / "__init__.py"):
        f.write_text("")
    (stand_in / "history_buffer.py").write_text("class HistoryBuffer:\n    pass\n")
    check = ("import sys, numpy as np, torch\nfull = torch.load(sys.argv[1], weights_only=False)\n"
             "hb = full['message_hub']['log_scalars']['train/loss']\n"
             "assert type(hb).__module__ == 'mmengine.logging.history_buffer' and hb.max_length == 1000000\n"
             "assert np.array_equal(hb._log_history, [1.0, 2.0]) and np.array_equal(full['message_hub']['arr'], np.arange(3))\n"
             "assert list(full) == %r and full['param_schedulers'] == [{'by_epoch': False}]\n"
             "assert full['meta']['np_seed'] == 7 and full['meta']['cfg'] == %r\nprint('LOADED')\n"
             % (list(ckpt), ckpt["meta"]["cfg"]))
    r = subprocess.run([sys.executable, "-c", check, str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "mm")})
    assert "LOADED" in r.stdout, r.stderr[-2000:]

    # a rerun onto the file it wrote: refused in one line that speaks of a file, the file untouched
    before = out.read_bytes()
    r = subprocess.run([sys.executable, "-m", "tokengraft", "convert", str(d / "iter_500.pth"), "--to", str(target),
                        "-o", str(out), "--source-tokens", "<box>,<ref>"], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "is a file" in lines[0] and "folder;" not in lines[0], r.stderr
    assert out.read_bytes() == before and not [n for n in os.listdir(tmp_path) if n.startswith(".iter_500_new")]


def test_deepspeed_folder(work, tmp_path):
    _, state, _, _, target = work
    ds = tmp_path / "iter_500.pth"
    ds.mkdir()
    from tokengraft.checkpoint.repickle import safe_save

    safe_save({"module": {k: v.to(torch.bfloat16) for k, v in state.items()}, "ds_version": "0.16.0",
               "ds_config": LogBuffer()}, ds / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, ds / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    sd, info = read_state_dict(ds)
    assert info.format == "deepspeed" and sd["llm.output.weight"].dtype == torch.bfloat16
    out = tmp_path / "out"
    rc = subprocess.run([sys.executable, "-m", "tokengraft", "convert", str(ds), "--to", str(target), "-o", str(out),
                         "--source-tokens", "<box>,<ref>"], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    new, info = read_state_dict(out)  # still a DeepSpeed folder
    assert info.format == "deepspeed" and info.container["ds_version"] == "0.16.0"
    assert not list(out.glob("*optim_states.pt")) and "optimizer partition" in rc.stdout
    _check_rows({k: v.float() for k, v in new.items()}, {k: v.to(torch.bfloat16).float() for k, v in state.items()},
                atol=2e-3)  # the mean row is rounded to bf16


def test_zero3_partitions_that_do_not_add_up_are_one_line(work, tmp_path):
    """tokengraft consolidates ZeRO partitions itself (DeepSpeed installed or not): an empty module
    with an optimizer file that holds no partitions is refused in one line."""
    ds = tmp_path / "iter_9.pth"
    ds.mkdir()
    torch.save({"module": {"llm.output.weight": torch.empty(0)}}, ds / "mp_rank_00_model_states.pt")
    torch.save({}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="ZeRO partitions that do not add up") as e:
        read_state_dict(ds)
    assert "\n" not in str(e.value)


def test_cli_by_index_warns_on_stderr(work, tmp_path):
    d, state, _, _, target = work
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tokengraft", "convert", str(d / "iter_500.pth"), "--to", str(target),
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "BY INDEX" in r.stderr and "rows 1000 -> 1003" in r.stderr
    sd, info = read_state_dict(out)  # one file, as the input was
    assert torch.equal(sd["llm.output.weight"][:V], state["llm.output.weight"])
    assert out.is_file() and info.format == "mmengine" and info.optimizer is not None
