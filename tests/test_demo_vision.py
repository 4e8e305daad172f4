"""The demo's vision side: shapes on the location grid, and the tower pretraining that lets the
LLaVA see where they are (real SmolLM2 + a small CLIP tower, real photos)."""
from __future__ import annotations

import json
import random
import re

import pytest


def test_grid_scenes_fill_one_location_cell(tmp_path):
    from tokengraft.demo.data import make_grounding_dataset, photos, scene

    rng, pics = random.Random(0), photos(128)
    for _ in range(50):
        _, label, box = scene(rng, pics, 128, max_shapes=1, grid=4)
        x0, y0, x1, y1 = box
        assert x0 % 32 == 0 and y0 % 32 == 0 and (x1 - x0, y1 - y0) == (31, 31), box
        assert re.fullmatch(r"\w+ \w+", label)
    d = make_grounding_dataset(tmp_path, n_train=20, n_eval=2, bins=4, image_size=128, max_shapes=1, grid=True)
    for rec in json.loads(d["train"].read_text()):
        x0, y0, x1, y1 = map(int, re.findall(r"<loc_(\d+)>", rec["conversations"][1]["value"]))
        assert (x0, y0) == (x1, y1)  # one cell: both corners in the same bin


def test_random_boxes_unchanged_by_the_grid_option(tmp_path):
    """The default (no grid) data stays what bench/quality.py and the tests were measured on."""
    from tokengraft.demo.data import make_grounding_dataset

    a = make_grounding_dataset(tmp_path / "a", n_train=6, n_eval=1, bins=4, seed=3)
    b = make_grounding_dataset(tmp_path / "b", n_train=6, n_eval=1, bins=4, seed=3, grid=False)
    assert a["train"].read_text() == b["train"].read_text()
    answers = [r["conversations"][1]["value"] for r in json.loads(a["train"].read_text())]
    assert any(re.findall(r"<loc_(\d+)>", s)[0] != re.findall(r"<loc_(\d+)>", s)[2] for s in answers)


@pytest.fixture(scope="module")
def pretrained(smollm2_dir, tmp_path_factory):
    from tokengraft.demo.llava import COMPACT_CHATML, build_llava
    from tokengraft.demo.vision import pretrain_tower

    got = {}

    def prepare(model, processor):
        import torch

        before = {n: p.detach().clone() for n, p in model.model.vision_tower.named_parameters()}
        got["acc"] = pretrain_tower(model, processor, steps=300, bins=4, seed=0, log=lambda m: None)
        got["moved"] = max(float((p.detach() - before[n]).abs().max()) for n, p in model.model.vision_tower.named_parameters())
        got["emb_norm"] = float(model.get_input_embeddings().weight.detach().norm(dim=-1).mean())
        got["linear_1"] = model.model.multi_modal_projector.linear_1.weight.detach().clone()
        assert torch.isfinite(got["linear_1"]).all()

    folder = build_llava(smollm2_dir, tmp_path_factory.mktemp("llava") / "llava", image_size=128, patch_size=32,
                         vision_layers=2, chat_template=COMPACT_CHATML, vision_feature_layer=-1, position_std=1.0,
                         prepare_vision=prepare)
    return folder, got


def test_pretraining_teaches_the_tower_where_shapes_are(pretrained):
    _, got = pretrained
    # 4 corners all right by chance: 1/16 (one cell of 16); 300 steps of 32 fresh pictures
    assert got["acc"] >= 0.3, got["acc"]
    assert got["moved"] > 1e-2
    w = got["linear_1"]
    assert w[:16].abs().sum() > 0 and float(w[16:].abs().max()) == 0.0  # the head, then zeros


def test_pretrained_llava_reloads_with_its_image_tokens_at_embedding_scale(pretrained):
    import torch
    from PIL import Image

    from tokengraft.io import load_folder

    folder, got = pretrained
    assert json.loads((folder / "config.json").read_text())["vision_feature_layer"] == -1
    model, tok, proc, manifest = load_folder(folder)
    img = Image.new("RGB", (128, 128), (120, 90, 60))
    px = proc.image_processor([img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=px).pooler_output[0]
    assert feats.shape[0] == 16
    norm = float(feats.norm(dim=-1).mean())
    assert 0.3 * got["emb_norm"] < norm < 3 * got["emb_norm"], (norm, got["emb_norm"])


@pytest.mark.parametrize("args, says", [(["--bins", "200"], "--bins 200"), (["--vision-steps", "-1"], "--vision-steps")])
def test_demo_refuses_bad_knobs_in_one_line_and_writes_nothing(tmp_path, args, says):
    import subprocess
    import sys

    out = tmp_path / "demo-out"
    r = subprocess.run([sys.executable, "-m", "tokengraft", "demo", "-o", str(out), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and says in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()
