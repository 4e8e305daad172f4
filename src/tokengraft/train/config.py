"""``TrainConfig``: every key of CONFIG.yaml (and a --flag of `tokengraft train`), and its validation.

Validation runs before anything touches the output folder, so a bad argument (``--lr nan``,
``max_steps: "lots"``, a missing data file) leaves nothing behind that would block a rerun.
Types are checked when the config is built (:meth:`TrainConfig.from_dict`), values and paths by
:meth:`TrainConfig.check`; both raise one-line :class:`TrainError`s naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from ..errors import TokengraftError
from ..files import out_of_range
from ..init import FOR_GRAFT as INIT_METHODS  # train grafts: "zero" is for conversion only
from ..manifest import MAX_PAD_MULTIPLE
from .data import TEMPLATES
from .params import MODES


class TrainError(TokengraftError):
    pass


@dataclass
class TrainConfig:
    """Every key of CONFIG.yaml (and a --flag of `tokengraft train`)."""
    model: str = ""  # base model folder (causal LM or LLaVA)
    data: str = ""  # LLaVA JSON/JSONL
    output_dir: str = ""  # the run folder
    image_folder: str | None = None
    eval_data: str | None = None  # held-out LLaVA JSON/JSONL for generation eval
    eval_holdout: int = 0  # without eval_data: hold out this many training records for eval
    tokens: list | str | None = None  # list, comma-separated, or "from-data PATTERN"
    tokens_file: str | None = None
    init: str | None = None  # override every token's init (auto, mean, hewitt, subword, ...)
    pad_to_multiple_of: int = 64
    mode: str = "rows"
    template: str = "tokenizer"
    train_on: str = "assistant"  # or "all"
    max_length: int = 2048
    max_steps: int = 100
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    rows_lr: float | None = None  # new rows' own LR (default: lr)
    rows_weight_decay: float | None = None  # new rows' own WD (default: 0)
    scheduler: str = "constant"
    warmup_steps: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list | None = None
    train_projector: bool = False
    train_vision: bool = False
    logging_steps: int = 5
    save_steps: int = 50
    save_total_limit: int | None = None
    eval_steps: int = 0  # 0: generation eval only at the end
    eval_max_new_tokens: int = 32
    seed: int = 0
    bf16: bool = False
    resume: bool | str = False  # True: latest checkpoint in output_dir; or a checkpoint folder
    overwrite: bool = False
    allow_text_tags: bool = False
    allow_missing_tokens: bool = False
    preflight_only: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps, as if interrupted
    progress: bool = True
    tensorboard: bool = True
    workers: int = 0
    fsdp: bool = False  # shard with torch FSDP2 (under torchrun); every mode
    deepspeed: str | None = None  # DeepSpeed ZeRO-3 JSON config (under torchrun); rows mode only

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
        """Build from a YAML mapping / flags; unknown keys and wrongly typed values are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(str(k) for k in set(d) - names)
        if bad:
            raise TrainError(f"{where}: unknown key(s) {', '.join(bad)}; see `tokengraft train --help`")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k], where) for k, v in d.items()})

    def check(self) -> None:
        """Values and paths; called by ``train`` before it reads the model or writes anything."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # the Python API skips from_dict: check types here too
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name], "config"))
        for key in ("model", "data", "output_dir"):
            if not getattr(self, key):
                raise TrainError(f"no {key}: set `{key}:` in the config or pass --{_flag(key)}")
        _choice("mode", self.mode, MODES)
        _choice("train_on", self.train_on, ("assistant", "all"))
        _choice("template", self.template, TEMPLATES)
        if self.init is not None and self.init.split(":")[0] not in INIT_METHODS:
            raise TrainError(f"init {self.init!r}: expected one of {', '.join(INIT_METHODS)} (copy:TOKEN)")
        for key, (lo, hi, above) in RANGES.items():
            v = getattr(self, key)
            problem = None if v is None else out_of_range(v, base_type(hints[key]), lo, hi, above=above)
            if problem:
                raise TrainError(f"{key} {v}: {problem} (--{_flag(key)})")
        if not 0 <= self.lora_dropout < 1:
            raise TrainError(f"lora_dropout {self.lora_dropout}: expected 0 <= p < 1 (--lora-dropout)")
        if self.lora_targets is not None and not all(isinstance(t, str) and t for t in self.lora_targets):
            raise TrainError(f"lora_targets {self.lora_targets!r}: expected a list of module names (strings) "
                             f"(--lora-targets q_proj,v_proj)")
        if isinstance(self.tokens, list) or self.tokens_file:  # the tokens-file schema, before any model loads
            from ..tokenspec import parse_tokens

            if self.tokens_file:
                _file("tokens_file", self.tokens_file)
            parse_tokens(self.tokens if isinstance(self.tokens, list) else None, self.tokens_file)
        _folder("model", self.model)
        _file("data", self.data)
        if self.image_folder is not None:
            _folder("image_folder", self.image_folder)
        for key in ("eval_data", "tokens_file"):
            if getattr(self, key) is not None:
                _file(key, getattr(self, key))
        if isinstance(self.resume, str) and self.resume not in RESUME_LATEST:
            _folder("resume", self.resume)
        if self.deepspeed is not None:
            _file("deepspeed", self.deepspeed)  # its contents: zero3.check, called by train() next


# every number of the config: (low, high, low excluded); the flags use the same (commands/train.py)
_STEPS = 10**9
RANGES = {
    "max_steps": (1, _STEPS, False), "batch_size": (1, 1 << 20, False), "grad_accum": (1, 1 << 20, False),
    "max_length": (1, 1 << 24, False), "pad_to_multiple_of": (1, MAX_PAD_MULTIPLE, False),
    "lora_r": (1, 1 << 16, False), "logging_steps": (1, _STEPS, False), "save_steps": (1, _STEPS, False),
    "eval_max_new_tokens": (1, 1 << 20, False), "eval_holdout": (0, _STEPS, False),
    "warmup_steps": (0, _STEPS, False), "eval_steps": (0, _STEPS, False), "workers": (0, 1024, False),
    "save_total_limit": (1, 10**6, False), "stop_after": (1, _STEPS, False), "seed": (0, 2**32 - 1, False),
    # Adam steps move a weight by about lr: above 10 nothing trains, it diverges
    "lr": (0, 10, True), "rows_lr": (0, 10, True), "lora_alpha": (0, 10**5, True),
    "weight_decay": (0, 10, False), "rows_weight_decay": (0, 10, False), "lora_dropout": (0, 1, False),
}


def base_type(tp):
    """int / float of an ``int | None`` hint."""
    return next((a for a in typing.get_args(tp) or (tp,) if a is not type(None)), tp)


RESUME_LATEST = ("true", "True", "1", "latest")  # --resume spellings meaning "the newest checkpoint"


def _flag(key: str) -> str:
    return key.replace("_", "-")


def _choice(key: str, v, allowed) -> None:
    if v not in allowed:
        raise TrainError(f"{key} {v!r}: expected one of {', '.join(allowed)} (--{_flag(key)})")


def _folder(key: str, p) -> None:
    if not Path(p).is_dir():
        what = "not a folder" if Path(p).exists() else "no such folder"
        raise TrainError(f"{key} {p}: {what} (--{_flag(key)})")


def _file(key: str, p) -> None:
    if not Path(p).is_file():
        what = "not a file" if Path(p).exists() else "no such file"
        raise TrainError(f"{key} {p}: {what} (--{_flag(key)})")


def _coerce(key: str, v, tp, where: str):
    """``v`` as the field's type, or a one-line error naming the key and the expected type. YAML
    reads ``1e-3`` (no dot) as a string, so numbers written as strings are accepted when they parse."""
    if v is None:
        if type(None) in typing.get_args(tp):
            return None
        raise TrainError(f"{where}: {key} is empty; expected {_name(tp)}")
    allowed = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if any(a in (list, str) and isinstance(v, a) for a in allowed):
        return v
    if bool in allowed:
        if isinstance(v, bool):
            return v
        if str in allowed:  # resume: True or a checkpoint folder
            return str(v)
    elif int in allowed:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
            return int(v)
    elif float in allowed:
        f = _as_float(v)
        if f is not None:
            if not math.isfinite(f):
                raise TrainError(f"{where}: {key} {v!r}: expected a finite number")
            return f
    elif list in allowed and isinstance(v, tuple):
        return list(v)
    raise TrainError(f"{where}: {key} {v!r}: expected {_name(tp)}")


def _as_float(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in typing.get_args(tp) or [tp]
                       if a is not type(None))
