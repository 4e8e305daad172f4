"""doctor: one test per check, each on a deliberately broken copy of a real folder.

Broken copies copy the small files and symlink the (read-only) weights; a test that breaks the
weights writes only the changed tensors to an extra shard and points a safetensors index at it,
which also exercises the sharded reader. Models are built only for the grafted fixture (in-memory
checks and KL)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokengraft import doctor
from tokengraft.doctor import Finding, check_folder

GRAFT_TOKENS = [{"content": "<box>", "init": "subword"}, {"content": "</box>", "init": "subword"},
                {"content": "<loc_1>", "init": "mean"}, {"content": "<loc_2>", "init": "mean"}]


# measured here (254 positions of the Zen of Python and argparse's docstring): 4 tied rows, two of
# them subword copies of the real token "box" (which therefore take as much mass as "box" does) and
# two mean rows, cost 4.2e-5 nats/token. The bound leaves 2.4x room on this deterministic figure and
# stays 10x under doctor's own warning level (KL_WARN, 1e-3).
KL_SUBWORD_BOUND = 1e-4


# -- helpers ----------------------------------------------------------------------------------

def variant(src, dst) -> Path:
    """A copy of a checkpoint folder whose weight files are symlinks (doctor never writes)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f.resolve())
        else:
            shutil.copy(f, dst / f.name)
    return dst


def with_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace/add tensors through a second shard and a model.safetensors.index.json."""
    base = folder / "model-base.safetensors"
    (folder / "model.safetensors").rename(base)
    with safe_open(str(base), framework="pt") as f:
        keys = list(f.keys())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model-override.safetensors"),
              metadata={"format": "pt"})
    wm = {k: "model-base.safetensors" for k in keys}
    wm.update({k: "model-override.safetensors" for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def tensor(folder, key) -> torch.Tensor:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(key)


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d, indent=2))


def codes(findings, severity=None) -> list[str]:
    return [f.code for f in findings if severity is None or f.severity == severity]


def only(findings, code) -> Finding:
    got = [f for f in findings if f.code == code]
    assert len(got) == 1, (code, findings)
    assert "\n" not in got[0].message
    return got[0]


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grafted(smollm2_dir, tmp_path_factory):
    """(folder, model, tokenizer, manifest): real SmolLM2 with 4 grafted tokens, saved by tokengraft."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.graft import graft
    from tokengraft.io import save_folder

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    manifest = graft(model, tok, GRAFT_TOKENS, log=lambda *a: None)
    out = save_folder(tmp_path_factory.mktemp("grafted") / "smollm2-grafted", model, tok, manifest)
    return out, model, tok, manifest


@pytest.fixture(scope="module")
def smollm2_baseline(smollm2_dir):
    return check_folder(smollm2_dir)


# -- clean folders ----------------------------------------------------------------------------

def test_real_smollm2_has_no_errors(smollm2_baseline):
    f = smollm2_baseline
    assert not doctor.has_errors(f), f
    assert "tied head" in only(f, "summary").message and "49152 rows" in only(f, "summary").message
    only(f, "manifest-missing")
    # real finding: SmolLM2's unused code-data special tokens share rows (never trained apart)
    assert "'<issue_start>'" in only(f, "identical-input-rows").message


def test_clean_grafted_folder_cli_exit0(grafted):
    folder = grafted[0]
    r = subprocess.run([sys.executable, "-m", "tokengraft", "doctor", str(folder), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["counts"]["error"] == 0
    got = {f["code"] for f in rep["findings"]}
    assert "padding-not-suppressed" not in got and "manifest-missing" not in got
    summary = next(f["message"] for f in rep["findings"] if f["code"] == "summary")
    assert "49156 tokens, 49216 rows" in summary and "4 grafted token(s) on a 49152-token base" in summary


def test_clean_llava(llava_dir):
    f = check_folder(llava_dir)
    assert not doctor.has_errors(f), f
    assert "processor LlavaProcessor" in only(f, "summary").message
    assert "padding-not-suppressed" not in codes(f)


def test_broken_folder_cli_exit1_one_line(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.update(vocab_size=50000))
    r = subprocess.run([sys.executable, "-m", "tokengraft", "doctor", str(d)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("error")]
    assert len(lines) == 1
    assert "vocab-size-mismatch" in lines[0] and "vocab_size is 50000" in lines[0] and "49152 rows" in lines[0]
    assert r.stdout.strip().splitlines()[-1].startswith("FAIL: 1 error(s)")


def test_not_a_folder(tmp_path):
    with pytest.raises(doctor.DoctorError, match="not a folder"):
        check_folder(tmp_path / "nope")
    from tokengraft.cli import main

    assert main(["doctor", str(tmp_path / "nope")]) == 2  # the CLI prints it as one line


# -- sizes ------------------------------------------------------------------------------------

def test_vocab_size_mismatch_top_level(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.update(vocab_size=49153))
    f = only(check_folder(d), "vocab-size-mismatch")
    assert f.severity == "error" and "vocab_size is 49153" in f.message and "set vocab_size to 49152" in f.message


def test_vocab_size_mismatch_text_config(llava_dir, tmp_path):
    d = variant(llava_dir, tmp_path / "l")
    edit_json(d / "config.json", lambda c: c["text_config"].update(vocab_size=49152))
    f = only(check_folder(d), "vocab-size-mismatch")
    assert "text_config.vocab_size is 49152" in f.message and "49216 rows" in f.message


def _add_tokenizer_token(folder: Path, content: str, id_: int, **flags) -> None:
    def add(t):
        t["added_tokens"].append({"id": id_, "content": content, "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True, **flags})
    edit_json(folder / "tokenizer.json", add)


def test_tokenizer_larger_than_rows(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    _add_tokenizer_token(d, "<extra_0>", 49152)  # a hand edit with no resize
    f = only(check_folder(d), "tokenizer-larger-than-rows")
    assert f.severity == "error" and "49153 tokens" in f.message and "only 49152 rows" in f.message


def test_head_rows_mismatch(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    emb = tensor(smollm2_dir, "model.embed_tokens.weight")
    with_tensors(d, {"lm_head.weight": emb[:49000].clone()})
    edit_json(d / "config.json", lambda c: c.update(tie_word_embeddings=False))
    f = only(check_folder(d), "head-rows-mismatch")
    assert "lm_head.weight has 49000 rows" in f.message and "49152" in f.message


def test_untied_head_rows_checked_on_the_output_side(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    head = tensor(smollm2_dir, "model.embed_tokens.weight").clone()
    head[[100, 101]] = 0
    head[[300, 301, 302]] = head[299].clone()
    with_tensors(d, {"lm_head.weight": head})
    edit_json(d / "config.json", lambda c: c.update(tie_word_embeddings=False))
    f = check_folder(d)
    assert "untied head" in only(f, "summary").message and "tie-flag-mismatch" not in codes(f)
    assert "2 token(s) have all-zero output rows in lm_head.weight" in only(f, "untrained-rows").message
    assert "[299 " in only(f, "identical-output-rows").message


@pytest.mark.parametrize("remove,code", [
    (["config.json"], "config-missing"),
    (["tokenizer.json", "tokenizer_config.json"], "tokenizer-unloadable"),
    (["model.safetensors"], "weights-unreadable"),  # replaced by a truncated file below
])
def test_missing_files(smollm2_dir, tmp_path, remove, code):
    d = variant(smollm2_dir, tmp_path / "m")
    for name in remove:
        (d / name).unlink()
        if name.endswith(".safetensors"):  # the first kilobytes of the real file: a cut-short copy
            (d / name).write_bytes((Path(smollm2_dir) / name).open("rb").read(4096))
    f = check_folder(d)
    assert only(f, code).severity == "error" and doctor.has_errors(f)
    assert "summary" in codes(f)  # the other checks still ran


# -- tie --------------------------------------------------------------------------------------

def test_tie_flag_false_without_head(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.update(tie_word_embeddings=False))
    f = only(check_folder(d), "tie-flag-mismatch")
    assert f.severity == "error" and "no output head" in f.message and "set tie_word_embeddings to true" in f.message


def test_tie_flag_true_but_head_differs(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    emb = tensor(smollm2_dir, "model.embed_tokens.weight")
    head = emb.clone()
    head[1000] += 1e-3  # one row trained apart is enough: transformers then refuses to tie
    with_tensors(d, {"lm_head.weight": head})
    f = only(check_folder(d), "tie-flag-mismatch")
    assert "lm_head.weight differs from model.embed_tokens.weight" in f.message
    # the same tensor saved twice (as .bin conversions do) is consistent with a tied flag
    d2 = variant(smollm2_dir, tmp_path / "m2")
    with_tensors(d2, {"lm_head.weight": emb.clone()})
    assert "tie-flag-mismatch" not in codes(check_folder(d2))


def test_tie_pointer_in_memory(grafted):
    _, model, tok, manifest = grafted
    assert not doctor.has_errors(doctor.check_model(model, tok, manifest=manifest))
    head = model.get_output_embeddings()
    tied = head.weight
    try:
        head.weight = torch.nn.Parameter(tied.detach().clone())  # equal values, a different Parameter
        f = doctor.check_model(model, tok, manifest=manifest)
        assert "separate Parameter" in only(f, "tie-flag-mismatch").message
        assert "records tied=true but the weights are untied" in only(f, "manifest-tied-mismatch").message
    finally:
        head.weight = tied
    assert doctor.check_model(model, tok, manifest=manifest) and model.get_output_embeddings().weight is tied


def test_nonfinite_row_in_memory(grafted):
    _, model, tok, manifest = grafted
    w = model.get_input_embeddings().weight
    saved = w.detach()[49153].clone()
    try:
        with torch.no_grad():
            w[49153, 0] = float("inf")
        f = only(doctor.check_model(model, tok, manifest=manifest), "nonfinite-rows")
        assert f.severity == "error" and "1 vocabulary row(s) of model.embed_tokens.weight" in f.message
        assert "49153 '</box>'" in f.message and f.data["rows"] == [49153]
    finally:
        with torch.no_grad():
            w[49153] = saved
    assert "nonfinite-rows" not in codes(doctor.check_model(model, tok, manifest=manifest))


# -- LLaVA image token ------------------------------------------------------------------------

def test_image_token_out_of_range(llava_dir, tmp_path):
    d = variant(llava_dir, tmp_path / "l")
    edit_json(d / "config.json", lambda c: c.update(image_token_index=60000))
    f = check_folder(d)
    assert "image_token_index is 60000" in only(f, "image-token-out-of-range").message
    assert "image-token-mismatch" in codes(f)  # it is not the processor's token either


def test_image_token_mismatch(llava_dir, tmp_path):
    d = variant(llava_dir, tmp_path / "l")
    edit_json(d / "config.json", lambda c: c.update(image_token_index=49151))  # in range, wrong token
    f = check_folder(d)
    assert "image-token-out-of-range" not in codes(f)
    m = only(f, "image-token-mismatch").message
    assert "image_token_index is 49151" in m and "'<image>' has id 49152" in m and "set image_token_index to 49152" in m


def test_image_token_unknown_to_tokenizer(llava_dir, tmp_path):
    d = variant(llava_dir, tmp_path / "l")
    edit_json(d / "processor_config.json", lambda c: c.update(image_token="<img>"))
    f = only(check_folder(d), "image-token-unknown")
    assert "'<img>' is not in the tokenizer" in f.message and "tokengraft add" in f.message


def test_processor_missing(llava_dir, tmp_path):
    d = variant(llava_dir, tmp_path / "l")
    for name in ("processor_config.json", "preprocessor_config.json"):  # the image processor is in the second
        (d / name).unlink(missing_ok=True)
    f = only(check_folder(d), "processor-missing")  # an error since issue 9: no image can be fed
    assert f.severity == "error" and "image_token_index 49152" in f.message


# -- special ids ------------------------------------------------------------------------------

@pytest.mark.parametrize("file,edit,expect", [
    ("config.json", {"pad_token_id": 60000}, "pad_token_id 60000 is outside the tokenizer's 49152 tokens"),
    ("generation_config.json", {"eos_token_id": [2, 50000]}, "eos_token_id [2, 50000] is outside"),
    ("config.json", {"bos_token_id": -1}, "bos_token_id -1 is outside"),
])
def test_special_id_out_of_range(smollm2_dir, tmp_path, file, edit, expect):
    d = variant(smollm2_dir, tmp_path / "m")
    edit_json(d / file, lambda c: c.update(edit))
    f = only(check_folder(d), "special-id-out-of-range")
    assert f.severity == "error" and expect in f.message and file in f.message


def test_eos_disagrees_with_tokenizer(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    edit_json(d / "generation_config.json", lambda c: c.update(eos_token_id=0))
    f = only(check_folder(d), "eos-disagrees")
    assert f.severity == "warning" and "'<|im_end|>' (id 2)" in f.message


# -- rows that look untrained -----------------------------------------------------------------

def test_untrained_zero_rows(smollm2_dir, tmp_path):
    d = variant(smollm2_dir, tmp_path / "m")
    emb = tensor(smollm2_dir, "model.embed_tokens.weight").clone()
    emb[[100, 101]] = 0
    with_tensors(d, {"model.embed_tokens.weight": emb})
    f = only(check_folder(d), "untrained-rows")
    assert f.severity == "warning" and "2 token(s) have all-zero input rows" in f.message and "100 " in f.message


def test_identical_rows(smollm2_dir, tmp_path, smollm2_baseline):
    d = variant(smollm2_dir, tmp_path / "m")
    emb = tensor(smollm2_dir, "model.embed_tokens.weight").clone()
    emb[[300, 301, 302]] = emb[299].clone()
    with_tensors(d, {"model.embed_tokens.weight": emb})
    m = only(check_folder(d), "identical-input-rows").message
    before = only(smollm2_baseline, "identical-input-rows").message
    assert "299 " not in before
    assert "[299 " in m and "4 in all" not in m and "19 tokens in 5 group(s)" in m


def test_identical_rows_of_grafted_mean_tokens_are_info(grafted):
    f = check_folder(grafted[0])
    by_init = sorted(x.message for x in f if x.code == "identical-input-rows-by-init")
    assert [x.severity for x in f if x.code == "identical-input-rows-by-init"] == ["info", "info"]
    # "<box>" starts from "box", a single base token ("</box>" from "end box"); the two <loc_*> from the mean
    assert "4810 'box', 49152 '<box>' share" in by_init[0] and "(subword)" in by_init[0]
    assert "'</box>'" not in by_init[0]
    assert "49154 '<loc_1>', 49155 '<loc_2>'" in by_init[1] and "(mean)" in by_init[1]
    assert "'<loc_" not in only(f, "identical-input-rows").message  # the real warning names base tokens only


def test_padding_rows_not_suppressed(grafted, tmp_path):
    d = variant(grafted[0], tmp_path / "g")
    edit_json(d / "generation_config.json", lambda c: c.pop("suppress_tokens"))
    f = only(check_folder(d), "padding-not-suppressed")
    assert f.severity == "warning" and "60 padding row(s)" in f.message and "49156..49215" in f.message


# -- manifest ---------------------------------------------------------------------------------

def test_manifest_fingerprint_mismatch(grafted, tmp_path):
    d = variant(grafted[0], tmp_path / "g")
    _add_tokenizer_token(d, "<hand_edit>", 49156)  # a token added by hand after grafting
    f = check_folder(d)
    m = only(f, "manifest-fingerprint-mismatch").message
    assert "49157 tokens" in m and "not in the manifest: 49156 '<hand_edit>'" in m
    assert not [x for x in f if x.code == "manifest-token-mismatch"]  # the recorded tokens are intact
    # its row is a padding row that generation_config still suppresses: it can never be generated
    assert "(49156 '<hand_edit>')" in only(f, "token-suppressed").message


def test_manifest_token_id_mismatch(grafted, tmp_path):
    d = variant(grafted[0], tmp_path / "g")
    # an id no other token has, inside the rows (a shared id or one past the rows is manifest-invalid)
    edit_json(d / "tokengraft.json", lambda m: m["tokens"][1].update(id=49200))
    m = only(check_folder(d), "manifest-token-mismatch").message
    assert "'</box>' is recorded at id 49200 but has id 49153" in m


@pytest.mark.parametrize("edit,code,expect", [
    ({"rows": 49280}, "manifest-rows-mismatch", "records 49280 rows but model.embed_tokens.weight has 49216"),
    ({"tied": False}, "manifest-tied-mismatch", "records tied=false but the weights are tied"),
])
def test_manifest_vs_weights(grafted, tmp_path, edit, code, expect):
    d = variant(grafted[0], tmp_path / "g")
    edit_json(d / "tokengraft.json", lambda m: m.update(edit))
    assert expect in only(check_folder(d), code).message


def test_manifest_invalid(grafted, tmp_path):
    d = variant(grafted[0], tmp_path / "g")
    edit_json(d / "tokengraft.json", lambda m: m.update(schema_version=99))
    f = only(check_folder(d), "manifest-invalid")
    assert f.severity == "error" and "upgrade tokengraft" in f.message


def test_special_token_split(grafted, tmp_path):
    d = variant(grafted[0], tmp_path / "g")

    def single_word(t):  # a common hand edit: the token now only matches as a whole word
        next(a for a in t["added_tokens"] if a["content"] == "<box>")["single_word"] = True
    edit_json(d / "tokenizer.json", single_word)
    m = only(check_folder(d), "special-token-split").message
    assert "grafted token '<box>' (id 49152) is split into pieces: inside running text" in m


# -- KL ---------------------------------------------------------------------------------------

def test_kl_of_grafted_rows(grafted):
    from tokengraft.probe import head_inputs, kl_of_rows, mass_of, real_text

    _, model, tok, manifest = grafted
    hidden = head_inputs(model, tok, real_text()[:3], max_tokens=256)  # a few hundred positions suffice
    f = doctor.kl_findings(model, tok, manifest, hidden=hidden)
    k = only(f, "kl-invisibility")
    assert "kl-visible" not in codes(f) and f"{k.data['kl_mean']:.2e} nats/token" in k.message
    assert 0 < k.data["kl_mean"] < KL_SUBWORD_BOUND and k.data["positions"] == len(hidden) >= 200
    # cross-check with the direct softmax comparison: base = every row but the grafted ones
    w = model.get_output_embeddings().weight.detach()
    new = [t.id for t in manifest.tokens]
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    keep[new] = False
    n = int(keep.sum())
    kl = kl_of_rows(hidden, torch.cat([w[keep], w[new]]), list(range(n, n + len(new))))
    direct, mass = float(kl.mean()), mass_of(kl)
    assert k.data["kl_mean"] == pytest.approx(direct, rel=0.05, abs=1e-9)
    assert k.data["max_mass"] == pytest.approx(mass, rel=0.05, abs=1e-9)
    assert only(doctor.kl_findings(model, tok, None), "kl-skipped").severity == "info"
