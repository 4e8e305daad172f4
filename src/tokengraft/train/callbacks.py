"""The Trainer callbacks of a run, and the process facts they need (rank, world size, peak memory)."""
from __future__ import annotations

import contextlib
import os
import signal

import torch
from transformers import TrainerCallback

from ..outdir import Terminated, signal_raises
from .metrics import MetricsWriter
from .config import TrainError
from .resume import remap_moments
from .run import last_checkpoint


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def peak_memory() -> dict:
    """Peak memory of every process (MB): CUDA allocations on GPUs, else the process's peak RSS."""
    import resource

    if torch.cuda.is_available():
        mine = torch.cuda.max_memory_allocated() / 2**20
    else:
        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB
    vec = torch.zeros(_world(), dtype=torch.float64)
    vec[_rank()] = mine
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(vec)
    return {f"peak_mem_mb_rank{r}": round(float(v), 1) for r, v in enumerate(vec)}


class RemapMoments(TrainerCallback):
    """On resume after a token change: carry the new rows' Adam moments by token identity, once the
    Trainer has loaded the checkpoint's optimizer state (before the first step)."""

    def __init__(self, parts):  # loop.RunParts
        self.parts = parts

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        if self.parts.remap is not None and optimizer is not None:
            remap_moments(optimizer, self.parts.rows, self.parts.remap)


class CtrlC(TrainerCallback):
    """Ctrl-C and SIGTERM end the run at a step boundary. Ctrl-C raises at once as usual, but Python
    loses a KeyboardInterrupt raised while a ``__del__`` or a weakref callback runs (printed as
    "Exception ignored" and dropped), so the handler installed by :func:`on_ctrl_c` also records it,
    and every step boundary raises what was recorded. SIGTERM is only recorded: the run stops after
    the step in progress (as :class:`~tokengraft.outdir.Terminated`), its checkpoints intact."""

    hit = None  # the exception class to raise at the next step boundary

    def on_substep_end(self, args, state, control, **kw):
        if CtrlC.hit is not None:
            raise CtrlC.hit()

    on_step_end = on_substep_end


@contextlib.contextmanager
def on_ctrl_c():
    """While training: SIGINT raises KeyboardInterrupt and is recorded, SIGTERM is recorded (main
    thread only; a signal the parent ignored stays ignored). Exactly the handlers found before come
    back afterwards."""
    def interrupt():
        CtrlC.hit = KeyboardInterrupt
        return KeyboardInterrupt()

    def terminate():
        CtrlC.hit = CtrlC.hit or Terminated
        return None

    CtrlC.hit = None
    try:
        with signal_raises(signal.SIGINT, interrupt), signal_raises(signal.SIGTERM, terminate):
            yield
    finally:
        CtrlC.hit = None


def diverged(parts, step: int, what: str) -> TrainError:
    """The one-line error of a run that diverged at ``step``, naming the last good checkpoint."""
    c = parts.config
    last = last_checkpoint(c.output_dir)
    keep = (f"the last good checkpoint is {last} (continue from it with --resume {last} and a lower rate)"
            if last else "no checkpoint was written")
    rates = f"--lr {c.lr:g}" + (f", --rows-lr {c.rows_lr:g}" if c.rows_lr is not None else "")
    return TrainError(f"step {step}: {what}; the run diverged: lower the learning rate ({rates}) or the "
                      f"weight decay; {keep}")


class Diverged(TrainerCallback):
    """A run that diverges stops with an error instead of saving NaN: after every optimizer step the
    new rows must be finite, and before each save (and at the last step) every trained weight; a
    non-finite loss is caught by ``GraftTrainer.training_step``. Raised before the step's checkpoint
    is written, so the last one on disk is good. Sharded runs (FSDP, ZeRO-3) check the loss only: a
    check on one shard would stop one process and leave the others waiting."""

    def __init__(self, parts):  # loop.RunParts
        self.parts = parts

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kw):
        p = self.parts
        if p.config.fsdp or p.zero3 is not None:
            return
        for side, w in p.rows.effective(p.base).items():
            bad = ~torch.isfinite(w).all(dim=1)
            if bad.any():
                first = p.info.new_tokens[int(bad.nonzero()[0, 0])]
                raise diverged(p, state.global_step, f"the {'input' if side == 'embed' else 'output'} row of "
                               f"{first!r} and {int(bad.sum()) - 1} other new row(s) hold NaN or inf")
        if model is not None and (control.should_save or state.global_step >= state.max_steps):
            for name, q in model.named_parameters():
                if q.requires_grad and not torch.isfinite(q).all():
                    raise diverged(p, state.global_step, f"the trained weight {name} holds NaN or inf")


class StopAfter(TrainerCallback):
    """Stop with a checkpoint after ``n`` steps: a planned interruption (time-boxed jobs, tests)."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.n:
            control.should_training_stop = True
            control.should_save = True


class Monitor(TrainerCallback):
    """Rank 0: metrics to JSONL/TensorBoard; generation eval at eval steps and at the end."""

    def __init__(self, writer: MetricsWriter | None, eval_fn, eval_steps: int, log=print):
        self.writer, self.eval_fn, self.eval_steps, self.log = writer, eval_fn, eval_steps, log

    def on_log(self, args, state, control, logs=None, **kw):
        if self.writer is not None and state.is_world_process_zero and logs:
            self.writer.write(state.global_step, {k: v for k, v in logs.items() if isinstance(v, (int, float))})

    def _eval(self, state):
        if self.eval_fn is None or not state.is_world_process_zero:
            return
        res = self.eval_fn()
        self.log(f"eval @ step {state.global_step}: new-token precision {res['eval_new_precision']:.3f}, "
                 f"recall {res['eval_new_recall']:.3f}, exact {res['eval_new_exact']:.3f}")
        if self.writer is not None:
            self.writer.write(state.global_step, res)

    def on_step_end(self, args, state, control, **kw):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self._eval(state)

    def on_train_end(self, args, state, control, **kw):
        if not (self.eval_steps and state.global_step % self.eval_steps == 0):
            self._eval(state)
