"""transformers.Trainer wiring: graft first, then wrap, so DDP/FSDP/DeepSpeed come from the engines.

``train(TrainConfig(...))`` runs one SFT job and returns the run folder. Under ``torchrun`` every
process runs the same function; transformers/accelerate handle the process group (gloo on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from ..graft import graft, parse_tokens
from ..hf import image_token_id as image_token_id_of
from ..io import load_folder
from ..manifest import Manifest
from ..vocab import RowMap, fingerprint, vocab_of
from .config import RESUME_LATEST, TrainConfig, TrainError
from .data import Collator, LlavaDataset, image_token_count, load_records, renderer
from .metrics import (
    MetricsWriter,
    generation_eval,
    plot,
    row_norms,
    summarize,
    token_stats,
)
from .params import NewRows, full, param_groups, prepare, trained_tokens
from .preflight import PreflightError, preflight, tokens_from_data
from .callbacks import (CtrlC, Diverged, Monitor, RemapMoments, StopAfter, _rank, _world, diverged, on_ctrl_c,
                        peak_memory)
from .resume import check_checkpoint
from .run import (RunInfo, check_base_weights, gather_parts, last_checkpoint, resume_parts, save_parts,
                  weights_fingerprint)
from .runfolder import prepare_run_folder
from . import zero3


@dataclass
class RunParts:
    """What the trainer needs beyond transformers' own state: the grafted model and its trained parts."""
    config: TrainConfig
    base: torch.nn.Module  # the grafted transformers model (not PEFT-wrapped)
    rows: NewRows
    info: RunInfo
    manifest: Manifest
    tokenizer: Any
    processor: Any
    is_new: torch.Tensor  # bool over vocabulary rows: which labels are new tokens
    base_rows: int  # the base vocabulary's length (row-norm metric)
    log: Callable
    remap: RowMap | None = None  # set on resume when the token set changed since the checkpoint
    zero3: Any = None  # zero3.Zero3Rows under --deepspeed


class GraftTrainer(Trainer):
    """Trainer that computes its own loss (with new-token sums), builds per-group optimizers, and
    saves/loads only the trained parts."""

    def __init__(self, *a, parts: RunParts, **kw):
        super().__init__(*a, **kw)
        self.parts = parts
        self.model_accepts_loss_kwargs = True  # have the Trainer count label tokens over the global batch
        self.loss_is_scaled_for_ga = True  # our loss is a sum / global token count
        self._sums: dict | None = None

    def create_accelerator_and_postprocess(self):
        """accelerate turns FSDP on for GPU-like devices only; on CPU (gloo) it would silently train
        with DDP instead, so --fsdp switches its state to FSDP2 itself (the same plugin the Trainer built)."""
        if self.args.deepspeed is not None:  # CPU: accelerate records one process (zero3.fix_cpu_state)
            zero3.fix_cpu_state()
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            if state.distributed_type != DistributedType.MULTI_CPU:
                raise TrainError(f"--fsdp: accelerate did not enable FSDP on {state.distributed_type}; "
                                 f"train without --fsdp")
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True
        if self.args.deepspeed is not None:
            zero3.require_enabled(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        total, sums = token_stats(out.logits, labels, self.parts.is_new.to(labels.device))
        denom = num_items_in_batch if num_items_in_batch is not None else sums["n"].clamp(min=1)
        loss = total / denom
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if self._sums is None:
            self._sums = {k: torch.zeros((), dtype=torch.float64) for k in sums}
        for k, v in sums.items():
            self._sums[k] += v.detach().double().cpu()
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Before the optimizer step, so nothing non-finite is applied or saved; every process learns
        of a non-finite loss on any of them (one that stopped alone would leave the others waiting)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = (~torch.isfinite(loss.detach())).any().float()
        if _world() > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)
        if bad.item():
            mine = not torch.isfinite(loss.detach()).all()
            raise diverged(self.parts, self.state.global_step + 1,
                           f"the loss is {float(loss)}" if mine else "another process's loss is not finite")
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._sums is not None:
            sums = self._sums
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                vec = torch.stack([sums[k] for k in sorted(sums)])
                torch.distributed.all_reduce(vec)
                sums = dict(zip(sorted(sums), vec))
            logs.update(summarize(sums))
            z = self.parts.zero3  # ZeRO-3: gather the k x hidden deltas only, never the matrices
            logs.update(z.row_norms() if z else row_norms(self.parts.base, self.parts.rows, self.parts.base_rows))
            logs.update(peak_memory())
            self._sums = None
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            p = self.parts
            c = p.config
            groups = param_groups(p.base if c.mode != "lora" else self.model, p.rows, c.lr, c.weight_decay,
                                  c.rows_lr, c.rows_weight_decay)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def save_model(self, output_dir=None, _internal_call=False):
        """The run's trained parts instead of a full model (checkpoints call this too). Under FSDP
        every rank gathers the sharded parts (collectives, one tensor at a time) and rank 0 alone
        keeps and writes them."""
        p = self.parts
        if p.zero3 is not None:  # ZeRO-3: every rank gathers the deltas, rank 0 writes (rows mode)
            rows = p.zero3.effective()
            if self.args.should_save:
                save_parts(output_dir or self.args.output_dir, self.model, p.base, p.rows, p.info, p.manifest,
                           p.tokenizer, p.processor, gathered={"rows": rows})
            return
        gathered = gather_parts(self.model, p.base, p.rows, p.info, keep=self.args.should_save) \
            if p.config.fsdp else None
        if self.args.should_save:
            save_parts(output_dir or self.args.output_dir, self.model, p.base, p.rows, p.info, p.manifest,
                       p.tokenizer, p.processor, gathered=gathered)

    def _save_optimizer_and_scheduler(self, output_dir):
        """Under FSDP: the optimizer state gathered into the single-process ``optimizer.pt`` format
        (parameter indices, whole tensors), so an FSDP checkpoint resumes under FSDP and in one
        process alike; transformers' own FSDP save would also write the whole model."""
        if self.parts.zero3 is not None:
            return zero3.save_optimizer(self, output_dir)
        if not self.parts.config.fsdp:
            return super()._save_optimizer_and_scheduler(output_dir)
        sd = self.optimizer.state_dict()
        state = {i: {k: full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in sd["state"][i].items()}
                 for i in sorted(sd["state"])}
        if self.args.should_save:
            tmp = os.path.join(output_dir, OPTIMIZER_NAME + ".tmp")
            torch.save({"state": state, "param_groups": sd["param_groups"]}, tmp)
            os.replace(tmp, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Under FSDP: read the whole-tensor ``optimizer.pt`` and shard each moment like its parameter."""
        if not self.parts.config.fsdp or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.tensor import DTensor, distribute_tensor

        sd = torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
        params = [q for g in self.optimizer.param_groups for q in g["params"]]
        for i, st in sd["state"].items():
            q = params[int(i)]
            for k, v in st.items():
                if isinstance(q, DTensor) and torch.is_tensor(v) and v.shape == q.shape:
                    st[k] = distribute_tensor(v.to(q.dtype), q.device_mesh, q.placements)
        self.optimizer.load_state_dict(sd)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    # Kept private on purpose: transformers has no public hook for loading a checkpoint's weights, and
    # its default looks for a full model (or a bare PEFT adapter) in the folder, while ours holds only
    # the trained parts, possibly for another token set (remapped by identity in resume_parts).
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        p = self.parts
        if p.config.fsdp:
            return  # loaded into the unsharded model before training (see train())
        p.remap = resume_parts(resume_from_checkpoint, self.model, p.base, p.rows, p.info, log=p.log)


def resolve_tokens(cfg: TrainConfig, records) -> list:
    """The token specs: a list, a comma-separated string, ``from-data PATTERN``, and/or a file."""
    toks = cfg.tokens
    if isinstance(toks, str) and toks.strip().startswith("from-data"):
        pattern = toks.strip()[len("from-data"):].strip()
        if not pattern:
            raise TrainError("--tokens from-data needs a pattern, e.g. --tokens \"from-data <loc_\\d+>|</?box>\"")
        toks = tokens_from_data(records, pattern)
    specs = parse_tokens(toks, cfg.tokens_file)
    if not specs:
        raise TrainError("no tokens: pass --tokens (a list, or from-data PATTERN) or --tokens-file")
    return specs


def _resume_folder(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if isinstance(cfg.resume, str) and cfg.resume not in RESUME_LATEST:
        ckpt = Path(cfg.resume)
    else:
        ckpt = last_checkpoint(cfg.output_dir)
        if ckpt is None:
            raise TrainError(f"--resume: no complete checkpoint-N folder in {cfg.output_dir}; start without "
                             f"--resume")
    check_checkpoint(ckpt)
    return ckpt


def fsdp_args(cfg: TrainConfig) -> dict:
    """TrainingArguments for FSDP2: each decoder layer and the root are sharded (the root holds the
    embedding, head and the new-row deltas, so FSDP reduces their gradients like any other)."""
    if not cfg.fsdp:
        return {}
    if _world() < 2:
        raise TrainError("--fsdp shards across processes: start with torchrun --nproc_per_node N (N >= 2)")
    return {"fsdp": True, "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                                          "reshard_after_forward": True}}


def _steps_done(ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    return int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])


# pre-flight problem codes a flag lets through
WAIVERS = {"unknown-tags": "allow_text_tags", "tokens-never-appear": "allow_missing_tokens"}


def train(cfg: TrainConfig, log=None) -> Path:
    """Run one SFT job; returns the run folder (see :mod:`tokengraft.train.run` for its layout)."""
    cfg.check()
    if cfg.deepspeed is not None:
        zero3.check(cfg)  # the DeepSpeed config's contents (config.py cannot import zero3: a cycle)
    rank0 = _rank() == 0
    log = log or (print if rank0 else (lambda *a, **k: None))
    run_dir = Path(cfg.output_dir)
    ckpt = _resume_folder(cfg)
    if ckpt is not None:  # before anything is loaded or written: the checkpoint's base is --model's
        check_base_weights(Path(cfg.model), RunInfo.load(ckpt).base_weights, log, what=str(ckpt / "run.json"))
    fsdp_args(cfg)  # refuse --fsdp outside torchrun before anything is written
    zero3.training_args(cfg, _world())  # the same for --deepspeed
    if cfg.deepspeed:
        zero3.check_resume(ckpt, remapped=False)
    if not cfg.preflight_only:
        prepare_run_folder(cfg, resuming=ckpt is not None, clear=False)  # refuse early; changes nothing

    records = load_records(cfg.data)  # data errors before the (slow) model load
    eval_records = load_records(cfg.eval_data) if cfg.eval_data else []
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars on stderr either
    torch.manual_seed(cfg.seed)
    model, tok, proc, manifest0 = load_folder(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else None)
    base_fp = fingerprint(vocab_of(tok))
    base_rows = len(vocab_of(tok))
    if not eval_records and cfg.eval_holdout:
        records, eval_records = records[:-cfg.eval_holdout], records[-cfg.eval_holdout:]
    specs = resolve_tokens(cfg, records)
    if cfg.init:
        for s in specs:
            s.init = cfg.init
    token_dicts = [dataclasses.asdict(s) for s in specs]
    manifest = graft(model, tok, token_dicts, manifest=manifest0, processor=proc,
                     pad_to_multiple_of=cfg.pad_to_multiple_of, log=log)
    new_tokens = trained_tokens(manifest, [s.content for s in specs], log)
    new_ids = tok.convert_tokens_to_ids(new_tokens)
    img_id = image_token_id_of(model) if proc is not None else None
    n_img = image_token_count(proc, img_id) if img_id is not None else 0

    rep = preflight(records + eval_records, tok, new_tokens, image_folder=cfg.image_folder, template=cfg.template,
                    max_length=cfg.max_length, image_token_id=img_id, n_image_tokens=n_img, train_on=cfg.train_on)
    log(rep.format())
    problems = [p for p in rep.problems if not (p.code in WAIVERS and getattr(cfg, WAIVERS[p.code]))]
    if problems:
        raise PreflightError("pre-flight: " + "; ".join(p.message for p in problems))
    if cfg.preflight_only:
        return run_dir

    ds = LlavaDataset(records, tok, proc, cfg.image_folder, cfg.template, cfg.max_length, cfg.train_on,
                      image_token_id=img_id, log=log, encoded=rep.encoded[:len(records)])  # rendered once
    lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": cfg.lora_targets}
    plan = prepare(model, cfg.mode, new_ids, manifest.tied, train_projector=cfg.train_projector,
                   train_vision=cfg.train_vision, lora=lora)
    log(f"mode {cfg.mode}: {plan.trainable:,} trainable of {plan.total:,} parameters "
        f"({len(new_ids)} new rows x {model.get_input_embeddings().weight.shape[1]})")
    info = RunInfo(base_model=str(Path(cfg.model).resolve()), base_vocab_fingerprint=base_fp, mode=cfg.mode,
                   tokens=token_dicts, new_tokens=new_tokens, tied=manifest.tied,
                   pad_to_multiple_of=cfg.pad_to_multiple_of, train_projector=cfg.train_projector,
                   train_vision=cfg.train_vision, lora=lora if cfg.mode == "lora" else {},
                   base_weights=weights_fingerprint(cfg.model))
    if rank0:
        # the first write into the output: everything above has been checked
        prepare_run_folder(cfg, resuming=ckpt is not None, clear=True)
        info.save(run_dir)
        manifest.save(run_dir)
        (run_dir / "config.train.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")

    is_new = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    is_new[torch.tensor(new_ids)] = True
    cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(run_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_steps, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed,
        data_seed=cfg.seed, report_to="none", use_cpu=cpu and not cfg.deepspeed, ddp_backend="gloo" if cpu and _world() > 1 else None,
        dataloader_num_workers=cfg.workers, remove_unused_columns=False, label_names=["labels"],
        disable_tqdm=not (cfg.progress and rank0), bf16=cfg.bf16, ddp_find_unused_parameters=False,
        logging_first_step=True, **{**fsdp_args(cfg), **zero3.training_args(cfg, _world())})
    render = renderer(tok, cfg.template)
    eval_fn = None
    if eval_records and (cfg.fsdp or cfg.deepspeed):
        log(f"--{'fsdp' if cfg.fsdp else 'deepspeed'}: generation eval skipped (one process cannot run a sharded model alone); evaluate the "
            "run folder afterwards, e.g. load it with tokengraft.train.run.load_run")
    elif eval_records:
        eval_fn = functools.partial(generation_eval, plan.model, tok, proc, eval_records, render, new_ids,
                                    image_folder=cfg.image_folder, image_token_id=img_id, n_image_tokens=n_img,
                                    max_new_tokens=cfg.eval_max_new_tokens)
    writer = MetricsWriter(run_dir, cfg.tensorboard) if rank0 else None
    parts = RunParts(config=cfg, base=model, rows=plan.rows, info=info, manifest=manifest, tokenizer=tok,
                     processor=proc, is_new=is_new, base_rows=base_rows, log=log)
    if cfg.deepspeed:  # before DeepSpeed partitions the model (in trainer.train)
        parts.zero3 = zero3.Zero3Rows(model, plan.rows, base_rows)
    callbacks = [Diverged(parts), Monitor(writer, eval_fn, cfg.eval_steps, log), RemapMoments(parts), CtrlC()]
    if cfg.stop_after:
        callbacks.append(StopAfter(cfg.stop_after))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainer = GraftTrainer(model=plan.model, args=args, train_dataset=ds, data_collator=Collator(pad),
                           callbacks=callbacks, parts=parts)
    done = _steps_done(ckpt)
    if (cfg.fsdp or cfg.deepspeed) and ckpt is not None and done < cfg.max_steps:
        # the trained parts go into the model before FSDP/ZeRO-3 shards it (the Trainer loads them after)
        parts.remap = resume_parts(ckpt, plan.model, model, plan.rows, info, log=log)
        if cfg.deepspeed:
            zero3.check_resume(ckpt, remapped=parts.remap is not None)
    if ckpt is not None and done >= cfg.max_steps:
        # transformers would still take one more step here; there is nothing left to train
        log(f"resume: {ckpt.name} is at step {done} >= max_steps {cfg.max_steps}; nothing to train, "
            f"writing its parts (remapped if the tokens changed) as the run's result")
        parts.remap = resume_parts(ckpt, plan.model, model, plan.rows, info, log=log)
    else:
        with zero3.lenient_resume() if cfg.deepspeed else contextlib.nullcontext(), on_ctrl_c():
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if cfg.fsdp:
        from torch.distributed.fsdp import FSDPModule

        log(f"fsdp: {sum(isinstance(m, FSDPModule) for m in plan.model.modules())} FSDP2-sharded modules")
    if cfg.deepspeed:
        log(f"zero3: {zero3.partitioned(plan.model)} ZeRO-3 partitioned parameters "
            f"(stage {zero3.STAGE}, {_world()} processes)")
    trainer.save_model(str(run_dir))
    if rank0:
        plot(run_dir)
        log(f"run folder: {run_dir} (load it with tokengraft.train.run.load_run, or `tokengraft export`)")
    return run_dir
