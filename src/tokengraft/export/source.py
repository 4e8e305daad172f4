"""What is being exported: a training run (or one of its checkpoints), or a Hugging Face model
folder, optionally with a PEFT adapter to merge. Loads it as one merged fp32 model in memory and
refuses sources whose parts do not belong together."""
from __future__ import annotations

from pathlib import Path

import torch

from ..hf import is_tied, rows_of
from ..manifest import Manifest
from ..vocab import fingerprint, vocab_of
from .errors import ExportError

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _is_hf_model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / f).is_file() for f in _WEIGHT_FILES)


def source_kind(source) -> str:
    """"hf" for a plain Hugging Face model folder, "run" for a training run or one of its checkpoints."""
    p = Path(source)
    if not p.exists():
        raise ExportError(f"{p}: no such file or folder; pass a training run, a checkpoint or a model folder")
    # a run (or checkpoint-N) holds run.json and only the trained parts; the base comes from elsewhere
    if p.is_dir() and ((p / "run.json").is_file() or any(p.glob("checkpoint-*/run.json"))):
        return "run"
    if _is_hf_model_folder(p):
        return "hf"
    raise ExportError(f"{p}: neither a model folder (config.json + weights) nor a tokengraft training run "
                      f"(run.json); pass the folder `tokengraft add` or `tokengraft train` wrote")


def load_source(source, adapter=None, log=print):
    """(model, tokenizer, processor or None, manifest or None, kind): the merged model in memory, fp32."""
    p = Path(source)
    kind = source_kind(p)
    if kind == "run":
        if adapter is not None:
            raise ExportError(f"{p}: --adapter applies to a model folder; a training run already knows its adapter")
        try:
            from ..train.run import load_run
        except ImportError:
            raise ExportError(f"{p}: not a model folder (no config.json with weights), and reading training "
                              f"runs needs tokengraft.train, which this installation lacks") from None
        model, tokenizer, processor, manifest = load_run(p, warn=log)  # the base weights' check warns here
        model = model.float().eval()
        return model, tokenizer, processor, manifest, kind
    from ..io import load_folder

    model, tokenizer, processor, manifest = load_folder(p, dtype=torch.float32)
    check_consistent(model, tokenizer, manifest, where=str(p))
    if adapter is not None:
        from .adapter import merge_adapter

        model = merge_adapter(model, tokenizer, manifest, adapter, base=p, log=log)
    return model.eval(), tokenizer, processor, manifest, kind


def check_consistent(model, tokenizer, manifest: Manifest | None, where: str) -> None:
    """The tokenizer, the weights and the manifest belong together (else: a clear one-line error)."""
    rows = rows_of(model)
    if len(tokenizer) > rows:
        raise ExportError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} rows; "
                          f"run `tokengraft doctor {where}`")
    if manifest is None:
        return
    fp = fingerprint(vocab_of(tokenizer))
    if manifest.vocab_fingerprint and manifest.vocab_fingerprint != fp:
        raise ExportError(f"{where}: the tokenizer is not the one tokengraft.json records (fingerprint "
                          f"{fp} != {manifest.vocab_fingerprint}); was it edited or replaced? "
                          f"run `tokengraft doctor {where}`")
    if manifest.rows != rows:
        raise ExportError(f"{where}: the weights have {rows} rows but tokengraft.json records {manifest.rows}; "
                          f"run `tokengraft doctor {where}`")


def check_finite(model, where: str) -> None:
    """Every vocabulary row (input embedding and head) holds finite numbers: one NaN row makes every
    probability NaN, and nothing downstream says so."""
    sides = [("input embedding", model.get_input_embeddings().weight)]
    head = model.get_output_embeddings()
    if head is not None and not is_tied(model):
        sides.append(("output head", head.weight))
    for name, w in sides:
        bad = ~torch.isfinite(w.detach()).all(dim=1)
        n = int(bad.sum())
        if n:
            first = bad.nonzero()[:5, 0].tolist()
            raise ExportError(f"{where}: the {name} has {n} row(s) with NaN or inf values (ids {first}"
                              f"{' ...' if n > 5 else ''}); the model is broken: export the last good "
                              f"checkpoint, or run `tokengraft doctor` on it")
