"""Which tensors of a state dict depend on the vocabulary, and how: the names and shapes rules.

A tensor is vocabulary-shaped when its *name* says so (an input embedding, an output head, a LoRA
factor or PEFT copy of one) and its *shape* agrees (a dimension equal to the source rows). A tensor
with a vocabulary-sized dimension that no rule explains is an error: never silently loaded or
dropped. Pure Python over names and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import RemapError

INPUT_NAMES = ("embed_tokens", "tok_embeddings", "wte", "word_embeddings")
OUTPUT_NAMES = ("lm_head", "output", "embed_out")
WRAPPERS = ("base_layer", "original_module", "modules_to_save")  # PEFT wrappers around the real weight
NOT_VOCAB_LORA = ("lora_A", "lora_embedding_B")  # LoRA factors whose shape has no vocabulary dimension


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


def check_explained(key: str, shape: tuple[int, ...], rows: int) -> None:
    """A tensor no rule classified must not have a vocabulary-sized dimension."""
    if rows in shape:
        raise RemapError(
            f"tensor {key!r} {shape} has a vocabulary-sized dimension ({rows}) but tokengraft does not know "
            f"how it depends on the vocabulary; refusing to load or drop it silently. If it is an embedding "
            f"or head, rename it to a known name ({', '.join(INPUT_NAMES + OUTPUT_NAMES)}) or report the layout")


def tied_by_layout(found: dict) -> bool:
    """A state dict with an input embedding but no output head weight: the head is the embedding."""
    sides = {(v.side, v.kind) for v in found.values() if v is not None}
    return ("input", "weight") in sides and ("output", "weight") not in sides


def identical_pairs(found: dict, equal) -> list[tuple[str, str]]:
    """(input key, output key) pairs of vocabulary weights that hold bit-identical tensors: a tied
    model saved with both names (XTuner's ``llm.model.embed_tokens.weight`` and ``llm.lm_head.weight``).
    ``equal(a, b)`` compares two keys' tensors (the caller knows how to read them)."""
    ins = [v for v in found.values() if v is not None and v.kind == "weight" and v.side == "input"]
    outs = [v for v in found.values() if v is not None and v.kind == "weight" and v.side == "output"]
    return [(i.key, o.key) for i in ins for o in outs if equal(i.key, o.key)]


def has_trainable_tokens(shapes) -> bool:
    return any("trainable_tokens_delta" in k for k in shapes)
