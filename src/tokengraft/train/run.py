"""Run folders: what a training run writes, and how to get a merged model back from it.

Layout (see docs/train.md)::

    RUN/
      run.json                   what was trained: base folder + its vocab fingerprint, tokens, mode
      tokengraft.json            the manifest after the graft
      tokenizer / processor files
      new_rows.safetensors       the trained new rows (k x hidden), by token (metadata "tokens")
      adapter/                   lora mode: a PEFT adapter (LoRA + the new rows as trainable tokens)
      projector.safetensors      when the projector trained (rows/lora modes)
      model.safetensors          full mode only: every trained weight
      metrics.jsonl, new_tokens.png
      checkpoint-N/              the same trained parts + optimizer.pt, scheduler.pt,
                                 rng_state*.pth, trainer_state.json (transformers' names)

Only the trained parts are stored; the base model is re-loaded from the folder ``run.json`` names
and re-grafted exactly as the manifest says, so a ``rows`` checkpoint is a few hundred KB.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint.safetensors import SafetensorsFile
from ..files import read_json
from ..manifest import Manifest
from ..portable import make_portable
from .adapter import ADAPTER_DIR, ADAPTER_FILE, adapter_folder, lora_weights, save_adapter
from ..vocab import RowMap, fingerprint, vocab_of
from ..errors import TokengraftError

RUN_FILE = "run.json"
ROWS_FILE = "new_rows.safetensors"
PROJECTOR_FILE = "projector.safetensors"
FULL_FILE = "model.safetensors"
RUN_SCHEMA = 1


class RunError(TokengraftError):
    pass


@dataclass
class RunInfo:
    """``run.json``: enough to rebuild the trained model from its base folder."""
    base_model: str
    base_vocab_fingerprint: str
    mode: str
    tokens: list = field(default_factory=list)  # token specs grafted by this run (dicts)
    new_tokens: list = field(default_factory=list)  # the tokens whose rows train, in row-file order
    tied: bool = False
    pad_to_multiple_of: int = 64
    train_projector: bool = False
    train_vision: bool = False
    lora: dict = field(default_factory=dict)
    base_weights: dict = field(default_factory=dict)  # weight file name -> weights_fingerprint(); {} before 0.x
    schema_version: int = RUN_SCHEMA

    def save(self, folder) -> Path:
        p = Path(folder) / RUN_FILE
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, folder) -> "RunInfo":
        p = Path(folder) / RUN_FILE
        d = read_json(p, f"a training run's {RUN_FILE}", error=RunError, kind=dict,
                      missing=f"{folder}: no {RUN_FILE}; expected a tokengraft training run folder or one "
                              f"of its checkpoint-N folders (made by `tokengraft train`)")
        if d.get("schema_version", 0) > RUN_SCHEMA:
            raise RunError(f"{p}: written by a newer tokengraft (schema {d['schema_version']}); upgrade tokengraft")
        try:
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except TypeError as e:
            raise RunError(f"{p}: malformed ({e})") from None


# -- the base weights' fingerprint ------------------------------------------------------------

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json")
SAMPLE = 256  # bytes hashed at the start, middle and end of every tensor (or of every 1/64 of another file)


def _spans(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the bytes a fingerprint hashes: a safetensors file's header and a sample of
    every tensor (so no tensor escapes), anything else 64 evenly spaced samples (an index: all of it)."""
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        try:
            with SafetensorsFile(path) as st:
                spans = [(0, st.data_start)]
                for k in st.keys():
                    a, b = st.span(k)
                    spans += [(a, min(SAMPLE, b - a)), ((a + b) // 2, min(SAMPLE, b - (a + b) // 2)),
                              (max(a, b - SAMPLE), min(SAMPLE, b - a))]
                return spans
        except Exception:  # not a readable safetensors file: sampled like any other (fine for a hash)
            pass
    if path.name.endswith(".json") or size <= 64 * SAMPLE:
        return [(0, size)]
    return [(size * i // 64, SAMPLE) for i in range(64)] + [(size - SAMPLE, SAMPLE)]


def weights_fingerprint(folder) -> dict[str, str]:
    """{weight file name: sha256 of its size and sampled bytes (see _spans)} for every weight file at
    the top of ``folder``. Cheap (SmolLM2's 538 MB: 239 KB read, 45-150 ms; a full sha256: 2-2.4 s);
    it changes when any tensor is replaced, re-trained, resized or re-typed (one edited element in the
    middle of a tensor can escape it)."""
    import hashlib

    out = {}
    for f in sorted({p for pat in WEIGHT_FILES for p in Path(folder).glob(pat) if p.is_file()}):
        h = hashlib.sha256(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            for off, n in _spans(f):
                fh.seek(off)
                h.update(fh.read(n))
        out[f.name] = h.hexdigest()
    return out


def check_base_weights(base: Path, recorded: dict, warn=lambda *a: None, what: str = RUN_FILE) -> None:
    """``base`` still holds the weights ``recorded`` (RunError naming the first file that changed,
    appeared or went); a run.json from before the fingerprint existed only gets a warning."""
    if not recorded:
        warn(f"warning: {what} records no fingerprint of the base weights (written by an older tokengraft); "
             f"cannot check that {base} still holds the weights the run trained on")
        return
    got = weights_fingerprint(base)
    for name in sorted(set(got) | set(recorded)):
        if got.get(name) != recorded.get(name):
            how = ("is gone" if name not in got else "is new (transformers may load it instead)"
                   if name not in recorded else "differs from the one the run trained on")
            raise RunError(f"base model folder {base} changed since training: weight file {name} {how} "
                           f"({what} records {len(recorded)} weight file(s) by fingerprint); use the base the "
                           f"run was trained from (--model, or base_model in {RUN_FILE})")


# -- saving the trained parts -----------------------------------------------------------------

def save_rows(folder, tokens: list[str], rows: dict[str, torch.Tensor], tied: bool) -> Path:
    """``new_rows.safetensors``: ``embed`` (and untied ``head``) rows, k x hidden, float32; the
    token strings ride in the metadata so the rows can be remapped by identity later."""
    p = Path(folder) / ROWS_FILE
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in rows.items()}
    meta = {"tokens": json.dumps(tokens, ensure_ascii=False), "tied": json.dumps(tied), "format": "tokengraft-rows"}
    tmp = p.with_name(p.name + ".tmp")  # whole or absent: a cut-off save never looks like trained rows
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


def read_rows(folder) -> tuple[list[str], dict[str, torch.Tensor]]:
    p = Path(folder) / ROWS_FILE
    if not p.is_file():
        raise RunError(f"{folder}: no {ROWS_FILE}; the run folder is incomplete (was it interrupted before "
                       f"its first checkpoint?)")
    with SafetensorsFile(p) as st:  # one open: the token list (metadata) and the rows
        meta = st.metadata or {}
        rows = {k: st.get(k) for k in st.keys()}
    try:
        tokens = json.loads(meta["tokens"])
    except (KeyError, json.JSONDecodeError):
        raise RunError(f"{p}: no token list in its metadata; not written by tokengraft") from None
    if "embed" not in rows or rows["embed"].shape[0] != len(tokens):
        raise RunError(f"{p}: {rows['embed'].shape[0] if 'embed' in rows else 'no embed'} rows for {len(tokens)} "
                       f"tokens; not a rows file tokengraft wrote")
    return tokens, rows


def remap_rows(saved_tokens: list[str], saved: dict[str, torch.Tensor], tokens: list[str],
               current: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], RowMap]:
    """Carry saved rows onto another token list by token identity; tokens the save did not have
    keep their ``current`` rows."""
    m = RowMap.by_identity(saved_tokens, tokens)
    out = {}
    for k, cur in current.items():
        src = saved.get(k, saved["embed"])
        fill = cur[torch.tensor(m.new_rows, dtype=torch.long)] if m.new_rows else None
        out[k] = m.apply(src.to(cur.dtype), fill=fill)
    return out, m


def trained_state(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every trainable weight except the new-row deltas, with tied tensors stored once. Under FSDP
    each weight is gathered whole, one at a time (a collective: every rank calls this, in the same
    parameter order); ``keep=False`` (ranks that do not write) drops each one after its gather."""
    from .params import ATTR, full

    out, seen = {}, set()
    for n, p in model.named_parameters():
        if not p.requires_grad or n.startswith(ATTR + ".") or f".{ATTR}." in n:
            continue
        key = id(p) if hasattr(p, "full_tensor") else p.data_ptr()  # a sharded tie is one Parameter
        if key in seen:
            continue
        seen.add(key)
        t = full(p.detach())
        if keep:
            out[n] = t.contiguous().cpu()
    return out


def _named(model, pick, keep: bool) -> dict[str, torch.Tensor]:
    """The parameters whose name ``pick`` accepts, whole (gathered under FSDP, as trained_state)."""
    from .params import full

    out = {}
    for n, p in model.named_parameters():
        if pick(n):
            t = full(p.detach())
            if keep:
                out[n] = t.contiguous().cpu()
    return out


def gather_parts(model, base, rows_mod, info: RunInfo, keep: bool) -> dict:
    """The trained parts as whole tensors, for ``save_parts``: under FSDP every rank must call this
    (the gathers are collectives) and only the writer keeps them. Keys: ``rows`` (effective new
    rows), ``full`` (full mode), ``projector``, ``lora`` (the PEFT model's LoRA tensors, named as in
    its state dict, which is what PEFT's save takes)."""
    parts = {"rows": rows_mod.effective(base)}
    if info.mode == "full":
        parts["full"] = trained_state(base, keep)
    elif info.train_projector:
        parts["projector"] = _named(base, lambda n: "multi_modal_projector" in n, keep)
    if info.mode == "lora":
        parts["lora"] = _named(model, lambda n: "lora_" in n, keep)
    return parts


def _save_atomic(tensors: dict, path: Path) -> None:
    """Whole or absent: a save cut off half-way never looks like trained weights."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_parts(folder, model, base, rows_mod, info: RunInfo, manifest: Manifest, tokenizer, processor=None,
               gathered: dict | None = None) -> None:
    """Write the trained parts of ``model`` (``base``: the un-PEFT'd transformers model) to ``folder``.
    ``gathered``: the parts already gathered by :func:`gather_parts` (FSDP: every rank gathers, rank
    0 writes); by default they are read from the (unsharded) model here."""
    g = gathered if gathered is not None else gather_parts(model, base, rows_mod, info, keep=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info.save(folder)
    manifest.save(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    make_portable(folder)
    save_rows(folder, info.new_tokens, g["rows"], info.tied)
    if "full" in g:
        _save_atomic(g["full"], folder / FULL_FILE)
    elif "projector" in g:
        _save_atomic(g["projector"], folder / PROJECTOR_FILE)
    if info.mode == "lora":
        save_adapter(folder, model, base, rows_mod.ids.tolist(), g["rows"], info.tied, manifest,
                     info.base_model, info.tokens, lora_state=g["lora"])


def _load_named(model, path: Path) -> None:
    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise RunError(f"{path}: weights {unexpected[:3]} do not exist in the base model; was the base folder "
                       f"replaced by another architecture?")


# -- loading a run ----------------------------------------------------------------------------

def checkpoints(run_dir) -> list[Path]:
    """A run's checkpoint-N folders, oldest first."""
    cks = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(cks, key=lambda p: int(p.name.split("-")[-1]))


def last_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint-N that finished saving (transformers writes trainer_state.json last)."""
    done = [c for c in checkpoints(run_dir) if (c / "trainer_state.json").is_file()]
    return done[-1] if done else None


def _parts_folder(path: Path) -> Path:
    """A run folder holds its final parts at the top; before the end of training only checkpoints."""
    if (path / ROWS_FILE).is_file():
        return path
    cks = checkpoints(path)
    if cks:
        return cks[-1]
    raise RunError(f"{path}: neither trained parts ({ROWS_FILE}) nor checkpoint-N folders; "
                   f"the run has not saved anything yet")


def rebuild_base(info: RunInfo, expect_manifest: Manifest | None = None, log=lambda *a: None, warn=None):
    """Re-load the base folder recorded in ``info`` and graft the run's tokens onto it:
    (model, tokenizer, processor, manifest). Fails if the base folder's weights or vocabulary changed;
    ``warn`` (default ``log``) gets the warning for a run.json without a weights fingerprint."""
    from ..graft import graft
    from ..io import load_folder

    base = Path(info.base_model)
    if not base.is_dir():
        raise RunError(f"base model folder {base} (recorded in {RUN_FILE}) does not exist; "
                       f"restore it, or edit base_model in {RUN_FILE} to where it now lives")
    check_base_weights(base, info.base_weights, warn or log)
    model, tok, proc, manifest0 = load_folder(base)
    got = fingerprint(vocab_of(tok))
    if got != info.base_vocab_fingerprint:
        raise RunError(f"base model folder {base} changed since training: its vocabulary fingerprint is {got}, "
                       f"the run recorded {info.base_vocab_fingerprint}; point base_model in {RUN_FILE} "
                       f"at the folder the run was trained from")
    if expect_manifest is not None:
        base_fp = manifest0.base_fingerprint if manifest0 is not None else got
        if base_fp != expect_manifest.base_fingerprint:
            raise RunError(f"base model folder {base}: base vocabulary fingerprint {base_fp} differs from the "
                           f"run manifest's base_fingerprint {expect_manifest.base_fingerprint}")
    manifest = graft(model, tok, info.tokens, manifest=manifest0, processor=proc,
                     pad_to_multiple_of=info.pad_to_multiple_of, log=log) if info.tokens else manifest0
    if expect_manifest is not None and manifest is not None and expect_manifest.vocab_fingerprint \
            and manifest.vocab_fingerprint != expect_manifest.vocab_fingerprint:
        raise RunError(f"re-grafting the run's tokens onto {base} gave vocabulary {manifest.vocab_fingerprint}, "
                       f"the run recorded {expect_manifest.vocab_fingerprint}; the token ids would not match")
    return model, tok, proc, manifest


def load_run(path, log=lambda *a: None, warn=None):
    """``(model, tokenizer, processor_or_None, manifest)`` from a run folder or one of its checkpoints.

    The base model is re-loaded from the path recorded in ``run.json``, the tokens are grafted as the
    manifest says, and the trained parts are applied: new rows written into the embedding/head, the
    LoRA adapter merged, full weights loaded. The model comes back in eval mode with no hooks.
    """
    from .params import write_rows

    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a folder; pass a run folder or one of its checkpoint-N folders")
    parts = _parts_folder(path)
    info = RunInfo.load(parts)
    manifest_saved = Manifest.load(parts)
    model, tok, proc, manifest = rebuild_base(info, manifest_saved, log, warn)
    if info.mode == "full":
        _load_named(model, parts / FULL_FILE)
    elif (parts / PROJECTOR_FILE).is_file():
        _load_named(model, parts / PROJECTOR_FILE)
    tokens, rows = read_rows(parts)
    ids = tok.convert_tokens_to_ids(tokens)
    write_rows(model, ids, rows, info.tied)
    if info.mode == "lora":
        from peft import PeftModel

        a = adapter_folder(parts)
        if not (a / ADAPTER_FILE).is_file():
            raise RunError(f"{parts}: lora run without {ADAPTER_DIR}/{ADAPTER_FILE}")
        model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    return model.eval(), tok, proc, manifest_saved


def resume_parts(folder, model, base, rows_mod, info: RunInfo, log=print) -> RowMap | None:
    """Load a checkpoint's trained parts into a model being trained (for ``--resume``). When the
    token set changed since the checkpoint, rows move by token identity (a :class:`RowMap`) and
    tokens the checkpoint lacked keep their fresh initialization; the map is returned."""
    folder = Path(folder)
    saved = RunInfo.load(folder)
    if saved.base_vocab_fingerprint != info.base_vocab_fingerprint:
        raise RunError(f"{folder}: trained from a base with vocabulary {saved.base_vocab_fingerprint}, "
                       f"this run's base has {info.base_vocab_fingerprint}; resume with the same --model")
    if saved.mode != info.mode:
        raise RunError(f"{folder}: a {saved.mode!r} checkpoint cannot resume as mode {info.mode!r}")
    if info.mode == "full":
        _load_named(base, folder / FULL_FILE)
    elif (folder / PROJECTOR_FILE).is_file():
        _load_named(base, folder / PROJECTOR_FILE)
    if info.mode == "lora":
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(model, lora_weights(folder))
        if getattr(res, "unexpected_keys", None):
            raise RunError(f"{folder}: adapter keys {res.unexpected_keys[:3]} do not fit this model")
    tokens, rows = read_rows(folder)
    remap = None
    if tokens != list(info.new_tokens):
        rows, remap = remap_rows(tokens, rows, list(info.new_tokens), rows_mod.effective(base))
        log(f"resume: token set changed; rows carried by token identity: {remap.summary()['kept']} kept, "
            f"{len(remap.new_rows)} new, {len(remap.dropped)} dropped")
    rows_mod.set_effective(base, rows)
    return remap
