"""Score grounding answers: exact match of the token sequence, per-token accuracy, box IoU."""
from __future__ import annotations

import re
from pathlib import Path

import torch

LOC = re.compile(r"<loc_(\d+)>")


def box_of(text: str, bins: int, size: int) -> tuple[float, float, float, float] | None:
    """The pixel box (x0, y0, x1, y1) that four ``<loc_i>`` tokens inside ``<box>..</box>`` name."""
    inside = text.split("<box>", 1)[-1].split("</box>", 1)[0] if "<box>" in text else ""
    v = [int(x) for x in LOC.findall(inside)]
    if len(v) != 4:
        return None
    cell = size / bins
    x0, y0, x1, y1 = v
    return (x0 * cell, y0 * cell, (x1 + 1) * cell, (y1 + 1) * cell)


def iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(pred_ids: list[int], ref_ids: list[int], pred_text: str, ref_text: str, bins: int, size: int) -> dict:
    n = len(ref_ids)
    same = sum(1 for i in range(n) if i < len(pred_ids) and pred_ids[i] == ref_ids[i])
    return {"exact": float(pred_ids[:n] == ref_ids), "token_acc": same / max(n, 1),
            "iou": iou(box_of(pred_text, bins, size), box_of(ref_text, bins, size))}


def chance_iou(records, bins: int, size: int) -> float:
    """IoU of always answering the training set's average box: the bar a blind model clears."""
    boxes = [box_of(r["conversations"][-1]["value"], bins, size) for r in records]
    boxes = [b for b in boxes if b]
    mean = tuple(sum(b[i] for b in boxes) / len(boxes) for i in range(4))
    return sum(iou(mean, b) for b in boxes) / len(boxes)


@torch.no_grad()
def answer(model, processor, prompt: str, image, max_new_tokens: int = 16) -> list[int]:
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    tok = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def draw_predictions(items, path, size: int, bins: int) -> Path:
    """A grid of images with the reference box (green) and the predicted box (red)."""
    from PIL import Image, ImageDraw

    cols = min(4, len(items))
    rows = (len(items) + cols - 1) // cols
    grid = Image.new("RGB", (cols * size, rows * (size + 18)), "white")
    for k, (img, ref_text, pred_text, label) in enumerate(items):
        im = img.convert("RGB").resize((size, size))
        d = ImageDraw.Draw(im)
        for text, colour in ((ref_text, (0, 200, 0)), (pred_text, (255, 0, 0))):
            b = box_of(text, bins, size)
            if b:
                d.rectangle(b, outline=colour, width=3)
        x, y = (k % cols) * size, (k // cols) * (size + 18)
        grid.paste(im, (x, y))
        ImageDraw.Draw(grid).text((x + 4, y + size + 3), label, fill=(0, 0, 0))
    grid.save(path)
    return Path(path)
