"""Remap every vocabulary-shaped tensor of a state dict from one vocabulary to another.

A tensor is vocabulary-shaped when its *name* says so (an input embedding, an output head, a LoRA
factor or PEFT copy of one) and its *shape* agrees (a dimension equal to the source rows). Each is
gathered through a :class:`~tokengraft.vocab.RowMap` along its vocabulary dimension; rows new to the
target are initialized with the strategies of :mod:`tokengraft.init`. A tensor with a
vocabulary-sized dimension that no rule explains is an error: it is never silently loaded or dropped.

Pure torch: importable inside any trainer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .. import init as I
from ..vocab import NEW, RowMap
from .errors import RemapError

INPUT_NAMES = ("embed_tokens", "tok_embeddings", "wte", "word_embeddings")
OUTPUT_NAMES = ("lm_head", "output", "embed_out")
WRAPPERS = ("base_layer", "original_module", "modules_to_save")  # PEFT wrappers around the real weight
NOT_VOCAB_LORA = ("lora_A", "lora_embedding_B")  # LoRA factors whose shape has no vocabulary dimension
INIT_CHOICES = ("auto", "mean", "hewitt", "subword", "zero")


@dataclass(frozen=True)
class VocabTensor:
    """How one tensor depends on the vocabulary."""

    key: str
    side: str  # "input" | "output"
    kind: str  # weight | bias | lora_B | lora_embedding_A | trainable_tokens | moment
    dim: int  # the vocabulary dimension
    module: str  # the vocabulary module's full dotted name (without the parameter part)


def _split(key: str) -> tuple[int, list[str]] | None:
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in INPUT_NAMES or parts[i] in OUTPUT_NAMES:
            return i, parts
    return None


def classify(key: str, shape: tuple[int, ...], rows: int | None) -> VocabTensor | None:
    """The vocabulary role of ``key`` (or None). ``rows``: the source vocabulary rows, or None to
    classify by name alone."""
    hit = _split(key)
    if hit is None:
        return None
    i, parts = hit
    name, rest = parts[i], parts[i + 1:]
    side = "input" if name in INPUT_NAMES else "output"
    module = ".".join(parts[: i + 1])
    if any(p in NOT_VOCAB_LORA for p in rest):
        return None
    if "token_adapter" in rest and any(p.startswith("trainable_tokens_delta") for p in rest):
        return VocabTensor(key, side, "trainable_tokens", 0, module)
    if "lora_B" in rest:
        kind, dim = "lora_B", 0
    elif "lora_embedding_A" in rest:
        kind, dim = "lora_embedding_A", 1
    elif rest and rest[-1] in ("weight", "bias"):
        inner = rest[:-1]
        # allowed between the module and its parameter: PEFT wrappers (+ an adapter name after
        # modules_to_save). Anything else (e.g. BERT's attention.output.dense) is another module.
        if inner and not (all(p in WRAPPERS for p in inner)
                          or (len(inner) == 2 and inner[0] == "modules_to_save")):
            return None
        kind, dim = rest[-1], 0
    else:
        return None
    if len(shape) <= dim or (kind == "bias") != (len(shape) == 1):
        return None
    if rows is not None and shape[dim] != rows:
        return None
    return VocabTensor(key, side, kind, dim, module)


def infer_rows(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The source rows: those of an input embedding (or else an output head / LoRA factor on one)."""
    order = {"weight": 0, "lora_B": 1, "lora_embedding_A": 2, "bias": 3}
    found = []
    for k, s in shapes.items():
        v = classify(k, s, None)
        if v is not None and v.kind in order:
            if v.side == "output" and v.module.split(".")[-1] == "output" and v.kind == "weight" and len(s) != 2:
                continue
            found.append((order[v.kind], v.side != "input", s[v.dim]))
    return min(found)[2] if found else None


# -- the report -----------------------------------------------------------------------------------

@dataclass
class RemapReport:
    row_map: RowMap
    remapped: list[dict] = field(default_factory=list)  # key, kind, side, dim, shape before/after
    init: dict[str, str] = field(default_factory=dict)  # "input:<tok>" -> strategy
    untouched: int = 0
    notes: list[str] = field(default_factory=list)
    adapter_config: dict | None = None  # rewritten PEFT config (trainable_token_indices)
    optimizer: dict | None = None  # the remapped optimizer state, when one was given
    source_how: str | None = None  # how the source vocabulary was found
    missing_keys: list[str] = field(default_factory=list)  # load_checkpoint only
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def assumed(self) -> str | None:
        return self.row_map.assumed

    @property
    def dropped(self) -> dict[int, str | None]:
        return self.row_map.dropped

    @property
    def new(self) -> dict[int, str | None]:
        return self.row_map.new_tokens

    def to_dict(self) -> dict:
        return {"rows": self.row_map.summary(), "source_vocabulary": self.source_how,
                "remapped": self.remapped, "init": self.init, "untouched_tensors": self.untouched,
                "notes": self.notes, "missing_keys": self.missing_keys, "unexpected_keys": self.unexpected_keys}

    def lines(self) -> list[str]:
        s = self.row_map.summary()
        out = []
        if self.assumed:
            out.append(f"WARNING: {self.assumed}")
        if self.source_how:
            out.append(f"source vocabulary: {self.source_how}")
        out.append(f"rows {s['source_rows']} -> {s['target_rows']}: kept {s['kept']} ({s['moved']} moved), "
                   f"new {len(s['new'])} token(s) + {s['new_padding_rows']} padding row(s), "
                   f"dropped {len(s['dropped'])}")
        if s["new"]:
            out.append("new: " + ", ".join(f"{t} (id {i})" for i, t in list(s["new"].items())[:20]))
        if s["dropped"]:
            out.append("dropped: " + ", ".join(f"{t} (was id {i})" for i, t in list(s["dropped"].items())[:20]))
        for r in self.remapped:
            out.append(f"  remapped {r['key']}: {r['kind']} ({r['side']}, dim {r['dim']}) "
                       f"{r['before']} -> {r['after']}")
        out += [f"note: {n}" for n in self.notes]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# -- initialization of new rows ---------------------------------------------------------------------

def _content_pieces(tokenizer, content: str | None) -> list[int]:
    if tokenizer is None or not content:
        return []
    text = I.markup_words(content)  # the same words graft's subword init uses
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception:  # a tokenizer that cannot encode this text: fall back to the mean
        return []


CHUNK_ROWS = 2048


def trained_mean(source: torch.Tensor, base_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``init.trained_mask`` and ``init.mean_row`` (float32) computed in row chunks, so a bf16
    vocabulary matrix is never copied whole to float32 (memory stays bounded by the tensor)."""
    return chunked_stats(lambda a, b: source[a:b], lambda rows: source[rows], source.shape[0], base_rows)


def chunked_stats(read, take, rows: int, base_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over rows ``[0, n)`` (``read(a, b)`` gives a chunk): norms and the sum of all rows;
    then the rows that do not look trained (the rule of ``init.trained_mask``: norm at most 5% of
    the median) are read again (``take``) and taken out of the sum. Usually they are few."""
    n = min(base_rows, rows)
    norms, total = [], None
    for a in range(0, n, CHUNK_ROWS):
        chunk = read(a, min(a + CHUNK_ROWS, n)).float()  # a chunk at a time: never the whole matrix in float32
        norms.append(chunk.norm(dim=1))
        part = chunk.sum(0).double()
        total = part if total is None else total + part
    norms = torch.cat(norms)
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[:n] = norms > 0.05 * norms.median()
    if not mask[:n].any():
        mask[:n] = True
    off = (~mask[:n]).nonzero().flatten().tolist()
    if off:
        total = total - take(off).float().sum(0).double()
    return mask, (total / (n - len(off))).float()


def gather(moved: torch.Tensor, rm: RowMap) -> torch.Tensor:
    """``rm.apply(moved, 0)`` with a single allocation of the output (rows new to the target are zero)."""
    if moved.shape[0] != rm.source_rows:
        raise RemapError(f"tensor has {moved.shape[0]} rows, the row map expects {rm.source_rows}")
    idx = rm.index_tensor()
    out = moved.index_select(0, idx.clamp(min=0))
    new = idx == NEW
    if new.any():
        out[new] = 0
    return out


class Rows:
    """Read access to a source matrix (vocabulary dim first): in memory, or streamed from disk."""

    def __init__(self, source: torch.Tensor):
        self.source = source
        self.shape = tuple(source.shape)

    def take(self, rows: list[int]) -> torch.Tensor:
        return self.source[rows]

    def stats(self, base_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return trained_mean(self.source, base_rows)

    def all(self) -> torch.Tensor:
        return self.source


def new_rows(src: "Rows", vt: VocabTensor, rm: RowMap, init: str, tied: bool, tokenizer, base_rows: int,
             gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Values (float32, new rows x the other dims) for the target's new rows of one tensor, and the
    strategy used for each."""
    new = rm.new_rows
    k = len(new)
    rest = src.shape[1:]
    if vt.kind in ("lora_B", "lora_embedding_A", "moment") or init == "zero" or not k:
        # a LoRA delta of zero leaves the new row at its base value; fresh moments start at zero
        return torch.zeros((k, *rest), dtype=torch.float32), ["zero"] * k
    if vt.kind == "bias":
        return src.all()[:base_rows].float().mean().expand(k).clone(), ["mean"] * k
    mask, mean = src.stats(base_rows)
    rows, names = [], []
    # Output side (and a tied matrix, which is also the head): the mean over trained rows keeps the
    # model's text distribution almost unchanged. Input side: semantic pieces when we can.
    semantic_ok = vt.side == "input" and not tied
    for t in new:
        tok = rm.new_tokens.get(t)
        method = init
        if method == "auto":
            method = "subword" if (semantic_ok and tok is not None and tokenizer is not None) else "mean"
        if method == "subword" and vt.side == "input" and tok is not None:
            # pieces are target ids; their rows are the source rows the map sends there
            pieces = [rm.source[p] for p in _content_pieces(tokenizer, tok)
                      if 0 <= p < rm.target_rows and rm.source[p] != NEW]
            rows.append(src.take(pieces).float().mean(dim=0) if pieces else mean)
            names.append("subword" if pieces else "mean")
        elif method == "hewitt":
            rows.append(I.hewitt_rows(src.all(), mask, 1, generator=gen)[0])
            names.append("hewitt")
        else:
            rows.append(mean)
            names.append("mean")
    return torch.stack(rows), names


def record(report: "RemapReport", vt: VocabTensor, rm: RowMap, names: list[str], tied: bool,
           before, after) -> None:
    for t, n in zip(rm.new_rows, names):
        tok = rm.new_tokens.get(t)
        if tok is not None and vt.kind == "weight":
            report.init.setdefault(f"{'tied' if tied else vt.side}:{tok}", n)
    report.remapped.append({"key": vt.key, "kind": vt.kind, "side": vt.side, "dim": vt.dim,
                            "before": list(before), "after": list(after)})


# -- remap -----------------------------------------------------------------------------------------

def build_row_map(source_vocab, target_vocab, source_rows: int, target_rows: int | None,
                  assumed: str | None = None) -> RowMap:
    if target_rows is None:
        target_rows = len(target_vocab) if target_vocab is not None else source_rows
        if source_vocab is not None and target_vocab is not None and source_rows > len(source_vocab):
            target_rows = max(target_rows, source_rows)  # the source was padded: rows never shrink
    if source_vocab is None or target_vocab is None:
        why = assumed or (f"no source vocabulary: rows mapped BY INDEX (row i of the checkpoint -> id i of the "
                          f"target); rows {source_rows} -> {target_rows}. Pass the source tokenizer or "
                          f"--source-tokens if tokens were added in another order")
        return RowMap.by_index(source_rows, target_rows, why)
    if len(source_vocab) > source_rows:
        raise RemapError(f"the source vocabulary has {len(source_vocab)} tokens but the checkpoint only "
                         f"{source_rows} rows; is it the right tokenizer for this checkpoint?")
    if len(target_vocab) > target_rows:
        raise RemapError(f"the target vocabulary has {len(target_vocab)} tokens but only {target_rows} rows")
    return RowMap.by_identity(source_vocab, target_vocab, source_rows, target_rows)


def remap_state_dict(state_dict: dict, source_vocab, target_vocab, *, source_rows: int | None = None,
                     target_rows: int | None = None, init: str = "auto", tokenizer=None,
                     row_map: RowMap | None = None, adapter_config: dict | None = None,
                     optimizer: dict | None = None, param_names: list[str] | None = None,
                     tied: bool | None = None, seed: int = 0) -> tuple[dict, RemapReport]:
    """Remap every vocabulary-shaped tensor of ``state_dict`` from ``source_vocab`` to ``target_vocab``
    (lists of token strings, ``None`` for unused ids). Other tensors are passed through untouched.

    ``source_vocab=None`` maps rows by index and says so in ``report.assumed``. ``tokenizer``: the
    target tokenizer, for semantic (subword) input rows. ``adapter_config``: a PEFT config whose
    ``trainable_token_indices`` are rewritten (``report.adapter_config``). ``optimizer``: a torch
    optimizer state dict whose ``exp_avg``/``exp_avg_sq`` are remapped too (``report.optimizer``);
    its parameters are matched to ``param_names`` (or, without them, to the state dict's tensors by
    order and shape)."""
    if init not in INIT_CHOICES:
        raise RemapError(f"init {init!r} is not one of {', '.join(INIT_CHOICES)}")
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    rows = source_rows or (row_map.source_rows if row_map else None) or infer_rows(shapes)
    if rows is None:
        rows = len(source_vocab) if source_vocab is not None else None
    if rows is None and not _has_trainable_tokens(shapes):
        raise RemapError("no vocabulary-shaped tensor found (no embedding or head under a known name) and no "
                         "source rows given; nothing to remap")
    if row_map is None:
        if rows is None:
            rows = len(source_vocab)
        row_map = build_row_map(source_vocab, target_vocab, rows, target_rows)
    rm = row_map
    report = RemapReport(rm)
    base_rows = len(source_vocab) if source_vocab is not None else rm.source_rows
    gen = torch.Generator().manual_seed(seed)

    found = {k: classify(k, s, rm.source_rows) for k, s in shapes.items()}
    tied = _is_tied(found) if tied is None else tied
    out: dict = {}
    identity = rm.is_identity()
    for k, v in state_dict.items():
        vt = found.get(k)
        if vt is None:
            if isinstance(v, torch.Tensor) and not identity:
                check_explained(k, tuple(v.shape), rm.source_rows)
            out[k] = v
            report.untouched += isinstance(v, torch.Tensor)
            continue
        if vt.kind == "trainable_tokens":
            out[k] = v  # handled with the adapter config below
            continue
        out[k] = remap_tensor(v, vt, rm, report, init=init, tied=tied, tokenizer=tokenizer,
                              base_rows=base_rows, gen=gen)

    if adapter_config is not None or _has_trainable_tokens(shapes):
        out, report.adapter_config = _remap_trainable_tokens(out, found, rm, adapter_config, report)
    if optimizer is not None:
        from .optim import remap_optimizer_state

        report.optimizer = remap_optimizer_state(optimizer, state_dict, found, rm, param_names, report)
    return out, report


def remap_tensor(v: torch.Tensor, vt: VocabTensor, rm: RowMap, report: RemapReport, *, init: str = "auto",
                 tied: bool = False, tokenizer=None, base_rows: int | None = None,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """One vocabulary-shaped tensor in the target layout, new rows initialized; recorded in ``report``."""
    if not v.is_floating_point():
        raise RemapError(f"tensor {vt.key!r} is vocabulary-shaped but has dtype {v.dtype}; expected a float tensor")
    base_rows = rm.source_rows if base_rows is None else base_rows
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    moved = v.movedim(vt.dim, 0)
    gathered = gather(moved, rm)
    fill, names = new_rows(Rows(moved), vt, rm, init, tied, tokenizer, base_rows, gen)
    if fill.numel():
        idx = torch.tensor(rm.new_rows, dtype=torch.long)
        gathered[idx] = fill.to(gathered.dtype).reshape(len(idx), *gathered.shape[1:])
    out = gathered.movedim(0, vt.dim).contiguous()
    record(report, vt, rm, names, tied, v.shape, out.shape)
    return out


def check_explained(key: str, shape: tuple[int, ...], rows: int) -> None:
    """A tensor no rule classified must not have a vocabulary-sized dimension."""
    if rows in shape:
        raise RemapError(
            f"tensor {key!r} {shape} has a vocabulary-sized dimension ({rows}) but tokengraft does not know "
            f"how it depends on the vocabulary; refusing to load or drop it silently. If it is an embedding "
            f"or head, rename it to a known name ({', '.join(INPUT_NAMES + OUTPUT_NAMES)}) or report the layout")


def _is_tied(found: dict) -> bool:
    """A state dict with an input embedding but no output head weight: the head is the embedding."""
    sides = {(v.side, v.kind) for v in found.values() if v is not None}
    return ("input", "weight") in sides and ("output", "weight") not in sides


def _has_trainable_tokens(shapes) -> bool:
    return any("trainable_tokens_delta" in k for k in shapes)


def _remap_trainable_tokens(sd: dict, found: dict, rm: RowMap, adapter_config: dict | None,
                            report: RemapReport) -> tuple[dict, dict | None]:
    """PEFT trainable tokens: the delta's rows belong to the ids listed in adapter_config.json. Move
    the ids with their tokens; drop rows of dropped tokens."""
    keys = [k for k in sd if "trainable_tokens_delta" in k]
    if not keys:
        return sd, adapter_config
    if adapter_config is None or adapter_config.get("trainable_token_indices") is None:
        raise RemapError("the adapter has trainable-token rows but no adapter_config.json with "
                         "'trainable_token_indices'; the ids of those rows are unknown")
    cfg = copy.deepcopy(adapter_config)
    spec = cfg["trainable_token_indices"]
    target_of = {s: t for t, s in enumerate(rm.source) if s != NEW}
    new_spec = {} if isinstance(spec, dict) else None

    def moved_ids(ids):
        keep = [(i, target_of[s]) for i, s in enumerate(ids) if s in target_of]
        return [i for i, _ in keep], [t for _, t in keep]

    for k in keys:
        module = k.split(".token_adapter")[0].split(".")[-1]
        ids = spec.get(module) if isinstance(spec, dict) else spec
        if ids is None:
            raise RemapError(f"{k}: no trainable_token_indices entry for module {module!r} in adapter_config.json")
        if len(ids) != sd[k].shape[0]:
            raise RemapError(f"{k}: {sd[k].shape[0]} rows but adapter_config.json lists {len(ids)} ids for {module!r}")
        rows, new_ids = moved_ids(ids)
        lost = [s for s in ids if s not in target_of]
        if lost:
            report.notes.append(f"{module}: trainable-token rows of dropped ids {lost} removed")
        sd[k] = sd[k][rows].contiguous()
        if new_spec is not None:
            new_spec[module] = new_ids
        else:
            new_spec = new_ids
        report.remapped.append({"key": k, "kind": "trainable_tokens", "side": "input" if module in INPUT_NAMES
                                else "output", "dim": 0, "before": list(ids), "after": new_ids})
    if isinstance(spec, dict):
        for m, ids in spec.items():  # modules without a saved delta (e.g. tied lm_head): move ids too
            new_spec.setdefault(m, moved_ids(ids)[1])
    cfg["trainable_token_indices"] = new_spec
    return sd, cfg
