"""``doctor --checkpoint CKPT --model MODEL``: does a training checkpoint's vocabulary fit a model?

A checkpoint saved before tokens were added (an mmengine ``iter_N.pth``, a DeepSpeed folder, a
Trainer ``checkpoint-N``, ...) has fewer embedding/head rows than the grown model. transformers
refuses it with ``size mismatch``; mmengine's ``load_from`` only *warns* and trains on without the
checkpoint's embedding rows. This check reads names and shapes only (no tensor data, no code),
and when the rows differ prints the exact ``tokengraft convert`` command that carries the rows
across by token identity.
"""
from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

from ..checkpoint.layout import classify, infer_rows  # the name/shape rules convert uses
from ..hf import config_rows
from .findings import DoctorError, Finding
from .subject import gather_folder


def suggested_output(ckpt: Path) -> Path:
    """A sibling of the checkpoint, same kind (file suffix kept): iter_4.pth -> iter_4-converted.pth."""
    if ckpt.is_dir():
        return ckpt.with_name(ckpt.name + "-converted")
    return ckpt.with_name(ckpt.stem + "-converted" + ckpt.suffix)


def _model_facts(model: Path) -> tuple[int | None, object, str]:
    """(rows, tokenizer, what the rows come from) of the model folder."""
    if not model.is_dir():
        raise DoctorError(f"{model}: not a folder; --model takes the model folder the checkpoint should be "
                          f"loaded into (its tokenizer and config)")
    with contextlib.ExitStack() as stack:
        s = gather_folder(model, stack)
        if s.rows is not None:
            return s.rows, s.tokenizer, s.emb.name
    rows = config_rows(s.config)
    if rows is not None:
        return rows, s.tokenizer, "config.json vocab_size"
    if s.ntok is not None:
        return s.ntok, s.tokenizer, "len(tokenizer)"
    raise DoctorError(f"{model}: neither weights, a config vocab_size nor a tokenizer say how many rows it has; "
                      f"--model takes a model folder")


def _checkpoint_vocab(info):
    """The checkpoint's own vocabulary (its tokenizer folder), or None when it carries none."""
    if info.tokenizer_dir is None:
        return None
    from ..checkpoint.sources import load_tokenizer
    from ..vocab import vocab_of

    return vocab_of(load_tokenizer(info.tokenizer_dir))


def check_checkpoint(checkpoint, model) -> list[Finding]:
    from ..checkpoint import open_checkpoint
    from ..vocab import vocab_of

    ckpt, model = Path(checkpoint), Path(model)
    if not ckpt.exists():
        raise DoctorError(f"{ckpt}: no such file or folder; --checkpoint takes a checkpoint file or folder")
    model_rows, tok, rows_from = _model_facts(model)
    ck = open_checkpoint(ckpt)  # names and shapes only; a bad file raises its own one-line error
    shapes = {k: tuple(ck.shape(k)) for k in ck.keys()}
    rows = infer_rows(shapes)
    found = [v for v in (classify(k, s, rows) for k, s in shapes.items()) if v is not None] if rows else []
    where = f"{ckpt}"
    if not found:
        return [Finding("warning", "checkpoint-no-vocabulary",
                        f"{where}: no vocabulary-shaped tensor (embedding, head, LoRA on them) among its "
                        f"{len(shapes)} tensors; nothing depends on the vocabulary, so it loads into {model} as is")]
    shown = ", ".join(f"{v.key} {list(shapes[v.key])}" for v in found[:3]) + (
        f", ... ({len(found)} in all)" if len(found) > 3 else "")
    data = {"checkpoint_rows": rows, "model_rows": model_rows, "tensors": [v.key for v in found],
            "format": ck.info.format}
    cmd = f"tokengraft convert {shlex.quote(str(ckpt))} --to {shlex.quote(str(model))} -o " \
          f"{shlex.quote(str(suggested_output(ckpt)))}"
    if ck.info.tokenizer_dir is None and ck.info.manifest is None:
        cmd += " --source-tokenizer OLD_TOKENIZER_DIR"  # convert must know the tokens of the old rows
    data["command"] = cmd
    if rows != model_rows:
        return [Finding("error", "checkpoint-rows-mismatch",
                        f"{where}: its {len(found)} vocabulary tensor(s) ({shown}) have {rows} rows but {model} has "
                        f"{model_rows} ({rows_from}); transformers refuses it (size mismatch) and mmengine "
                        f"`load_from` would silently skip these tensors and train on without the checkpoint's "
                        f"embedding rows: convert it by token identity: {cmd}", data)]
    src_vocab = _checkpoint_vocab(ck.info)
    mine = list(vocab_of(tok)) if tok is not None else None
    if src_vocab is not None and mine is not None and list(src_vocab) != mine:
        differ = next((i for i, (a, b) in enumerate(zip(src_vocab, mine)) if a != b), min(len(src_vocab), len(mine)))
        return [Finding("error", "checkpoint-vocab-differs",
                        f"{where}: has {rows} rows like {model}, but its tokenizer differs from the model's (first "
                        f"at id {differ}); loading by index would give rows to the wrong tokens: convert it by "
                        f"token identity: {cmd}", data)]
    return [Finding("info", "checkpoint-fits",
                    f"{where}: its {len(found)} vocabulary tensor(s) ({shown}) have {rows} rows, as {model} "
                    f"({rows_from}); it loads as is", data)]
