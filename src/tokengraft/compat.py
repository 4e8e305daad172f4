"""Every difference between the transformers versions tokengraft runs under, in one place.

The core commands (add, convert, doctor, export, import-xtuner, the Python API, ``xtuner_helper``)
run under transformers 4.48 (XTuner 0.2.0's pin) up to current 5.x; ``train`` and ``demo`` need
``TRAIN_NEEDS``. Code elsewhere asks this module instead of testing versions or catching
``TypeError`` itself. Reads the installed version from package metadata: importing this module
loads neither torch nor transformers.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import metadata

from .errors import TokengraftError

DTYPE_KWARG_SINCE = (4, 56)  # from_pretrained(dtype=...); before: torch_dtype= (transformers PR #39782)
TRAIN_NEEDS = (5, 24)        # train/demo: the Trainer, tokenizer and processor API they were tested with


class VersionError(TokengraftError):
    """The installed transformers is too old for what was asked."""


def _parse(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


@lru_cache(maxsize=1)
def transformers_version() -> tuple[int, ...]:
    """(major, minor, patch) of the installed transformers; (0,) when it is not installed."""
    try:
        return _parse(metadata.version("transformers"))
    except metadata.PackageNotFoundError:
        return (0,)


def _text(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def dtype_kwargs(dtype) -> dict:
    """The keyword ``from_pretrained`` takes for the weights' dtype: ``dtype`` (>= 4.56) or
    ``torch_dtype`` (older; 4.48 passes an unknown ``dtype`` on to the model's __init__ and fails)."""
    return {"dtype" if transformers_version() >= DTYPE_KWARG_SINCE else "torch_dtype": dtype}


def require(needed: tuple[int, ...], what: str) -> None:
    """One line when ``what`` needs a newer transformers than the installed one."""
    have = transformers_version()
    if have < needed:
        raise VersionError(f"{what} needs transformers >= {_text(needed)}, this environment has "
                           f"{_text(have)}; run it in an environment with `pip install 'transformers>="
                           f"{_text(needed)}'` (the other commands work here)")


def check_readable(folder) -> None:
    """Refuse, in one line, a folder this (4.x) transformers would read differently from the
    transformers 5 that wrote it (rope only in ``rope_parameters``: rope_theta 10,000, silently; a
    tokenizer class 4.x lacks ...): loading and saving it here would write the misreading back.
    Under transformers 5 every supported folder reads as written: nothing to check."""
    if transformers_version() >= (5, 0):
        return
    from .portable import misreadings  # stdlib only; the one list of what old readers misread

    found = misreadings(folder)
    if found:
        raise VersionError(f"{folder}: written by transformers 5 for transformers 5 only ({found[0]}"
                           f"{f'; and {len(found) - 1} more' if len(found) > 1 else ''}); this environment has "
                           f"transformers {_text(transformers_version())}: make the folder portable first with "
                           f"`tokengraft export {folder} -o DST` where transformers >= 5 is installed, then use DST")


def set_image_token_id(config, token_id: int) -> None:
    """A LLaVA config's image placeholder id. Llava's real field is ``image_token_index`` in every
    version (5.x maps ``image_token_id`` onto it; in 4.x that name would be a stray attribute the
    model never reads); configs that only know ``image_token_id`` get that."""
    setattr(config, "image_token_index" if hasattr(config, "image_token_index") else "image_token_id", token_id)


def llava_parts(model) -> dict:
    """A ``LlavaForConditionalGeneration``'s modules under one set of names: ``text`` (the decoder
    without its head), ``lm_head``, ``vision_tower``, ``projector``. transformers 5 nests them in
    ``model.model`` with the head outside; 4.x keeps a whole causal LM in ``model.language_model``."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):  # transformers >= 4.52 / 5
        return {"text": inner.language_model, "lm_head": model.lm_head, "vision_tower": inner.vision_tower,
                "projector": inner.multi_modal_projector}
    lm = model.language_model  # 4.48: LlavaForConditionalGeneration.language_model is a ...ForCausalLM
    return {"text": lm.model, "lm_head": lm.lm_head, "vision_tower": model.vision_tower,
            "projector": model.multi_modal_projector}


def resize_rows(model, rows: int) -> None:
    """``resize_token_embeddings(rows)`` without transformers' mean-and-noise start: tokengraft
    initializes every new row itself. 4.48's ``LlavaForConditionalGeneration`` has no
    ``mean_resizing`` argument (its language model then starts the rows at the mean; they are
    overwritten all the same)."""
    import inspect

    takes = "mean_resizing" in inspect.signature(model.resize_token_embeddings).parameters
    model.resize_token_embeddings(rows, **({"mean_resizing": False} if takes else {}))


def set_config_dtype(config, dtype) -> None:
    """The dtype a config records: ``config.dtype`` (>= 4.56) or ``config.torch_dtype`` (older, where
    a ``dtype`` attribute would be a stray torch.dtype that config.json cannot hold)."""
    setattr(config, "dtype" if transformers_version() >= DTYPE_KWARG_SINCE else "torch_dtype", dtype)
