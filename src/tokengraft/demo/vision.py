"""A vision tower that can see where things are, for the demo's LLaVA.

No package ships CLIP weights offline, and a random CLIP tower hides where a shape is: its position
embeddings start 50x weaker than its patch features, and no readout learns positions from it within
the demo's few hundred samples (docs/demo.md, "Designs tried"). A real LLaVA starts from a
pretrained CLIP; the demo stands in for that with a short pretraining of its small tower on the
same kind of pictures: every image token learns to carry the box of the shape in the picture. The
language model, its tokenizer and the new tokens are not involved: they learn in `tokengraft train`.
"""
from __future__ import annotations

import random
import time


def pretrain_tower(model, processor, steps: int, bins: int, seed: int = 0, batch_size: int = 32,
                   lr: float = 1e-3, log=print) -> float:
    """Train ``model``'s vision tower (in place) so that each image token predicts the bins of the
    box corners of the shape in the picture, with a linear head. The projector's first layer then
    starts from that head (its other units from zero), and its last layer is scaled so that image
    tokens have the norm of the language model's embeddings: the projector starts out passing the
    box on, and `tokengraft train` teaches it and the new rows to put it into words. Returns the
    last 50 steps' box accuracy on the training pictures (fresh ones each step; a different seed
    from the dataset's)."""
    import torch

    from .data import bins_of, photos, scene

    tower = model.model.vision_tower
    size = processor.image_processor.crop_size["height"]
    pics, rng = photos(size), random.Random(10_000 + seed)
    torch.manual_seed(seed)

    def batch():  # fresh pictures, through the LLaVA's own image processor
        imgs, ys = [], []
        for _ in range(batch_size):
            img, _, box = scene(rng, pics, size, max_shapes=1, grid=bins)
            imgs.append(img)
            ys.append(bins_of(box, size, bins))
        return processor.image_processor(imgs, return_tensors="pt")["pixel_values"], torch.tensor(ys)

    def tokens(x):  # what the LLaVA feeds its projector: the chosen layer, without the class token
        hs = tower(x, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        return hs[:, 1:]

    head = torch.nn.Linear(tower.config.hidden_size, 4 * bins)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.0)
    tower.train()
    hits, recent, t0 = [], 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batch()
        logits = head(tokens(x)).view(x.shape[0], -1, 4, bins)
        target = y[:, None].expand(-1, logits.shape[1], -1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, bins), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hits.append(float((logits.mean(1).argmax(-1) == y).all(-1).float().mean()))
        recent = sum(hits[-50:]) / len(hits[-50:])
        if step % max(1, steps // 4) == 0 or step == steps:
            log(f"vision pretraining step {step}/{steps}: loss {loss.item():.3f}, "
                f"box right {recent:.0%} ({time.perf_counter() - t0:.0f} s)")
    tower.eval()
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        proj.linear_1.weight.zero_()
        proj.linear_1.bias.zero_()
        proj.linear_1.weight[:4 * bins] = head.weight
        proj.linear_1.bias[:4 * bins] = head.bias
        x, _ = batch()
        scale = model.get_input_embeddings().weight.norm(dim=-1).mean() / proj(tokens(x)).norm(dim=-1).mean()
        proj.linear_2.weight.mul_(scale)
        proj.linear_2.bias.mul_(scale)
    return recent
