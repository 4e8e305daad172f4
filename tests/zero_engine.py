"""Real DeepSpeed (CPU, gloo, 2 ranks) saves a ZeRO-2 (ZERO_STAGE=3: ZeRO-3) checkpoint and loads a converted one; run in
the cached XTuner venv:  python zero_engine.py save|load ROWS CKPT_DIR DUMP.pt
Each phase dumps, from rank 0, every parameter's full fp32 master and Adam moments as DeepSpeed's
own accessors (safe_get_full_fp32_param / safe_get_full_optimizer_state) see them."""
from __future__ import annotations

import os
import sys

import torch
import torch.multiprocessing as mp

WORLD, H = 2, 4


class Tiny(torch.nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(rows, H)
        self.model.gate = torch.nn.Parameter(torch.randn(3))  # odd size: alignment padding
        self.lm_head = torch.nn.Linear(H, rows, bias=False)

    def forward(self, x):
        return self.lm_head(self.model.embed_tokens(x) * self.model.gate.sum())


def run(rank: int, phase: str, rows: int, ckpt: str, dump: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    torch.manual_seed(0)
    m = Tiny(rows)
    cfg = {"train_batch_size": WORLD, "zero_optimization": {"stage": int(os.environ.get("ZERO_STAGE", "2"))}, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    eng, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    if phase == "save":
        for step in range(2):
            loss = eng(torch.tensor([[rank + 1, rows - 1 - step]])).float().pow(2).mean()
            eng.backward(loss)
            eng.step()
        eng.save_checkpoint(ckpt, tag="global_step2")
    else:
        eng.load_checkpoint(ckpt, tag="global_step2", load_optimizer_states=True)
        eng.optimizer._lazy_init_hp_params_optimizer_state()  # DeepSpeed links the moments on the next step
    out = {}
    for name, p in eng.module.named_parameters():
        out[name] = (safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone(),
                     safe_get_full_optimizer_state(p, "exp_avg_sq").clone())
    if rank == 0:
        torch.save(out, dump)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    phase, rows, ckpt, dump = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    mp.spawn(run, args=(phase, rows, ckpt, dump), nprocs=WORLD, join=True)
