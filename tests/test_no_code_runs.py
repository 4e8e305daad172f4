"""No code from any input ever runs, whatever is installed (issue 23), and none from any output.

Payloads a hostile checkpoint carries, each creating its own marker file when unpickled freely:
``os.system``, ``pkgutil.resolve_name`` -> a callable, a ``builtins.getattr`` chain, ``operator``
(methodcaller / attrgetter) chains, ``functools.partial`` and ``logging.config.dictConfig``. A
control proves every one is live under ``torch.load(weights_only=False)``. All of them together
are then planted in every format tokengraft reads (.pth and .bin state dicts, mmengine iter_N.pth,
XTuner DeepSpeed folders in the ZeRO-2 and ZeRO-3 layouts, a PEFT adapter .bin, a Trainer
checkpoint-N's optimizer.pt and rng_state.pth) and handed to every command that reads them
(convert, doctor, doctor --checkpoint, import-xtuner; DeepSpeed is installed in this venv): no
marker appears, refusals are one line naming a global, and every pickle in an output, loaded with
``torch.load(weights_only=False)``, runs nothing either. Tensors are tiny; convert runs in-process
(the same code path as the CLI, which is run once), the other commands as real subprocesses.
"""
from __future__ import annotations

import builtins
import functools
import json
import logging.config
import operator
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import word_tokenizer, words

from tokengraft.checkpoint.repickle import looks_pickled, safe_save
from tokengraft.checkpoint.safe_pickle import UnsafeCheckpointError, safe_load
from tokengraft.errors import TokengraftError

V, H = 40, 4
KINDS = ("os_system", "resolve_name", "getattr_chain", "operator_chain", "partial", "logging_config")


class Call:
    """Unpickles as ``func(*args)``: ``func`` may itself be a Call (a chain)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *a):  # pickle requires the reduce callable to be callable
        raise AssertionError("never called in the test process")


def payload(kind: str, marker: Path):
    cmd = f"touch {marker}"
    os_module = Call(pkgutil.resolve_name, "os")
    return {
        "os_system": lambda: Call(os.system, cmd),
        "resolve_name": lambda: Call(Call(pkgutil.resolve_name, "os:system"), cmd),
        "getattr_chain": lambda: Call(Call(builtins.getattr, os_module, "system"), cmd),
        "operator_chain": lambda: Call(Call(operator.methodcaller, "system", cmd), os_module),
        "partial": lambda: Call(Call(functools.partial, os.system, cmd)),
        "logging_config": lambda: Call(logging.config.dictConfig, {
            "version": 1, "handlers": {"h": {"()": "builtins.open", "file": str(marker), "mode": "w"}}}),
    }[kind]()


def bundle(markers: Path) -> dict:
    markers.mkdir(parents=True, exist_ok=True)  # a payload that runs must be able to leave its marker
    return {k: payload(k, markers / k) for k in KINDS}


def fired(markers: Path) -> list[str]:
    return sorted(p.name for p in markers.iterdir()) if markers.exists() else []


LOAD_ALL = ("import sys, torch\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        torch.load(p, weights_only=False)\n"
            "    except Exception as e:\n"
            "        print('failed', p, type(e).__name__)\n")


def load_freely(files: list[Path]) -> None:
    if files:
        subprocess.run([sys.executable, "-c", LOAD_ALL, *map(str, files)], capture_output=True, text=True,
                       timeout=300, check=False, env={**os.environ, "DS_ACCELERATOR": "cpu"})


def pickles_in(folder: Path) -> list[Path]:
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return [p for p in paths if looks_pickled(p)]


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "tokengraft", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def _state(prefix: str = "") -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"{prefix}model.embed_tokens.weight": torch.randn(V, H, generator=g),
            f"{prefix}model.norm.weight": torch.ones(H),
            f"{prefix}lm_head.weight": torch.randn(V, H, generator=g)}


def _zero_folder(folder: Path, stage: int, evil: dict) -> None:
    """A DeepSpeed folder as XTuner writes it (mp_rank_00_model_states.pt), 2 ranks; ZeRO-3: the
    module is empty and the weights live in the ranks' fp32 flat groups; payloads in the partitions."""
    import math

    folder.mkdir(parents=True)
    sd = _state("llm.")
    shapes = [{k: v.shape for k, v in sd.items()}]
    module = {k: (torch.empty(0) if stage == 3 else v) for k, v in sd.items()}
    torch.save({"module": module, "param_shapes": shapes, "buffer_names": [], "shared_params": {},
                "frozen_param_shapes": None, "ds_version": "0.16.2"}, folder / "mp_rank_00_model_states.pt")
    for r in range(2):
        if stage == 3:
            groups = [torch.cat([torch.cat([v.reshape(-1), v.new_zeros(math.ceil(v.numel() / 2) * 2 - v.numel())])
                                 .view(2, -1)[r] for v in sd.values()])]
            osd = {"zero_stage": 3, "partition_count": 2, "fp32_flat_groups": groups}
        else:
            flat = torch.cat([v.reshape(-1) for v in sd.values()])
            osd = {"zero_stage": 2, "partition_count": [2], "single_partition_of_fp32_groups": [flat.chunk(2)[r]]}
        torch.save({"optimizer_state_dict": {**osd, "evil": evil}}, folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


@pytest.fixture(scope="module")
def world(smollm2_dir, tmp_path_factory):
    """One of every format, each carrying every payload; a target tokenizer; a tiny LLM + CLIP."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("no_code")
    markers = root / "markers"
    evil = bundle(markers)
    vocab = words(V)
    tgt = root / "tgt"
    word_tokenizer(vocab + ["<box>"]).save_pretrained(tgt)
    llm = root / "llm"
    word_tokenizer(vocab).save_pretrained(llm)
    (llm / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": H,
        "intermediate_size": 8, "num_hidden_layers": 0, "num_attention_heads": 1, "num_key_value_heads": 1,
        "tie_word_embeddings": False, "rope_theta": 10000.0}))
    save_file(_state(), llm / "model.safetensors", metadata={"format": "pt"})
    CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=16, patch_size=8)).save_pretrained(root / "clip")
    f = {}
    f["pth"] = root / "state.pth"
    torch.save({**_state(), "evil": evil}, f["pth"])
    f["bin_folder"] = root / "bin_folder"
    word_tokenizer(vocab).save_pretrained(f["bin_folder"])
    torch.save({**_state(), "evil": evil}, f["bin_folder"] / "pytorch_model.bin")
    f["mmengine"] = root / "iter_5.pth"
    torch.save({"meta": {"iter": 5}, "state_dict": _state("llm."), "message_hub": {"runtime_info": evil},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1, 2]}]}}, f["mmengine"])
    f["zero2"], f["zero3"] = root / "zero2" / "iter_5.pth", root / "zero3" / "iter_5.pth"
    _zero_folder(f["zero2"], 2, evil)
    _zero_folder(f["zero3"], 3, evil)
    f["peft_bin"] = root / "adapter"
    f["peft_bin"].mkdir()
    (f["peft_bin"] / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lm_head"], "base_model_name_or_path": str(llm)}))
    torch.save({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, H),
                "base_model.model.lm_head.lora_B.weight": torch.zeros(V, 2), "evil": evil},
               f["peft_bin"] / "adapter_model.bin")
    for name in ("optimizer_pt", "rng_state"):
        d = f[name] = root / name / "checkpoint-4"
        d.mkdir(parents=True)
        word_tokenizer(vocab).save_pretrained(d)
        save_file(_state(), d / "model.safetensors", metadata={"format": "pt"})
        torch.save({"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1, 2]}],
                    **({"evil": evil} if name == "optimizer_pt" else {})}, d / "optimizer.pt")
        torch.save({"last_epoch": 4}, d / "scheduler.pt")
    torch.save({"python": evil, "cpu": torch.ones(2)}, f["rng_state"] / "rng_state.pth")
    return root, markers, f, tgt, llm


def test_every_payload_is_live(world, tmp_path):
    """The control: torch.load(weights_only=False) of each planted payload creates its marker."""
    markers = tmp_path / "m"
    markers.mkdir()
    files = []
    for k in KINDS:
        torch.save({"w": torch.ones(1), "x": payload(k, markers / k)}, tmp_path / f"{k}.pt")
        files.append(tmp_path / f"{k}.pt")
    load_freely(files)
    assert fired(markers) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_each_payload_is_read_inert_and_refused_on_write_back(tmp_path, kind):
    markers = tmp_path / "m"
    markers.mkdir()
    torch.save({"w": torch.ones(2), "x": payload(kind, markers / kind)}, tmp_path / "in.pt")
    obj = safe_load(tmp_path / "in.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to write back \S+") as e:
        safe_save(obj, tmp_path / "out.pt")
    assert "\n" not in str(e.value) and not (tmp_path / "out.pt").exists() and fired(markers) == []


CONVERT = ["pth", "bin_folder", "mmengine", "zero2", "zero3", "peft_bin", "optimizer_pt", "rng_state"]


@pytest.mark.parametrize("fmt", CONVERT)
def test_convert_runs_nothing_and_writes_nothing_that_runs(world, tmp_path, fmt):
    from tokengraft.checkpoint.convert import convert

    _, markers, f, tgt, llm = world
    out = tmp_path / "out"
    try:
        rep = convert(f[fmt], tgt, out, source_tokenizer=llm, log=lambda *a: None)
    except TokengraftError as e:  # refused: one line, naming the global, nothing written
        assert "\n" not in str(e) and ("names" in str(e) or "refusing to write back" in str(e)), e
        assert not out.exists()
    else:
        assert fmt in ("zero3", "rng_state"), f"{fmt} converted with a payload inside"
        if fmt == "rng_state":  # the Trainer's other pickle is left out, saying which global
            assert not (out / "rng_state.pth").exists() and (out / "scheduler.pt").is_file()
            assert any("rng_state.pth left out of the output" in n for n in rep.notes)
        load_freely(pickles_in(out))
    assert fired(markers) == []


@pytest.mark.parametrize("fmt,cmd", [
    ("zero3", "convert"), ("zero3", "doctor-checkpoint"), ("zero2", "doctor-checkpoint"),
    ("mmengine", "doctor-checkpoint"), ("pth", "doctor-checkpoint"), ("bin_folder", "doctor"),
    ("zero3", "import-xtuner"), ("zero2", "import-xtuner"), ("mmengine", "import-xtuner"),
])
def test_commands_run_nothing(world, tmp_path, fmt, cmd):
    root, markers, f, tgt, llm = world
    out = tmp_path / "out"
    if cmd == "convert":
        r = cli("convert", f[fmt], "--to", tgt, "-o", out, "--source-tokenizer", llm)
    elif cmd == "doctor":
        r = cli("doctor", f[fmt])
    elif cmd == "doctor-checkpoint":
        r = cli("doctor", "--checkpoint", f[fmt], "--model", llm)
    else:
        r = cli("import-xtuner", f[fmt], "--llm", llm, "--visual-encoder", root / "clip", "-o", out)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode in (0, 1, 2), r.stderr[-2000:]
    if r.returncode == 2:
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    if out.exists():
        load_freely(pickles_in(out))
    assert fired(markers) == []


@pytest.fixture(scope="module")
def run_dir(smollm2_dir, world, tmp_path_factory):
    """A real 2-step rows run (tiny Llama, SmolLM2's tokenizer); its checkpoint-2's optimizer.pt and
    rng_state.pth then carry every payload (re-saved from the real files, which stay complete)."""
    from transformers import AutoTokenizer

    from conftest import tiny_llama

    _, markers, _, _, _ = world
    root = tmp_path_factory.mktemp("run")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tiny_llama(tok, tied=True, hidden=16).save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    recs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Where is {i}?"},
                                              {"from": "gpt", "value": f"<box>{i}</box>"}]} for i in range(4)]
    (root / "train.json").write_text(json.dumps(recs))
    r = cli("train", "--model", root / "m", "--data", root / "train.json", "--output-dir", root / "run",
            "--tokens", "<box>,</box>", "--init", "mean", "--template", "chatml", "--batch-size", "2",
            "--max-length", "48", "--max-steps", "2", "--save-steps", "2", "--no-progress", "--no-tensorboard")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = root / "run" / "checkpoint-2"
    for name in ("optimizer.pt", "rng_state.pth"):
        obj = torch.load(ck / name, weights_only=False)  # our own file: trusted here
        torch.save({**obj, "evil": bundle(markers)}, ck / name)
    return root


def test_train_resume_and_export_run_nothing(world, run_dir, tmp_path):
    _, markers, _, _, _ = world
    r = cli("train", "--model", run_dir / "m", "--data", run_dir / "train.json", "--output-dir", run_dir / "run",
            "--tokens", "<box>,</box>", "--init", "mean", "--template", "chatml", "--batch-size", "2",
            "--max-length", "48", "--max-steps", "3", "--resume", "--no-progress", "--no-tensorboard")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "not known to be inert" in lines[0], r.stderr[-2000:]
    assert not (run_dir / "run" / "checkpoint-3").exists()
    out = tmp_path / "hf"
    r = cli("export", run_dir / "run", "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    load_freely(pickles_in(out))
    assert fired(markers) == []
