"""New-token metrics: pure functions on tensors, plus the JSONL/TensorBoard writer and the plot.

The overall loss hides what matters when adding tokens: 20 new tokens are a few percent of the
label positions, so their loss can stall while the total falls. These metrics look at those
positions only.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100


def token_stats(logits: torch.Tensor, labels: torch.Tensor, is_new: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Shifted next-token cross-entropy. Returns (summed loss over label positions, sums):
    ``n``, ``new_loss``, ``new_n``, ``new_correct`` (positions whose label is a new token).
    ``is_new``: bool lookup over the vocabulary rows."""
    lg = logits[:, :-1]
    tgt = labels[:, 1:]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tgt.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view_as(tgt)
    valid = tgt != IGNORE
    new = is_new[tgt.clamp(min=0)] & valid
    with torch.no_grad():
        sums = {"loss": ce.detach()[valid].sum(), "n": valid.sum(), "new_loss": ce.detach()[new].sum(),
                "new_n": new.sum(), "new_correct": (lg.argmax(-1) == tgt)[new].sum()}
    return ce.sum(), sums


def summarize(sums: dict) -> dict:
    """Mean loss, new-token loss and new-token top-1 accuracy from accumulated sums."""
    n, k = float(sums["n"]), float(sums["new_n"])
    out = {"token_loss": float(sums["loss"]) / n if n else float("nan")}
    if k:
        out["new_token_loss"] = float(sums["new_loss"]) / k
        out["new_token_acc"] = float(sums["new_correct"]) / k
    return out


@torch.no_grad()
def row_norms(model, rows_mod, base_rows: int) -> dict:
    """Mean L2 norm of the new (effective, input-side) rows vs the base rows: new rows that grow far
    beyond the base norm dominate the softmax; rows that stay at the mean have not learned."""
    from .params import full

    eff = rows_mod.effective(model)["embed"]
    w = full(model.get_input_embeddings().weight)[:base_rows].float()
    return {"new_row_norm": float(eff.norm(dim=1).mean()), "base_row_norm": float(w.norm(dim=1).mean())}


def precision_recall(generated: list[list[int]], references: list[list[int]], new_ids: set[int]) -> dict:
    """New-token precision and recall over samples (multiset match per sample)."""
    tp = gp = rp = exact = 0
    for g, r in zip(generated, references):
        gc = Counter(t for t in g if t in new_ids)
        rc = Counter(t for t in r if t in new_ids)
        tp += sum((gc & rc).values())
        gp += sum(gc.values())
        rp += sum(rc.values())
        exact += int([t for t in g if t in new_ids] == [t for t in r if t in new_ids])
    n = max(len(references), 1)
    return {"eval_new_precision": tp / gp if gp else 0.0, "eval_new_recall": tp / rp if rp else 0.0,
            "eval_new_exact": exact / n, "eval_samples": len(references)}


@torch.no_grad()
def generation_eval(model, tokenizer, processor, records, render, new_ids, *, image_folder=None,
                    image_token_id=None, n_image_tokens=0, max_new_tokens=32) -> dict:
    """Greedy generation on held-out samples; compare the new tokens with the reference answer."""
    from .data import images_of, prompt_of

    was_training = model.training
    model.eval()
    gens, refs = [], []
    for rec in records:
        prompt, ref = prompt_of(rec, render)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if image_token_id is not None and n_image_tokens > 1:
            ids = [x for t in ids for x in ([t] * n_image_tokens if t == image_token_id else [t])]
        kw = {}
        if images_of(rec) and processor is not None:
            from PIL import Image

            pics = []
            for name in images_of(rec):
                with Image.open(Path(image_folder) / name if image_folder else name) as im:
                    pics.append(im.convert("RGB"))
            kw["pixel_values"] = processor.image_processor(pics, return_tensors="pt")["pixel_values"].to(
                model.device if hasattr(model, "device") else "cpu")
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **kw)
        gens.append(out[0, len(ids):].tolist())
        refs.append(tokenizer(ref, add_special_tokens=False)["input_ids"])
    if was_training:
        model.train()
    return precision_recall(gens, refs, set(new_ids))


class MetricsWriter:
    """Append-only JSONL (one object per log), TensorBoard too when it is installed."""

    def __init__(self, run_dir, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL is the record
                self.tb = None

    def write(self, step: int, values: dict) -> None:
        rec = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()


def read_metrics(path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot(run_dir) -> Path | None:
    """``new_tokens.png``: new-token loss and accuracy, row norms, eval precision/recall by step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return None
    recs = read_metrics(run_dir)
    if not recs:
        return None

    def series(key):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, ax in (("loss", axes[0]), ("new_token_loss", axes[0]), ("new_token_acc", axes[1]),
                    ("eval_new_precision", axes[1]), ("eval_new_recall", axes[1]),
                    ("new_row_norm", axes[2]), ("base_row_norm", axes[2])):
        x, y = series(key)
        if x:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, label=key)
    for ax, title in zip(axes, ("loss", "new tokens: accuracy", "row norms")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "new_tokens.png"
    tmp = out.with_name(".new_tokens.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
