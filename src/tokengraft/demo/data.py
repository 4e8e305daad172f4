"""A small grounding dataset in LLaVA format over real photographs.

Each sample is a real photo (scikit-image) with one or two coloured shapes drawn on it, a question
"Where is the red circle?" and the answer ``<ref>red circle</ref><box><loc_3><loc_12><loc_9><loc_20></box>``:
the box corners are quantized into ``bins`` location bins, each bin a token. That is the token
pattern grounding models (Kosmos-2, Florence-2, InternVL) add, so it exercises the whole pipeline.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 70, 235), "yellow": (245, 225, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("Where is the {}?", "Find the {}.", "Locate the {} in the picture.")


def grounding_tokens(bins: int = 16) -> list[str]:
    """The tokens the dataset uses: ``<ref> </ref> <box> </box>`` and ``<loc_0>..<loc_{bins-1}>``."""
    return ["<ref>", "</ref>", "<box>", "</box>"] + [f"<loc_{i}>" for i in range(bins)]


def bins_of(box: tuple[int, int, int, int], size: int, bins: int) -> list[int]:
    """The location bin of each box corner coordinate (x0 y0 x1 y1) in a ``size``-pixel picture."""
    return [min(bins - 1, int(v * bins / size)) for v in box]


def box_answer(label: str, box: tuple[int, int, int, int], size: int, bins: int) -> str:
    """``<ref>label</ref><box>`` + four location-bin tokens (x0 y0 x1 y1) + ``</box>``."""
    return f"<ref>{label}</ref><box>" + "".join(f"<loc_{v}>" for v in bins_of(box, size, bins)) + "</box>"


def _draw(img, shape: str, colour, box) -> None:
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=colour, outline=(0, 0, 0), width=2)
    elif shape == "square":
        d.rectangle(box, fill=colour, outline=(0, 0, 0), width=2)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour, outline=(0, 0, 0))


def _square_crop(img, size: int):
    w, h = img.size
    s = min(w, h)
    return img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))


def scene(rng, photos, image_size: int, max_shapes: int = 2, min_side: float = 0.2, max_side: float = 0.5,
          grid: int = 0):
    """One picture: a random photo with 1..``max_shapes`` shapes drawn on it, kept apart. Returns
    ``(image, label, box)`` for one of the shapes (the others are distractors). With ``grid`` > 0,
    each shape fills one cell of a ``grid`` x ``grid`` layout instead of a random square."""
    img = photos[rng.randrange(len(photos))].copy()
    objs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], k=rng.randint(1, max_shapes))
    placed, cell = [], image_size // grid if grid else 0
    for colour, shape in objs:
        for _ in range(20):  # keep shapes apart so each box is unambiguous
            if grid:
                c, r = rng.randrange(grid), rng.randrange(grid)
                box = (c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1)
            else:
                side = rng.randrange(int(image_size * min_side), int(image_size * max_side))
                x0, y0 = rng.randrange(0, image_size - side), rng.randrange(0, image_size - side)
                box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for _, b in placed):
                break
        placed.append(((colour, shape), box))
        _draw(img, shape, COLOURS[colour], box)
    (colour, shape), box = placed[rng.randrange(len(placed))]
    return img, f"{colour} {shape}", box


def photos(image_size: int) -> list:
    from .assets import real_images

    return [_square_crop(im, image_size) for im in real_images().values()]


def make_grounding_dataset(out_dir, n_train: int = 64, n_eval: int = 16, bins: int = 16, seed: int = 0,
                           image_size: int = 224, text_only: int = 0, max_shapes: int = 2,
                           min_side: float = 0.2, max_side: float = 0.5, grid: bool = False) -> dict:
    """Write ``train.json``, ``eval.json`` (LLaVA format) and ``images/`` under ``out_dir``.

    Returns ``{"train", "eval", "image_folder", "tokens"}`` (paths, and the token list to graft).
    ``text_only`` adds that many image-free samples to train (they ask for the token format).
    Each image holds 1..``max_shapes`` shapes (the others are distractors of another colour/shape)
    with sides between ``min_side`` and ``max_side`` of the image, or, with ``grid``, each filling
    one cell of the ``bins`` x ``bins`` location grid. Deterministic in ``seed``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pics = photos(image_size)
    rng = random.Random(seed)

    def sample(i: int, split: str) -> dict:
        img, label, box = scene(rng, pics, image_size, max_shapes, min_side, max_side, bins if grid else 0)
        name = f"{split}_{i:05d}.jpg"
        img.save(out / "images" / name, quality=90)
        return {"id": f"{split}-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS).format(label)},
            {"from": "gpt", "value": box_answer(label, box, image_size, bins)}]}

    train = [sample(i, "train") for i in range(n_train)]
    for j in range(text_only):
        label = f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
        train.append({"id": f"text-{j}", "conversations": [
            {"from": "human", "value": f"Write an empty-corner box for the {label}."},
            {"from": "gpt", "value": box_answer(label, (0, 0, 1, 1), image_size, bins)}]})
    evals = [sample(i, "eval") for i in range(n_eval)]
    paths = {"train": out / "train.json", "eval": out / "eval.json", "image_folder": out / "images"}
    for key, rows in (("train", train), ("eval", evals)):
        tmp = paths[key].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        tmp.replace(paths[key])
    return {**paths, "tokens": grounding_tokens(bins)}
