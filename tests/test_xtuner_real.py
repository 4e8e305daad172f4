"""Real XTuner 0.2.0 as a test client, with tokengraft installed in XTuner's own environment.

The one-environment recipe (docs/xtuner-continue.md), end to end: XTuner trains on the base LLM,
``tokengraft add`` runs *in XTuner's venv* (transformers 4.48), XTuner's ``llm`` and ``tokenizer``
point at tokengraft's output folder, ``tokengraft convert`` (also in XTuner's venv) carries the
checkpoint to the new vocabulary, and XTuner continues from it (pretrained_pth, Runner resume,
DeepSpeed folder, ``xtuner_helper``).

Two roles in one file:

* under pytest (project venv, transformers 5): builds/locates the cached XTuner venv
  (tests/xtuner_env.py), writes the base LLM, and runs the stages below and the tokengraft CLI in
  that venv through subprocesses;
* as a script inside the XTuner venv (transformers 4.48, mmengine 0.10.6, torch 2.14.1):
  ``python tests/test_xtuner_real.py STAGE WORKDIR`` runs one stage with XTuner's own
  ``LLaVAModel``, ``LLaVADataset``, ``default_collate_fn`` and mmengine's ``Runner``, and prints
  one JSON line of facts for the test to check.

The base LLM is SmolLM2's real config scaled down (random weights, its rope_theta 100,000, tied)
with the *real* SmolLM2 tokenizer (49,152 rows), written by tokengraft's own writer as transformers
5 saves it; so the vocabulary and the rope are real and a run takes seconds. The vision tower is a
tiny random CLIP. Module top level imports only the standard library: both interpreters import it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

NEW_TOKENS = ["<box>", "</box>", "<ref>"]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ==================================================================== XTuner-venv side (stages)

def _xtuner_setup():
    """What XTuner 0.2.0 needs on CPU with torch >= 2.6 (facts in /work/shared FORMATS.md)."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mmengine's torch.load of its own files
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not hasattr(torch.cpu, "is_bf16_supported"):  # LLaVAModel asks the device; CPU torch lacks it
        torch.cpu.is_bf16_supported = lambda: False
    torch.set_num_threads(1)


def stage_prepare(work: Path):
    """A tiny CLIP tower, 4 images and LLaVA-format data; the base LLM as XTuner reads it."""
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModel(vcfg).save_pretrained(work / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(work / "clip")

    (work / "images").mkdir(exist_ok=True)
    data = []
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 255 - 60 * i, 90)).save(work / "images" / f"{i}.png")
        data.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhere is the square?"},
            {"from": "gpt", "value": f"<ref>square</ref><box>({i},{i}),({i + 5},{i + 5})</box>"}]})
    (work / "data.json").write_text(json.dumps(data))
    return {"old_rows": len(AutoTokenizer.from_pretrained(work / "old_llm")),
            "rope_theta": AutoConfig.from_pretrained(work / "old_llm").rope_theta}


def stage_tokens(work: Path):
    """tokengraft's output folder as XTuner's transformers reads it: config, tokenizer, the new tokens."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "new_llm")
    cfg = AutoConfig.from_pretrained(work / "new_llm")
    return {"rows": cfg.vocab_size, "tokens": len(tok), "rope_theta": cfg.rope_theta,
            "tied": cfg.tie_word_embeddings, "tokenizer_class": type(tok).__name__,
            "ids": {t: tok(t, add_special_tokens=False)["input_ids"] for t in NEW_TOKENS},
            "special": sorted(t for t in NEW_TOKENS if t in tok.all_special_tokens)}


def _model_cfg(work: Path, llm_dir: str, pretrained_pth=None, model_type=None):
    import torch
    from mmengine.config import ConfigDict
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model import LLaVAModel

    # XTuner reads its configs by attribute (cfg.pretrained_model_name_or_path): a ConfigDict
    return ConfigDict(type=model_type or LLaVAModel, freeze_llm=False, freeze_visual_encoder=True,
                use_activation_checkpointing=False, pretrained_pth=pretrained_pth,
                llm=dict(type=AutoModelForCausalLM.from_pretrained,
                         pretrained_model_name_or_path=str(work / llm_dir), torch_dtype=torch.float32),
                visual_encoder=dict(type=CLIPVisionModel.from_pretrained,
                                    pretrained_model_name_or_path=str(work / "clip")))


def _runner(work: Path, run_dir: str, llm_dir: str, max_iters: int, model=None, **kw):
    from mmengine.dataset import DefaultSampler
    from mmengine.hooks import CheckpointHook, LoggerHook
    from mmengine.optim import ConstantLR, OptimWrapper
    from mmengine.runner import IterBasedTrainLoop, Runner
    from torch.optim import AdamW
    from transformers import AutoTokenizer, CLIPImageProcessor
    from xtuner.dataset import LLaVADataset
    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
    from xtuner.utils import PROMPT_TEMPLATE

    dataset = dict(type=LLaVADataset, data_path=str(work / "data.json"), image_folder=str(work / "images"),
                   tokenizer=dict(type=AutoTokenizer.from_pretrained,
                                  pretrained_model_name_or_path=str(work / llm_dir), padding_side="right"),
                   image_processor=dict(type=CLIPImageProcessor.from_pretrained,
                                        pretrained_model_name_or_path=str(work / "clip")),
                   dataset_map_fn=llava_map_fn,
                   template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.vicuna),
                   max_length=128, pad_image_to_square=False)
    return Runner(
        model=model or _model_cfg(work, llm_dir), work_dir=str(work / run_dir),
        train_dataloader=dict(batch_size=2, num_workers=0, dataset=dataset,
                              sampler=dict(type=DefaultSampler, shuffle=False),
                              collate_fn=dict(type=default_collate_fn)),
        # AmpOptimWrapper (XTuner's default) is GPU-only: the plain wrapper on CPU
        optim_wrapper=dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr=1e-2, weight_decay=0.0)),
        param_scheduler=[dict(type=ConstantLR, factor=1.0, by_epoch=False)],
        train_cfg=dict(type=IterBasedTrainLoop, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type=CheckpointHook, interval=2, by_epoch=False, max_keep_ckpts=-1),
                           logger=dict(type=LoggerHook, interval=1)),
        randomness=dict(seed=0), log_level="WARNING", **kw)


def _vocab(tokenizer_dir: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok.convert_ids_to_tokens(list(range(len(tok))))


def _rows_match(model, work: Path, rounded=None) -> dict:
    """Do the model's rows equal the *original* (old-vocabulary) checkpoint's rows for the same
    token strings? Compared by string, so it checks the conversion and the load together."""
    import torch

    ck = torch.load(work / "run_old" / "iter_4.pth", map_location="cpu", weights_only=False)["state_dict"]
    old, new = _vocab(work / "old_llm"), _vocab(work / "new_llm")
    new_id = {t: i for i, t in enumerate(new)}
    ck_rows = ck["llm.model.embed_tokens.weight"]
    if rounded is not None:  # the loader went through this dtype: compare with the rows rounded alike
        ck_rows = ck_rows.to(rounded).float()
    emb = model.llm.get_input_embeddings().weight.detach()
    head = model.llm.get_output_embeddings().weight.detach()
    mi = torch.tensor([new_id[t] for t in old])
    equal = int((emb[mi] == ck_rows).all(dim=1).sum())
    fresh = sorted(set(range(emb.shape[0])) - set(mi.tolist()))
    return {"rows_equal": equal, "old_rows": len(old), "tied": emb.data_ptr() == head.data_ptr(),
            "model_rows": emb.shape[0], "new_rows_finite": bool(torch.isfinite(emb[fresh]).all())}


def _ckpt_rows(path: Path) -> int:
    import torch

    if path.is_dir():  # DeepSpeed: the model states' `module` (XTuner itself reads the fp32 partitions)
        sd = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return sd["llm.model.embed_tokens.weight"].shape[0]


def stage_deepspeed(work: Path):
    """Lay the trained iter_4.pth out as XTuner's DeepSpeed ZeRO-2 folder (world size 1), the way
    DeepSpeed saves it: model states (bf16 `module`, `param_shapes` in parameter order, the tied
    head as a shared param) and one optimizer partition holding the flat fp32 master weights.
    Then check XTuner's own pretrained_pth reads it back at the old vocabulary."""
    import collections

    import torch
    from mmengine.registry import MODELS

    sd = torch.load(work / "run_old" / "iter_4.pth", map_location="cpu", weights_only=False)["state_dict"]
    shared = {"llm.lm_head.weight": "llm.model.embed_tokens.weight"}
    order = [k for k in sd if k not in shared]
    flat = torch.cat([sd[k].float().reshape(-1) for k in order])
    pad = -flat.numel() % 2  # ZeRO-2 pads the flat group to 2 * world size; the fp32 master is saved unpadded
    g = torch.Generator().manual_seed(0)
    moments = {"step": torch.tensor(4.0), "exp_avg": torch.randn(flat.numel() + pad, generator=g),
               "exp_avg_sq": torch.rand(flat.numel() + pad, generator=g)}  # the partition's size, padding included
    ds = work / "ds_iter_4.pth"
    ds.mkdir()
    torch.save({"module": {k: v.to(torch.bfloat16) for k, v in sd.items()}, "buffer_names": [],
                "param_shapes": [collections.OrderedDict((k, sd[k].shape) for k in order)],
                "frozen_param_shapes": None, "frozen_param_fragments": None, "shared_params": shared,
                "ds_version": "0.16.2", "global_steps": 4, "iter": 4},
               ds / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": [1], "loss_scaler": None,
                                         "single_partition_of_fp32_groups": [flat], "group_paddings": [pad],
                                         "base_optimizer_state": {"state": {0: moments},
                                                                  "param_groups": [{"lr": 2e-4, "params": [0]}]}},
                "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.16.2"},
               ds / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    model = MODELS.build(_model_cfg(work, "old_llm", pretrained_pth=str(ds)))
    emb = model.llm.get_input_embeddings().weight.detach()
    fp16 = sd["llm.model.embed_tokens.weight"].half().float()  # XTuner rebuilds DeepSpeed weights in fp16
    return {"rows_equal": int((emb == fp16).all(dim=1).sum()),
            "tied": emb.data_ptr() == model.llm.get_output_embeddings().weight.data_ptr()}


def stage_train(work: Path):
    runner = _runner(work, "run_old", "old_llm", max_iters=4)
    runner.train()
    ck = work / "run_old" / "iter_4.pth"
    import torch

    obj = torch.load(ck, map_location="cpu", weights_only=False)
    sd = obj["state_dict"]
    return {"exists": ck.is_file(), "top": sorted(obj), "iter": obj["meta"]["iter"],
            "embed": list(sd["llm.model.embed_tokens.weight"].shape),
            "tied_saved_twice": "llm.lm_head.weight" in sd and torch.equal(sd["llm.lm_head.weight"],
                                                                            sd["llm.model.embed_tokens.weight"]),
            "hub_types": sorted({type(v).__module__ + "." + type(v).__name__
                                 for v in obj["message_hub"]["log_scalars"].values()})}


def stage_load(work: Path, ckpt: str):
    """LLaVAModel(pretrained_pth=ckpt) at the new vocabulary: loads, or the error's first line."""
    import torch
    from mmengine.registry import MODELS

    try:
        model = MODELS.build(_model_cfg(work, "new_llm", pretrained_pth=str(work / ckpt)))
    except Exception as e:  # noqa: BLE001 - the error is the fact we report
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # what Runner(load_from=...) does with the same file: mmengine's non-strict load only warns
        from mmengine.runner import load_checkpoint

        facts = {"loaded": False, "error": f"{type(e).__name__}: {' '.join(lines[:2])}"}
        if (work / ckpt).is_file():
            model = MODELS.build(_model_cfg(work, "new_llm"))
            load_checkpoint(model, str(work / ckpt), map_location="cpu", strict=False)
            facts["load_from"] = _rows_match(model, work)
        return facts
    # XTuner rebuilds a DeepSpeed folder's weights in fp16 (zero_to_any_dtype.DEFAULT_DTYPE)
    rounded = torch.float16 if (work / ckpt).is_dir() else None
    return {"loaded": True, "ckpt_rows": _ckpt_rows(work / ckpt), **_rows_match(model, work, rounded)}


class _Probe:
    """A hook recording, just before training starts, the iteration and the rows facts."""

    def __init__(self, work, ckpt):
        self.work, self.ckpt, self.facts = work, ckpt, {}
        manifest = json.loads((work / "new_llm" / "tokengraft.json").read_text())
        self.new_ids = [t["id"] for t in manifest["tokens"]]

    def hook(self):
        from mmengine.hooks import Hook

        probe = self

        class ProbeHook(Hook):
            priority = "VERY_LOW"

            def before_train(self, runner):
                probe.facts.update(start_iter=runner.iter, ckpt_rows=_ckpt_rows(probe.work / probe.ckpt),
                                   rope_theta=runner.model.llm.config.rope_theta,
                                   **_rows_match(runner.model, probe.work))
                # what XTuner's own data pipeline made of the answer "<ref>square</ref><box>(0,0),(5,5)</box>"
                ids = list(runner.train_dataloader.dataset.text_data[0]["input_ids"])
                probe.facts["data_ids"] = {str(i): ids.count(i) for i in probe.new_ids}
                # the optimizer state of the (tied) vocabulary parameter, as loaded
                emb = runner.model.llm.get_input_embeddings().weight
                st = runner.optim_wrapper.optimizer.state.get(emb, {})
                if "exp_avg" in st:
                    old = probe.facts["old_rows"]
                    probe.facts.update(emb_step=float(st["step"]), moment_rows=st["exp_avg"].shape[0],
                                       moment_new_rows_zero=bool((st["exp_avg"][old:] == 0).all()),
                                       moment_old_rows_nonzero=int((st["exp_avg"][:old] != 0).any(dim=1).sum()))

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                import math

                probe.facts.setdefault("losses", []).append(float(outputs["loss"]))
                probe.facts["finite"] = all(math.isfinite(x) for x in probe.facts["losses"])
        return ProbeHook()


def stage_continue(work: Path, ckpt: str, run_dir: str, resume: bool, helper: bool = False):
    """Continue training at the new vocabulary: from pretrained_pth (a fresh run) or Runner resume."""
    probe = _Probe(work, ckpt)
    if resume:
        runner = _runner(work, run_dir, "new_llm", max_iters=6, load_from=str(work / ckpt), resume=True,
                         custom_hooks=[probe.hook()])
    elif helper:
        from tokengraft.xtuner_helper import llava_from_old_checkpoint

        model = dict(type=llava_from_old_checkpoint, model=_model_cfg(work, "new_llm"),
                     checkpoint=str(work / ckpt), old_tokenizer=str(work / "old_llm"),
                     new_tokenizer=str(work / "new_llm"))
        runner = _runner(work, run_dir, "new_llm", max_iters=2, model=model, custom_hooks=[probe.hook()])
    else:
        runner = _runner(work, run_dir, "new_llm", max_iters=2,
                         model=_model_cfg(work, "new_llm", pretrained_pth=str(work / ckpt)),
                         custom_hooks=[probe.hook()])
    runner.train()
    out = sorted(p.name for p in (work / run_dir).glob("iter_*.pth"))
    return {**probe.facts, "end_iter": runner.iter, "saved": out}


def _main(argv):
    _xtuner_setup()
    stage, work = argv[0], Path(argv[1])
    fn = {"prepare": stage_prepare, "tokens": stage_tokens, "train": stage_train, "load": stage_load,
          "continue": stage_continue, "deepspeed": stage_deepspeed}[stage]
    args = [a == "true" if a in ("true", "false") else a for a in argv[2:]]
    facts = fn(work, *args)
    print("FACTS " + json.dumps(facts))


# ==================================================================== pytest side (project venv)

if __name__ != "__main__":
    import subprocess

    import pytest

    slow = pytest.mark.slow  # the real-XTuner tests (a cached venv, minutes); the unit tests below are fast

    @pytest.fixture(scope="module")
    def xtuner_python():
        sys.path.insert(0, str(HERE))
        import xtuner_env

        if not xtuner_env.is_ready() and os.environ.get("TOKENGRAFT_SKIP_XTUNER_BUILD"):
            pytest.skip("the XTuner venv is not built and TOKENGRAFT_SKIP_XTUNER_BUILD is set")
        try:
            return xtuner_env.ensure()
        except xtuner_env.IndexUnreachable as e:
            pytest.skip(f"package index unreachable, cannot build the XTuner 0.2.0 venv: {str(e)[:200]}")

    def _env(py):
        # tokengraft from this source tree, in XTuner's interpreter (as `pip install tokengraft` there would be)
        return dict(os.environ, PYTHONPATH=str(ROOT / "src"))

    def _stage(py, *args, timeout=600):
        r = subprocess.run([str(py), str(Path(__file__).resolve()), *map(str, args)], capture_output=True,
                           text=True, timeout=timeout, env=_env(py), cwd=str(args[1]))
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("FACTS ")]
        assert r.returncode == 0 and lines, f"stage {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
        return json.loads(lines[-1][6:])

    def _tokengraft(py, *args):
        """The tokengraft CLI run by XTuner's python (transformers 4.48, mmengine, torch 2.14.1)."""
        return subprocess.run([str(py), "-m", "tokengraft", *map(str, args)], capture_output=True, text=True,
                              timeout=600, env=_env(py))

    def _tiny_smollm2(smollm2_dir, out, write):
        """SmolLM2's real config scaled down (random weights; its rope and tie as they are) and its
        real tokenizer, handed to ``write(out, model, tokenizer)``."""
        import torch
        from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

        cfg = AutoConfig.from_pretrained(smollm2_dir)
        cfg.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, max_position_embeddings=512))
        torch.manual_seed(0)
        write(out, LlamaForCausalLM(cfg), AutoTokenizer.from_pretrained(smollm2_dir))
        return out

    @pytest.fixture(scope="module")
    def trained(xtuner_python, tmp_path_factory, smollm2_dir):
        """XTuner trained 4 iterations on the base LLM; then `tokengraft add` in XTuner's venv."""
        from tokengraft.io import save_folder

        work = tmp_path_factory.mktemp("xtuner")
        _tiny_smollm2(smollm2_dir, work / "old_llm", lambda out, m, t: save_folder(out, m, t, None))
        prep = _stage(xtuner_python, "prepare", work)
        facts = _stage(xtuner_python, "train", work)
        r = _tokengraft(xtuner_python, "add", work / "old_llm", "--tokens", ",".join(NEW_TOKENS), "-o", work / "new_llm")
        assert r.returncode == 0, r.stderr[-3000:]
        prep["add_stdout"] = r.stdout
        prep.update(new_rows=json.loads((work / "new_llm" / "tokengraft.json").read_text())["rows"])
        return xtuner_python, work, prep, facts

    @slow
    def test_real_xtuner_checkpoint_layout(trained):
        _, work, prep, facts = trained
        assert facts["exists"] and facts["iter"] == 4
        assert facts["top"] == ["message_hub", "meta", "optimizer", "param_schedulers", "state_dict"]
        assert facts["embed"] == [prep["old_rows"], 32] and facts["tied_saved_twice"]
        assert facts["hub_types"] == ["mmengine.logging.history_buffer.HistoryBuffer"]

    @slow
    def test_tokengraft_add_in_xtuner_env_writes_what_xtuner_reads(trained):
        py, work, prep, _ = trained
        assert prep["old_rows"] == 49152 and prep["rope_theta"] == 100000.0  # SmolLM2's, as 4.48 reads the base
        manifest = json.loads((work / "new_llm" / "tokengraft.json").read_text())
        want = {t["content"]: t["id"] for t in manifest["tokens"]}
        assert list(want) == NEW_TOKENS, manifest
        written_by = json.loads((work / "new_llm" / "config.json").read_text())["transformers_version"]
        assert written_by == "4.48.0", written_by  # tokengraft ran in XTuner's environment
        facts = _stage(py, "tokens", work)
        assert facts["ids"] == {t: [i] for t, i in want.items()}, facts  # each new token one id, the manifest's
        assert facts["special"] == sorted(NEW_TOKENS) and facts["tied"], facts
        assert facts["rope_theta"] == 100000.0 and facts["rows"] == prep["new_rows"] == 49216, facts
        assert facts["tokens"] == 49152 + len(NEW_TOKENS), facts

    @slow
    def test_unconverted_checkpoint_does_not_load(trained):
        py, work, prep, _ = trained
        facts = _stage(py, "load", work, "run_old/iter_4.pth")
        assert not facts["loaded"] and "size mismatch" in facts["error"], facts
        assert f"[{prep['old_rows']}, 32]" in facts["error"] or str(prep["old_rows"]) in facts["error"], facts
        # Runner(load_from=...) instead "succeeds" and keeps none of the trained rows (silent loss)
        assert facts["load_from"]["rows_equal"] == 0, facts

    @pytest.fixture(scope="module")
    def converted(trained):
        """`tokengraft convert` of XTuner's iter_4.pth, run in XTuner's venv."""
        py, work, prep, _ = trained
        out = work / "iter_4_new.pth"
        r = _tokengraft(py, "convert", work / "run_old" / "iter_4.pth", "--to", work / "new_llm", "-o", out,
                        "--source-tokenizer", work / "old_llm")
        assert r.returncode == 0, r.stderr[-3000:]
        return py, work, prep, out.name, r

    @slow
    def test_tokengraft_convert_writes_a_pth_file(converted):
        from tokengraft.checkpoint.safe_pickle import safe_load

        _, work, prep, ckpt, r = converted
        # an mmengine .pth in, one .pth of the same structure out (XTuner's pretrained_pth and
        # Runner resume read a file; a folder would be taken for a DeepSpeed checkpoint)
        assert (work / ckpt).is_file(), f"convert wrote {sorted(p.name for p in (work / ckpt).iterdir())}, not a file"
        old, new = safe_load(work / "run_old" / "iter_4.pth"), safe_load(work / ckpt)
        assert sorted(new) == sorted(old) and list(new["state_dict"]) == list(old["state_dict"])
        assert new["state_dict"]["llm.model.embed_tokens.weight"].shape[0] == prep["new_rows"]
        assert "<box> (id 49152)" in r.stdout, r.stdout

    @slow
    def test_converted_checkpoint_loads_via_pretrained_pth_and_trains(converted):
        py, work, prep, ckpt, _ = converted
        facts = _stage(py, "continue", work, ckpt, "run_pretrained", "false")
        assert facts["model_rows"] == prep["new_rows"] == facts["ckpt_rows"] and facts["tied"], facts
        # every old token's row equals the original checkpoint's row for the same string
        assert facts["rows_equal"] == prep["old_rows"] and facts["new_rows_finite"], facts
        assert facts["start_iter"] == 0 and "emb_step" not in facts, facts  # a fresh run, fresh optimizer
        assert facts["end_iter"] == 2 and facts["finite"] and len(facts["losses"]) == 2, facts
        # XTuner's own data pipeline, on tokengraft's tokenizer: each new token once, as one id
        assert facts["data_ids"] == {"49152": 1, "49153": 1, "49154": 1}, facts
        assert facts["rope_theta"] == 100000.0, facts

    @slow
    def test_converted_checkpoint_resumes_in_the_runner(converted):
        py, work, prep, ckpt, _ = converted
        facts = _stage(py, "continue", work, ckpt, "run_resumed", "true")
        # the iteration counter continues (4 -> 6: only iter_6 written), old rows as trained
        assert facts["start_iter"] == 4 and facts["end_iter"] == 6 and facts["saved"] == ["iter_6.pth"], facts
        assert facts["rows_equal"] == prep["old_rows"] and facts["finite"] and len(facts["losses"]) == 2, facts
        # Adam moments came along: step 4, rows at the new vocabulary, zero for the new tokens only
        assert facts["emb_step"] == 4.0 and facts["moment_rows"] == prep["new_rows"], facts
        assert facts["moment_new_rows_zero"] and facts["moment_old_rows_nonzero"] > 0, facts

    @slow
    def test_pip_install_into_xtuner_env_keeps_its_pins(xtuner_python, tmp_path):
        """`pip install tokengraft` in XTuner's environment adds packages but never moves
        transformers, torch, mmengine (or tokenizers, which transformers 4.48 pins)."""
        report = tmp_path / "report.json"
        r = subprocess.run([str(xtuner_python), "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                            str(report), str(ROOT)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            sys.path.insert(0, str(HERE))
            import xtuner_env

            if xtuner_env._looks_offline(r.stdout + r.stderr):
                pytest.skip(f"package index unreachable: {r.stderr[-200:]}")
        assert r.returncode == 0, r.stderr[-3000:]
        would = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
        assert "tokengraft" in would, would
        moved = sorted(set(would) & {"transformers", "torch", "mmengine", "tokenizers", "torchvision", "xtuner"})
        assert not moved, f"pip would replace {moved} in XTuner's environment: {would}"

    @slow
    def test_import_xtuner_and_export_verify_in_xtuner_env(trained):
        """The real iter_4.pth imported as a transformers Llava under transformers 4.48, then
        export --verify there: a fresh 4.48 process reloads it (processor, image, logits)."""
        py, work, _, _ = trained
        r = _tokengraft(py, "import-xtuner", work / "run_old" / "iter_4.pth", "--llm", work / "old_llm",
                        "--visual-encoder", work / "clip", "--tokens", ",".join(NEW_TOKENS), "-o", work / "llava")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "<box>=49152, </box>=49153, <ref>=49154" in r.stdout and "<image> id 49155" in r.stdout, r.stdout
        cfg = json.loads((work / "llava" / "config.json").read_text())
        assert cfg["image_token_index"] == 49155 and cfg["transformers_version"] == "4.48.0", cfg
        r = _tokengraft(py, "export", work / "llava", "-o", work / "llava_export", "--verify")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "verify: OK" in r.stdout and "4 new token(s) single ids" in r.stdout, r.stdout

    @slow
    def test_add_in_xtuner_env_refuses_a_folder_only_transformers_5_reads(trained, smollm2_dir):
        """A folder transformers 5 wrote as it is (rope only in rope_parameters, tokenizer class
        TokenizersBackend): under 4.48 one line naming the misreading and the fix; nothing written."""
        py, work, _, _ = trained

        def plain_save(out, model, tok):
            model.save_pretrained(out)
            tok.save_pretrained(out)

        src = _tiny_smollm2(smollm2_dir, work / "saved_by_5", plain_save)
        r = _tokengraft(py, "add", src, "--tokens", "<box>", "-o", work / "never")
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
        assert "rope_theta 10000 (its default) instead of 100000.0" in err[0] and "tokengraft export" in err[0], err
        assert not (work / "never").exists()

    @slow
    def test_xtuner_helper_loads_an_unconverted_checkpoint_by_token_identity(trained):
        py, work, prep, _ = trained
        facts = _stage(py, "continue", work, "run_old/iter_4.pth", "run_helper", "false", "true")
        assert facts["model_rows"] == prep["new_rows"] and facts["ckpt_rows"] == prep["old_rows"], facts
        assert facts["rows_equal"] == prep["old_rows"] and facts["tied"] and facts["finite"], facts

    @slow
    def test_converted_deepspeed_folder_loads_via_pretrained_pth(trained):
        py, work, prep, _ = trained
        facts = _stage(py, "deepspeed", work)  # the hand-laid folder is what XTuner reads: all rows back
        assert facts["rows_equal"] == prep["old_rows"] and facts["tied"], facts
        out = work / "ds_iter_4_new.pth"
        r = _tokengraft(py, "convert", work / "ds_iter_4.pth", "--to", work / "new_llm", "-o", out,
                        "--source-tokenizer", work / "old_llm")
        assert r.returncode == 0 and out.is_dir(), r.stderr
        assert "ZeRO-1/2 optimizer partition(s) remapped exactly" in r.stdout, r.stdout
        # XTuner's guess_load_checkpoint rebuilds the weights from the optimizer partitions' fp32
        # master copy (single_partition_of_fp32_groups) and param_shapes only: the remapped
        # partitions are what it reads
        facts = _stage(py, "load", work, out.name)
        assert facts["loaded"] and facts["model_rows"] == prep["new_rows"], facts
        # XTuner rebuilds from the fp32 partition, cast to fp16: rows equal the fp16-rounded originals
        assert facts["rows_equal"] == prep["old_rows"] and facts["tied"], facts

    # ---------------------------------------------------------------- xtuner_helper, fast (torch only)

    def _json_tokenizer(folder, vocab, added=()):
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps({
            "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(vocab)}},
            "added_tokens": [{"id": len(vocab) + k, "content": t} for k, t in enumerate(added)]}))
        return folder

    def test_helper_moves_rows_by_string_and_keeps_new_rows(tmp_path):
        import torch

        from tokengraft.xtuner_helper import TokenIdentityError, load_by_token_identity, token_strings

        old = _json_tokenizer(tmp_path / "old", ["a", "b", "c", "d"])
        # the new vocabulary drops "b", moves "c"/"d" and adds two tokens
        new = _json_tokenizer(tmp_path / "new", ["a", "d", "c"], added=["<box>", "<ref>"])
        assert token_strings(new) == ["a", "d", "c", "<box>", "<ref>"]
        trained = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
        torch.save({"meta": {"iter": 4}, "state_dict": {"llm.embed.weight": trained, "llm.head.weight": trained,
                                                        "proj.weight": torch.ones(2, 2), "gone.weight": torch.ones(1)}},
                   tmp_path / "iter_4.pth")
        model = torch.nn.Module()
        model.llm = torch.nn.Module()
        model.llm.embed = torch.nn.Embedding(5, 3)
        model.llm.head = torch.nn.Linear(3, 5, bias=False)
        model.llm.head.weight = model.llm.embed.weight  # tied
        model.proj = torch.nn.Linear(2, 2, bias=False)
        fresh = model.llm.embed.weight.detach().clone()
        rep = load_by_token_identity(model, tmp_path / "iter_4.pth", old, new)
        w = model.llm.embed.weight.detach()
        assert torch.equal(w[0], trained[0]) and torch.equal(w[1], trained[3]) and torch.equal(w[2], trained[2])
        assert torch.equal(w[3:], fresh[3:])  # new tokens keep the rows the model was built with
        assert torch.equal(model.proj.weight, torch.ones(2, 2))
        assert rep["new_tokens"] == ["<box>", "<ref>"] and rep["dropped_tokens"] == ["b"]
        assert rep["ignored"] == ["gone.weight"] and set(rep["remapped"]) == {"llm.embed.weight", "llm.head.weight"}

        model.proj = torch.nn.Linear(3, 3, bias=False)  # a shape that is not a vocabulary change
        with pytest.raises(TokenIdentityError, match="proj.weight.*does not fit"):
            load_by_token_identity(model, tmp_path / "iter_4.pth", old, new)

    def test_helper_imports_nothing_but_torch():
        code = ("import sys; import tokengraft.xtuner_helper; "
                "bad = [m for m in ('transformers', 'mmengine', 'tokenizers') if m in sys.modules]; "
                "assert not bad, bad; print('ok')")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "ok" in r.stdout, r.stderr

    def test_xtuner_env_builds_atomically_once(tmp_path, monkeypatch):
        sys.path.insert(0, str(HERE))
        import venvs
        import xtuner_env

        calls = []

        def fake_pip(py, args, log, env=None):  # record instead of installing GBs; fail when asked to
            calls.append(args)
            if "boom" in args:
                raise RuntimeError("pip install boom failed")

        monkeypatch.setattr(venvs, "pip_install", fake_pip)
        monkeypatch.setenv("TOKENGRAFT_XTUNER_VENV", str(tmp_path / "venv"))
        (tmp_path / "venv.tmp-stale").mkdir()  # what a killed build leaves
        monkeypatch.setattr(xtuner_env, "REQUIREMENTS", ["boom"])
        with pytest.raises(RuntimeError, match="boom"):
            xtuner_env.ensure()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["venv.build.log", "venv.lock"]  # nothing half-built
        monkeypatch.setattr(xtuner_env, "REQUIREMENTS", ["xtuner==0.2.0"])
        py = xtuner_env.ensure()
        assert py == tmp_path / "venv" / "bin" / "python" and py.exists() and xtuner_env.is_ready()
        n = len(calls)
        assert xtuner_env.ensure() == py and len(calls) == n  # reused, not rebuilt
        assert (py.parent.parent / xtuner_env.MARKER).read_text() == "xtuner==0.2.0\ndeepspeed==0.16.2\n"
        assert ["--no-build-isolation", "deepspeed==0.16.2"] in calls  # deepspeed after torch, no isolation
        r = subprocess.run([str(py), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
        assert r.stdout.strip() == str(tmp_path / "venv")  # the renamed venv knows where it lives


if __name__ == "__main__":
    _main(sys.argv[1:])
