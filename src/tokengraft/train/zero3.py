"""DeepSpeed ZeRO-3 (`--deepspeed ds.json`) training of new rows, through the Trainer's integration.

ZeRO-3 partitions *every* parameter: outside a module's own forward, a parameter is an empty
placeholder. That breaks new-row training in three places, each handled here:

* the new-row deltas (``tokengraft_rows``) are used in forward hooks of the embedding and head,
  not in a forward of their own, so ZeRO-3 would never gather them: they are registered as
  *external parameters* of those two modules (gathered whenever the module runs, forward and
  backward);
* code that reads rows (row norms in the logs, the effective rows at save) would see empty
  tensors: the base rows of the new tokens and the base rows' mean norm are read once, before
  DeepSpeed partitions the model (rows mode freezes them, so they never change), and only the
  k x hidden deltas are gathered afterwards, never the vocabulary x hidden matrices;
* the optimizer state lives in DeepSpeed's flat fp32 partitions: checkpoints get DeepSpeed's own
  files (``global_stepN/``, consolidated by its ``zero_to_fp32``) *and* the one-process
  ``optimizer.pt``, gathered, so a single process can resume a ZeRO-3 checkpoint exactly.

Only what was verified here is accepted (stage 3, fp32, no offload, tokengraft's own optimizer and
scheduler, mode rows); everything else is refused in one line before anything is written.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..files import read_json
from .config import TrainError

STAGE = 3
# keys DeepSpeed would use to replace what tokengraft sets itself (per-group LR for the new rows,
# --scheduler); "auto" values in the rest are filled in by transformers from the run's flags
OWN = ("optimizer", "scheduler")
PRECISION = ("fp16", "bf16", "amp")
BATCH = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def read_config(path) -> dict:
    """The DeepSpeed JSON, checked against what this module verified; one-line errors otherwise."""
    p = Path(path)
    d = read_json(p, "a DeepSpeed JSON config (--deepspeed)", error=TrainError, kind=dict)
    zero = d.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage != STAGE:
        raise TrainError(f"deepspeed {p}: zero_optimization.stage is {stage!r}; only stage 3 is verified here "
                         f"(for replicated rows use plain torchrun, i.e. DDP)")
    for key in ("offload_param", "offload_optimizer"):
        dev = (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key), (dict, type(None))) else "?"
        if dev not in ("none", None):
            raise TrainError(f"deepspeed {p}: zero_optimization.{key} device {dev!r} is not verified here; "
                             f"remove {key} (the new rows' optimizer state is only k x hidden)")
    for key in OWN:
        if key in d:
            raise TrainError(f"deepspeed {p}: remove {key!r}; tokengraft builds the {key} itself (--lr, --rows-lr, "
                             f"--scheduler), so the new rows keep their own learning rate")
    for key in BATCH:
        if key in d and d[key] != "auto":
            raise TrainError(f"deepspeed {p}: set {key} to \"auto\"; tokengraft fills it from --batch-size, "
                             f"--grad-accum and the process count")
        d[key] = "auto"
    # DeepSpeed derives the global batch itself; transformers' "auto" for it counts one process when
    # it fills the config (before the process group exists), which DeepSpeed then rejects
    d.pop("train_batch_size")
    # transformers clips at --max-grad-norm (1.0) in one process; "auto" makes DeepSpeed do the same
    d.setdefault("gradient_clipping", "auto")
    for key in PRECISION:
        if isinstance(d.get(key), dict) and d[key].get("enabled") not in (False, "auto", None):
            raise TrainError(f"deepspeed {p}: {key} is not verified under ZeRO-3 here (fp32 only); "
                             f"remove {key!r} or set \"enabled\": false")
    return d


def check(cfg) -> None:
    """Flag combinations ZeRO-3 is not verified with; called from ``TrainConfig.check``."""
    if cfg.deepspeed is None:
        return
    if cfg.fsdp:
        raise TrainError("--deepspeed and --fsdp both shard the model; pick one")
    if cfg.mode != "rows":
        raise TrainError(f"--deepspeed supports mode rows only (mode {cfg.mode!r} is not verified under ZeRO-3 "
                         f"here); train {cfg.mode} with --fsdp or plain torchrun (DDP), or use --mode rows")
    if cfg.train_projector:
        raise TrainError("--deepspeed: --train-projector is not verified under ZeRO-3; train the projector "
                         "with --fsdp or plain torchrun (DDP)")
    if cfg.bf16:
        raise TrainError("--deepspeed: --bf16 is not verified under ZeRO-3 here (fp32 only); drop --bf16")
    read_config(cfg.deepspeed)


def training_args(cfg, world: int) -> dict:
    """TrainingArguments for ZeRO-3. The caller keeps ``use_cpu`` False: with it, transformers would set
    up accelerate for plain multi-CPU and never enable DeepSpeed (DeepSpeed picks its CPU accelerator
    itself when there is no GPU)."""
    if cfg.deepspeed is None:
        return {}
    if world < 2:
        raise TrainError("--deepspeed partitions across processes: start with torchrun --nproc_per_node N "
                         "(N >= 2) or the deepspeed launcher")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise TrainError("--deepspeed: DeepSpeed is not installed; pip install 'tokengraft[deepspeed]'") from None
    d = read_config(cfg.deepspeed)
    return {"deepspeed": d}


def fix_cpu_state() -> None:
    """On CPU, accelerate (1.15) lets DeepSpeed start its process group but then, finding no GPU
    backend, records one process: every rank would believe it is rank 0 of 1 (all would write the
    run folder, and each would read the whole batch). Give it the process group's real rank and size
    before the Trainer builds its Accelerator (the same way --fsdp corrects accelerate on CPU)."""
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    st = PartialState()
    if not dist.is_initialized() or st.distributed_type != DistributedType.DEEPSPEED:
        return  # require_enabled refuses what is not DeepSpeed
    if st.num_processes != dist.get_world_size():
        st.num_processes = dist.get_world_size()
        st.process_index = dist.get_rank()
        st.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        st.backend = dist.get_backend()


def require_enabled(trainer) -> None:
    """Never train silently without ZeRO-3: accelerate decides from its environment, so check it."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    import torch.distributed as dist

    if not trainer.is_deepspeed_enabled or plugin is None or plugin.zero_stage != STAGE \
            or not dist.is_initialized() or trainer.accelerator.num_processes != dist.get_world_size():
        raise TrainError(f"--deepspeed: accelerate did not enable DeepSpeed ZeRO-3 "
                         f"({trainer.accelerator.state.distributed_type}); train without --deepspeed")


class Zero3Rows:
    """What a ZeRO-3 run knows about its rows without gathering the vocabulary matrices."""

    def __init__(self, model, rows, base_rows: int):
        import deepspeed

        register_external_parameter = deepspeed.zero.register_external_parameter
        self.rows = rows
        with torch.no_grad():  # the model is not partitioned yet: plain tensors
            w_in = model.get_input_embeddings().weight
            self.base = {"embed": w_in[rows.ids].float().clone()}
            if not rows.tied:
                self.base["head"] = model.get_output_embeddings().weight[rows.ids].float().clone()
            self.base_norm = float(w_in[:base_rows].float().norm(dim=1).mean())
        register_external_parameter(model.get_input_embeddings(), rows.embed)
        head = model.get_output_embeddings()
        if head is not None:
            register_external_parameter(head, rows.out_delta)

    def deltas(self) -> dict[str, torch.Tensor]:
        """The k x hidden deltas, whole (a collective: every rank calls this)."""
        import deepspeed

        params = [p for p in (self.rows.embed, self.rows.head) if p is not None]
        with deepspeed.zero.GatheredParameters(params):
            out = {"embed": self.rows.embed.detach().float().clone()}
            if self.rows.head is not None:
                out["head"] = self.rows.head.detach().float().clone()
        return out

    def effective(self) -> dict[str, torch.Tensor]:
        """The new rows as the model sees them (base row + delta), as ``NewRows.effective``."""
        return {k: self.base[k] + v for k, v in self.deltas().items()}

    def row_norms(self) -> dict:
        eff = self.effective()["embed"]
        return {"new_row_norm": float(eff.norm(dim=1).mean()), "base_row_norm": self.base_norm}


def partitioned(model) -> int:
    """How many parameters ZeRO-3 manages (each has a ``ds_id``): the log line that proves it is on."""
    return sum(hasattr(p, "ds_id") for p in model.parameters())


def save_optimizer(trainer, output_dir) -> None:
    """A checkpoint's optimizer: DeepSpeed's own files (``global_stepN/``, frozen weights excluded, so
    ``zero_to_fp32`` yields the trained deltas), plus the one-process ``optimizer.pt`` (whole
    tensors, parameter indices as the one-process optimizer numbers them) and ``scheduler.pt``.
    Every rank calls this (the gathers are collectives); rank 0 writes the whole-tensor files."""
    from deepspeed.utils import safe_get_full_optimizer_state
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    trainer.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    mine = _own_groups(trainer)
    if len(mine) != len(groups):
        raise TrainError(f"--deepspeed: the optimizer has {len(groups)} parameter groups, tokengraft built "
                         f"{len(mine)}; cannot write a one-process optimizer.pt")
    state, i = {}, 0
    step = torch.tensor(float(trainer.state.global_step))
    for g, params in zip(groups, mine):
        g["params"] = list(range(i, i + len(params)))
        for q in params:
            state[i] = {"step": step.clone(),
                        "exp_avg": safe_get_full_optimizer_state(q, "exp_avg").detach().float().cpu().clone(),
                        "exp_avg_sq": safe_get_full_optimizer_state(q, "exp_avg_sq").detach().float().cpu().clone()}
            i += 1
    if trainer.args.should_save:
        tmp = os.path.join(output_dir, OPTIMIZER_NAME + ".tmp")
        torch.save({"state": state, "param_groups": groups}, tmp)
        os.replace(tmp, os.path.join(output_dir, OPTIMIZER_NAME))
        torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))


def _own_groups(trainer) -> list[list]:
    """The parameters of each optimizer group, in the order ``param_groups`` built them."""
    from .params import param_groups

    p, c = trainer.parts, trainer.parts.config
    return [g["params"] for g in param_groups(p.base, p.rows, c.lr, c.weight_decay, c.rows_lr, c.rows_weight_decay)]


@contextlib.contextmanager
def lenient_resume():
    """Checkpoints hold DeepSpeed's state without the frozen weights (exclude_frozen_parameters), but
    the Trainer resumes them with a strict module load, which would ask for every frozen weight. The
    frozen weights come from the base folder anyway, so resume non-strictly, as the Trainer itself
    does for PEFT models; the trained deltas and their moments come from DeepSpeed's partitions."""
    import transformers.trainer as hf_trainer

    strict_load = hf_trainer.deepspeed_load_checkpoint

    def load(model, path, load_module_strict=True):
        # DeepSpeed's engine torch.loads its files with weights_only=False: hand it only files whose
        # every pickled global is known to be inert (read first by the restricted unpickler)
        from ..checkpoint.safe_pickle import check_inert

        for f in sorted(Path(path).glob("global_step*/*.pt")):
            check_inert(f, "give it to DeepSpeed's loader, which runs what a pickle names")
        return strict_load(model, path, load_module_strict=False)

    hf_trainer.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = strict_load


def check_resume(ckpt: Path | None, remapped: bool) -> None:
    """A ZeRO-3 run resumes from DeepSpeed's own files in the checkpoint, for the same token set."""
    if ckpt is None:
        return
    if not list(ckpt.glob("global_step*")):
        raise TrainError(f"--deepspeed --resume: {ckpt} has no DeepSpeed state (global_step*/; it was not written "
                         f"under --deepspeed); resume it without --deepspeed (one process, DDP or --fsdp)")
    if remapped:
        raise TrainError(f"--deepspeed --resume: the token set changed since {ckpt.name}, and DeepSpeed's "
                         f"partitions cannot be remapped; resume without --deepspeed to carry rows by identity")
