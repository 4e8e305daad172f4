"""Export: a complete checkpoint that plain transformers reloads, checked in a fresh process.

Real SmolLM2 (tied) and the SmolLM2 LLaVA carry the claims about real behaviour (logits, greedy
generation); a tiny untied Llama with SmolLM2's tokenizer carries the structural ones (untied stays
untied, adapters, dtypes, bad inputs).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_llama

TOKENS = [{"content": "<box>", "init": "subword"}, {"content": "</box>", "init": "subword", "stop": True},
          {"content": "<ref>", "init": "subword"}]
QUIET = dict(log=lambda *a: None)


def _change_new_rows(model, manifest, seed=0):
    """Pretend training moved the new rows (input and, when untied, output side)."""
    g = torch.Generator().manual_seed(seed)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        for t in manifest.tokens:
            emb[t.id] += torch.randn(emb.shape[1], generator=g) * 0.05
            if head is not emb:
                head[t.id] += torch.randn(head.shape[1], generator=g) * 0.05


def _tiny_untied(tok, seed=0):
    return tiny_llama(tok, tied=False, seed=seed)


@pytest.fixture(scope="module")
def tiny_dir(smollm2_dir, tmp_path_factory):
    """A grafted tiny untied Llama (SmolLM2 tokenizer), saved by tokengraft: read-only."""
    from transformers import AutoTokenizer

    from tokengraft.graft import graft
    from tokengraft.io import save_folder

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = _tiny_untied(tok)
    man = graft(model, tok, TOKENS, **QUIET)
    _change_new_rows(model, man)
    return save_folder(tmp_path_factory.mktemp("tiny") / "tiny", model, tok, man)


def _no_temp_siblings(out):
    return not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# -- real SmolLM2 (tied) ------------------------------------------------------------------------

def test_export_grafted_smollm2_tied(smollm2, tmp_path):
    from transformers import AutoConfig

    from tokengraft.export import export_model
    from tokengraft.graft import graft

    model, tok = smollm2
    # no padding rows here: graft measures them on real text (slow on 2 shared cores); the tiny
    # tests check that padding rows end up in suppress_tokens
    man = graft(model, tok, TOKENS, pad_to_multiple_of=1, **QUIET)
    _change_new_rows(model, man)
    rep = export_model(model, tok, None, man, tmp_path / "out", verify_output=True, max_shard_size="200MB", **QUIET)
    v = rep.verify
    assert v.ok, v.problems
    assert v.max_abs_diff <= 1e-5 and v.generation_equal and v.tied is True and v.tokens_checked == 3
    assert v.probes == 2  # prose without the new tokens, and a text using them
    out = tmp_path / "out"
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.tie_word_embeddings is True and cfg.vocab_size == rep.rows == 49155
    assert len([f for f in rep.files if f.endswith(".safetensors")]) >= 2  # sharded at 200MB
    assert "model.safetensors.index.json" in rep.files
    gen = json.loads((out / "generation_config.json").read_text())
    stop = tok.convert_tokens_to_ids("</box>")
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert stop in eos and tok.eos_token_id in eos
    assert not gen.get("suppress_tokens")  # no padding rows
    hist = json.loads((out / "tokengraft.json").read_text())["history"]
    assert [h["op"] for h in hist][-2:] == ["add", "export"]
    assert man.history[-1]["op"] == "add"  # the caller's manifest is not modified


def test_export_llava_with_new_tokens(llava_dir, tmp_path):
    """The LLaVA fixture + new tokens with trained rows: image probe included, tied stays tied."""
    from tokengraft.export import export_model
    from tokengraft.graft import graft
    from tokengraft.io import load_folder

    model, tok, proc, man = load_folder(llava_dir)
    man = graft(model, tok, TOKENS[:2], manifest=man, processor=proc, **QUIET)
    _change_new_rows(model, man, seed=1)
    with torch.no_grad():  # and a trained projector
        model.model.multi_modal_projector.linear_2.bias += 0.01
    rep = export_model(model, tok, proc, man, tmp_path / "out", source=llava_dir, verify_output=True, **QUIET)
    v = rep.verify
    assert v.ok, v.problems
    assert v.probes == 3 and v.max_abs_diff <= 1e-5 and v.generation_equal and v.tied is True
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    img = tok.convert_tokens_to_ids("<image>")
    assert cfg.get("image_token_id", cfg.get("image_token_index")) == img
    assert cfg["text_config"]["vocab_size"] == rep.rows
    assert (tmp_path / "out" / "processor_config.json").is_file() or (tmp_path / "out" / "preprocessor_config.json").is_file()
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    new_ids = {t.id for t in man.tokens if t.role == "generate"}
    assert new_ids and not new_ids & set(gen["suppress_tokens"])  # they took padding rows: now generable
    assert set(range(len(tok), rep.rows)) == set(gen["suppress_tokens"])


# -- tiny untied --------------------------------------------------------------------------------

def test_untied_stays_untied_and_bf16(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tokengraft.export import export

    rep = export(tiny_dir, tmp_path / "out", verify_output=True, **QUIET)
    assert rep.verify.ok and rep.verify.tied is False and rep.tied is False
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
    assert m.config.tie_word_embeddings is False
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert torch.equal(m.lm_head.weight, ref.lm_head.weight)  # the trained head survived the round trip
    assert rep.rows == 49216 and set(m.generation_config.suppress_tokens) == set(range(49155, 49216))
    stop = m.generation_config.eos_token_id
    assert rep.stop_token_ids and set(rep.stop_token_ids) <= set(stop if isinstance(stop, list) else [stop])

    rep16 = export(tiny_dir, tmp_path / "bf16", dtype="bf16", verify_output=True, **QUIET)
    assert rep16.verify.ok, rep16.verify.problems
    assert rep16.rounding_drift is not None and 0 < rep16.rounding_drift < 0.5
    m16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert m16.dtype == torch.bfloat16


def test_adapter_merged(tiny_dir, tmp_path):
    """--adapter: a PEFT LoRA (including the untied head) merged; equals peft's own merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.export import export

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    ref = pm.merge_and_unload().eval()
    rep = export(tiny_dir, tmp_path / "out", adapter=tmp_path / "adapter", verify_output=True, **QUIET)
    assert rep.verify.ok, rep.verify.problems
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("Beautiful is better than ugly. <box> ok </box>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        d = (got(ids).logits - ref(ids).logits).abs().max()
    assert float(d) <= 1e-5
    hist = json.loads((tmp_path / "out" / "tokengraft.json").read_text())["history"][-1]
    assert hist["op"] == "export" and hist["adapter"] == str(tmp_path / "adapter")


def test_finalize_frees_new_tokens_and_suppresses_padding(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.hf import finalize
    from tokengraft.manifest import Manifest

    model, tok, man = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir), \
        Manifest.load(tiny_dir)
    box = man.token("<box>").id
    model.generation_config.suppress_tokens = [5, box]  # a deliberate one, and a stale one on a new token
    model.config.tie_word_embeddings = True  # a lying flag: the weights are untied
    finalize(model, tok, None, man)
    assert model.config.tie_word_embeddings is False
    assert set(model.generation_config.suppress_tokens) == {5} | set(range(len(tok), 49216))


def test_verify_catches_differences(tiny_dir, tmp_path):
    """verify is not a rubber stamp: a changed row, or a re-tied head on disk, is reported."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.export import export, verify
    from tokengraft.manifest import Manifest

    export(tiny_dir, tmp_path / "out", **QUIET)
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(out)
    man = Manifest.load(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        model.lm_head.weight[man.token("<box>").id] += 0.5
    v = verify(out, model, tok, manifest=man, gen_tokens=0)
    assert not v.ok and any("max |logit diff|" in p for p in v.problems)

    # a tied model written with the wrong tie flag loads untied, with a missing (random) head
    from transformers import LlamaForCausalLM

    tied = LlamaForCausalLM(_tiny_untied(tok).config.__class__(**{**model.config.to_dict(),
                                                                   "tie_word_embeddings": True})).eval()
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    tied.save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    cfg = json.loads((tmp_path / "tied" / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tmp_path / "tied" / "config.json").write_text(json.dumps(cfg))
    v = verify(tmp_path / "tied", tied, tok, manifest=man, gen_tokens=0)
    assert not v.ok and v.tied is False
    assert any("loads untied" in p for p in v.problems) and any("missing keys" in p for p in v.problems)


# -- bad inputs -----------------------------------------------------------------------------------

def test_existing_output_refused_and_cli(tiny_dir, tmp_path):
    from tokengraft.cli import main

    # --overwrite only ever replaces a folder tokengraft wrote (issue 9): make OUT one, then add a file
    assert main(["export", str(tiny_dir), "-o", str(tmp_path / "out")]) == 0
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_dir), "-o", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["export", str(tiny_dir), "-o", str(tmp_path / "out"), "--overwrite", "--max-shard-size", "2MB"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert main(["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o2")]) == 2


def test_interrupted_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from tokengraft.export import export

    real = PreTrainedModel.save_pretrained

    def fail_midway(self, folder, *a, **k):
        real(self, folder, *a, **k)  # the weights are on disk ...
        raise OSError("disk full (injected)")  # ... and then the write fails

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail_midway)
    with pytest.raises(OSError, match="injected"):
        export(tiny_dir, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists() and _no_temp_siblings(tmp_path / "out")
    # with --overwrite, the old OUT survives a failed export untouched
    shutil.copytree(tiny_dir, tmp_path / "old")
    before = sorted(p.name for p in (tmp_path / "old").iterdir())
    with pytest.raises(OSError, match="injected"):
        export(tiny_dir, tmp_path / "old", overwrite=True, **QUIET)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before and _no_temp_siblings(tmp_path / "old")


def test_tokenizer_changed_behind_the_manifest(tiny_dir, tmp_path):
    """A folder whose tokenizer no longer matches its tokengraft.json is refused with a clear error."""
    from transformers import AutoTokenizer

    from tokengraft.export import ExportError, export

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(["<sneaky>"])
    tok.save_pretrained(src)
    with pytest.raises(ExportError, match="not the one tokengraft.json records"):
        export(src, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


# -- broken weights (issue 9) --------------------------------------------------------------------

def test_non_finite_rows_refused(tiny_dir, tmp_path, capsys):
    """NaN/inf in vocabulary rows: export refuses (with or without --verify), one line, exit 2."""
    from safetensors.torch import load_file, save_file

    from tokengraft.cli import main
    from tokengraft.export import ExportError, export

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    w = load_file(str(src / "model.safetensors"))
    w["lm_head.weight"][7, 3] = float("nan")
    w["lm_head.weight"][9, 0] = float("inf")
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    for verify_output in (False, True):
        with pytest.raises(ExportError, match=r"output head has 2 row\(s\) with NaN or inf values \(ids \[7, 9\]"):
            export(src, tmp_path / "out", verify_output=verify_output, **QUIET)
    capsys.readouterr()
    assert main(["export", str(src), "-o", str(tmp_path / "out")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("Loading weights")]  # transformers' bar
    assert len(err) == 1 and err[0].startswith("tokengraft export: error:") and "NaN or inf" in err[0]
    assert not (tmp_path / "out").exists() and _no_temp_siblings(tmp_path / "out")


# -- export --adapter can't lie (issue 13) ---------------------------------------------------------

def _lora(base_dir, out, seed=3, token_rows=None):
    """A PEFT LoRA on q_proj (B perturbed) saved to ``out``; ``token_rows``: {id: (embed_row, head_row)}
    carried as PEFT trainable tokens on both sides (the tiny model is untied)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = sorted(token_rows or {})
    extra = {"trainable_token_indices": {"embed_tokens": ids, "lm_head": ids}} if ids else {}
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif "trainable_tokens_delta" in n:
                side = 1 if "lm_head" in n else 0
                p.copy_(torch.stack([token_rows[i][side] for i in ids]))
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained_run(tiny_dir, tmp_path_factory):
    """A run folder as `train --mode lora` leaves it: run.json names the trained tokens and
    new_rows.safetensors holds their trained rows (different from the base folder's)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tokengraft.manifest import Manifest

    run = tmp_path_factory.mktemp("run") / "run"
    run.mkdir()
    man = Manifest.load(tiny_dir)
    tokens = [t.content for t in man.tokens]
    ids = [t.id for t in man.tokens]
    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    g = torch.Generator().manual_seed(7)
    emb = m.get_input_embeddings().weight.detach()[ids] + torch.randn(len(ids), m.config.hidden_size, generator=g) * 0.1
    head = m.lm_head.weight.detach()[ids] + torch.randn(len(ids), m.config.hidden_size, generator=g) * 0.1
    save_file({"embed": emb.contiguous(), "head": head.contiguous()}, str(run / "new_rows.safetensors"),
              metadata={"tokens": json.dumps(tokens), "tied": "false", "format": "tokengraft-rows"})
    (run / "run.json").write_text(json.dumps({"base_model": "elsewhere", "mode": "lora", "new_tokens": tokens}))
    man.save(run)
    return {"run": run, "ids": ids, "rows": {i: (emb[k], head[k]) for k, i in enumerate(ids)}}


def test_adapter_without_the_trained_rows_refused(tiny_dir, trained_run, tmp_path, capsys):
    from tokengraft.cli import main
    from tokengraft.export import ExportError, export

    run = trained_run["run"]
    plain = _lora(tiny_dir, run / "adapter-plain")
    with pytest.raises(ExportError, match=r"does not carry them .*pass the run folder instead: `tokengraft export"):
        export(tiny_dir, tmp_path / "out", adapter=plain, verify_output=True, **QUIET)
    capsys.readouterr()
    assert main(["export", str(tiny_dir), "--adapter", str(plain), "-o", str(tmp_path / "out"), "--verify"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert len(err) == 1 and err[0].startswith("tokengraft export: error:") and str(run) in err[0]
    assert not (tmp_path / "out").exists()
    # an untied model: an adapter carrying only the input side drops the trained head rows
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                        LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=trained_run["ids"]))
    pm.save_pretrained(run / "adapter-input-only")
    with pytest.raises(ExportError, match="does not carry them"):
        export(tiny_dir, tmp_path / "out", adapter=run / "adapter-input-only", **QUIET)


def test_adapter_with_rows_verified_against_peft(tiny_dir, trained_run, tmp_path):
    """An adapter that carries the rows (PEFT trainable tokens) exports, and --verify compares the
    reload with PEFT's own load of the adapter: the rows in the export are the trained ones."""
    from transformers import AutoModelForCausalLM

    from tokengraft.export import export

    run = trained_run["run"]
    good = _lora(tiny_dir, run / "adapter", token_rows=trained_run["rows"])
    rep = export(tiny_dir, tmp_path / "out", adapter=good, verify_output=True, **QUIET)
    assert rep.verify.ok and rep.verify.reference == "PEFT load of the adapter", rep.verify.problems
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for i, (e, h) in trained_run["rows"].items():
        assert torch.allclose(got.get_input_embeddings().weight[i], e) and torch.allclose(got.lm_head.weight[i], h)


def test_base_already_holding_the_rows_passes(tiny_dir, trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from tokengraft.export import export

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    w = load_file(str(base / "model.safetensors"))
    for i, (e, h) in trained_run["rows"].items():
        w["model.embed_tokens.weight"][i], w["lm_head.weight"][i] = e, h
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    plain = trained_run["run"] / "adapter-plain"
    if not plain.exists():
        _lora(tiny_dir, plain)
    assert export(base, tmp_path / "out", adapter=plain, **QUIET).kind == "hf"


def test_verify_does_not_trust_the_merge(tiny_dir, tmp_path, monkeypatch):
    """A wrong merge (here: the LoRA dropped) is caught, because verify compares with PEFT's own
    unmerged load of the adapter, not with the merged object it wrote."""
    from peft.tuners.tuners_utils import BaseTuner

    from tokengraft.export import VerifyError, export

    adapter = _lora(tiny_dir, tmp_path / "adapter")
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(VerifyError) as e:
        export(tiny_dir, tmp_path / "out", adapter=adapter, verify_output=True, **QUIET)
    assert any("max |logit diff|" in p for p in e.value.report.problems)
    assert not (tmp_path / "out").exists()


# -- training runs (tokengraft train) -------------------------------------------------------------

@pytest.fixture(scope="module")
def grounding(tmp_path_factory):
    from tokengraft.demo.data import make_grounding_dataset

    return make_grounding_dataset(tmp_path_factory.mktemp("grounding"), n_train=8, n_eval=2, bins=4, seed=0)


def _train(base, data, out, mode):
    from tokengraft.train.loop import TrainConfig, train

    return train(TrainConfig(model=str(base), data=str(data["train"]), image_folder=str(data["image_folder"]),
                             tokens=data["tokens"], init="mean", template="chatml", output_dir=str(out),
                             mode=mode, batch_size=4, max_steps=2, lr=2e-2, logging_steps=1, save_steps=100,
                             progress=False, tensorboard=False, max_length=128))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rows", "lora"])
def test_export_training_run(llava_dir, grounding, copy_dir, tmp_path, mode):
    """A `rows` and a `lora` run on the SmolLM2 LLaVA: reload equals the merged run (logits,
    greedy generation, single-id tokens, tied); then the base folder changes -> a clear error."""
    from transformers import AutoTokenizer

    from tokengraft.cli import main
    from tokengraft.export import export, source_kind

    base = copy_dir(llava_dir, "base")
    run = _train(base, grounding, tmp_path / "run", mode)
    assert source_kind(run) == "run"
    rep = export(run, tmp_path / "out", verify_output=True, **QUIET)
    v = rep.verify
    assert v.ok, v.problems
    assert rep.kind == "run" and v.probes == 3 and v.max_abs_diff <= 1e-5 and v.generation_equal
    assert v.tied is True and rep.tied and v.tokens_checked == len(grounding["tokens"]) + 1  # + <image>
    assert not any(f.startswith("adapter_") for f in rep.files)  # merged: a plain checkpoint

    # the base folder the run was trained from changed (its tokenizer gained a token)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(base)
    assert main(["export", str(run), "-o", str(tmp_path / "out2")]) == 2
    from tokengraft.train.run import RunError

    with pytest.raises(RunError, match="changed since training"):
        export(run, tmp_path / "out2", **QUIET)
    assert not (tmp_path / "out2").exists()
