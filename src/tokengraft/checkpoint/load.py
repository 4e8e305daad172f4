"""Load a checkpoint of any format into an in-memory model whose tokenizer is the target's."""
from __future__ import annotations

from ..vocab import vocab_of
from .readers import open_checkpoint
from .errors import RemapError
from .layout import infer_rows
from .remap import build_row_map, remap_state_dict
from .report import RemapReport
from .sources import resolve_source_vocab

_PREFIXES = ("module.", "base_model.model.", "model.language_model.", "language_model.model.",
             "language_model.", "llm.", "model.")


def _tail(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def match_keys(ckpt_keys, model_keys) -> dict[str, str]:
    """Checkpoint key -> model key: exact, else by the name left after common wrapper prefixes
    (``llm.``, ``language_model.``, ``module.``...) when that is unambiguous."""
    model_keys = list(model_keys)
    exact = set(model_keys)
    by_tail: dict[str, list[str]] = {}
    for k in model_keys:
        by_tail.setdefault(_tail(k), []).append(k)
    out = {}
    for k in ckpt_keys:
        if k in exact:
            out[k] = k
        else:
            cands = by_tail.get(_tail(k), [])
            if len(cands) == 1:
                out[k] = cands[0]
    return out


def load_checkpoint(model, path, tokenizer=None, *, source_tokenizer=None, source_tokens=None, init: str = "auto",
                    strict: bool = True, log=print) -> RemapReport:
    """Load a checkpoint of any format into ``model`` (whose vocabulary is ``tokenizer``'s), moving
    embedding/head rows by token identity. Returns the report (what moved, what is new, what was
    dropped, what was assumed)."""

    ck = open_checkpoint(path)
    info = ck.info
    sd = ck.state_dict()
    target_vocab = vocab_of(tokenizer) if tokenizer is not None else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    msd = model.state_dict()
    if emb is not None:
        target_rows = emb.weight.shape[0]
    else:
        target_rows = infer_rows({k: tuple(v.shape) for k, v in msd.items()})
    source_vocab, how = resolve_source_vocab(info, target_vocab, source_tokenizer=source_tokenizer,
                                             source_tokens=source_tokens)
    rows = infer_rows({k: tuple(v.shape) for k, v in sd.items()})
    row_map = None
    if rows is not None:
        row_map = build_row_map(source_vocab, target_vocab, rows, target_rows)
    tied = None
    if emb is not None and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        tied = model.get_output_embeddings().weight is emb.weight  # the model knows; the file may hold both
    new_sd, report = remap_state_dict(sd, source_vocab, target_vocab, target_rows=target_rows, init=init,
                                      tokenizer=tokenizer, row_map=row_map, adapter_config=info.adapter_config,
                                      tied=tied)
    report.source_how = how
    report.notes += info.notes
    if info.inert:
        report.notes.append(f"non-tensor objects left inert (never imported or run): {', '.join(info.inert[:6])}")
    if report.assumed:
        log(f"WARNING: {report.assumed}")
    mapping = match_keys(new_sd, msd)
    renamed = {mapping[k]: v for k, v in new_sd.items() if k in mapping}
    report.unexpected_keys = [k for k in new_sd if k not in mapping]
    tied_names = _tied_model_keys(model)
    report.missing_keys = [k for k in msd if k not in renamed and k not in tied_names]
    if strict and (report.unexpected_keys or report.missing_keys):
        raise RemapError(f"{path}: keys do not match the model: {len(report.missing_keys)} missing "
                         f"(first: {report.missing_keys[:3]}), {len(report.unexpected_keys)} unexpected "
                         f"(first: {report.unexpected_keys[:3]}); pass strict=False to load the rest")
    for k, v in renamed.items():
        if tuple(msd[k].shape) != tuple(v.shape):
            raise RemapError(f"{path}: {k} has shape {tuple(v.shape)} after remapping, the model expects "
                             f"{tuple(msd[k].shape)}")
    model.load_state_dict(renamed, strict=False)
    return report


def _tied_model_keys(model) -> set[str]:
    """Model keys that alias another parameter (a tied head), which a checkpoint may omit."""
    seen: dict[int, str] = {}
    tied = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            tied.add(k)
        else:
            seen[id(v)] = k
    return tied
