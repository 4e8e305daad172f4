"""Write a ZeRO-1/2 checkpoint folder the way DeepSpeed's stage_1_and_2.py lays it out (torch only).

Used two ways: imported by tests/test_deepspeed_partitions.py (stand-in globals for DeepSpeed's
ZeroStageEnum and fragment_address), and run as a script in the cached XTuner venv, where the
real DeepSpeed classes are pickled:  python zero_layout.py STATE.pt OUT WORLD ELASTIC.

Layout (the test's own reading of DeepSpeed, written independently of tokengraft): per param
group, trainable tensors flattened in order, zero-padded at the end to a multiple of 2*world,
cut into `world` equal partitions; fp32 masters saved without the last rank's padding; moments
padded (torch optimizer state_dict) or unpadded per group (elastic).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

GROUPS = [["llm.model.tok_embeddings.weight", "projector.model.0.weight", "llm.output.weight",
           "projector.model.2.weight"],
          ["llm.model.norm.weight", "llm.base_model.model.output.lora_B.default.weight", "projector.model.0.bias",
           "projector.gate"]]


def split(flat: torch.Tensor, world: int) -> tuple[list[torch.Tensor], int]:
    align = 2 * world
    padded = align * math.ceil(flat.numel() / align)
    pad = padded - flat.numel()
    full = torch.cat([flat, flat.new_zeros(pad)])
    size = padded // world
    return [full[r * size:(r + 1) * size].clone() for r in range(world)], pad


def write(state: dict, out: Path, world: int, elastic: bool, stage, address, seed: int = 0) -> dict:
    """``state``: fp32 tensors (also the fp32 masters); returns {name: (master, exp_avg, exp_avg_sq)}."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    truth = {k: (state[k] + 1e-3 * torch.randn(state[k].shape, generator=g),  # master != bf16 module
                 torch.randn(state[k].shape, generator=g), torch.rand(state[k].shape, generator=g))
             for grp in GROUPS for k in grp}
    module = {k: v.to(torch.bfloat16) for k, v in state.items()}
    shapes = [{k: state[k].shape for k in grp} for grp in GROUPS]
    torch.save({"module": module, "param_shapes": shapes, "buffer_names": [], "shared_params": {}, "ds_version": "0.16.2",
                "optimizer": None, "frozen_param_shapes": None}, out / "mp_rank_00_model_states.pt")
    ranks = [{"master": [], "pad": [], "state": {}, "maps": []} for _ in range(world)]
    for gi, grp in enumerate(GROUPS):
        cols = [torch.cat([truth[k][j].reshape(-1) for k in grp]) for j in range(3)]
        parts = [split(c, world) for c in cols]
        pad = parts[0][1]
        size = parts[0][0][0].numel()
        for r, rk in enumerate(ranks):
            m = parts[0][0][r]
            rk["master"].append(m[:size - pad] if r == world - 1 and pad else m)
            rk["pad"].append(pad if r == world - 1 else 0)
            st = {"step": torch.tensor(7.0)}
            for name, (ps, _) in zip(("exp_avg", "exp_avg_sq"), parts[1:]):
                st[name] = ps[r][:size - pad] if elastic and r == world - 1 and pad else ps[r]
            rk["state"][gi] = st
            maps, o = {}, 0
            for k in grp:
                n = state[k].numel()
                a, b = max(o, r * size), min(o + n, (r + 1) * size)
                if a < b:
                    maps[k] = address(numel=b - a, start=a - r * size)
                o += n
            rk["maps"].append(maps)
    for r, rk in enumerate(ranks):
        if elastic:
            base = [rk["state"][gi] for gi in range(len(GROUPS))]
        else:
            base = {"state": rk["state"], "param_groups": [{"lr": 2e-4, "weight_decay": wd, "params": [gi]}
                                                           for gi, wd in enumerate((0.0, 0.01))]}
        osd = {"loss_scaler": None, "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
               "base_optimizer_state": base, "single_partition_of_fp32_groups": rk["master"],
               "zero_stage": stage, "group_paddings": rk["pad"], "partition_count": [world] * len(GROUPS),
               "ds_version": "0.16.2", "param_slice_mappings": rk["maps"]}
        torch.save({"optimizer_state_dict": osd, "ds_config": {"zero_optimization": {"stage": 2}},
                    "ds_version": "0.16.2"}, out / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return truth


if __name__ == "__main__":  # in the XTuner venv: DeepSpeed's own classes in the pickles
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    st = torch.load(sys.argv[1], weights_only=True)
    truth = write(st, Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", ZeroStageEnum.gradients,
                  fragment_address)
    torch.save(truth, Path(sys.argv[2]).parent / "truth.pt")
