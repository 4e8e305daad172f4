"""Vocabularies as ordered token strings, their fingerprints, and row maps between them.

A vocabulary here is ``list[str | None]``: entry ``i`` is the token string of id ``i`` (``None``
for an id no token uses, e.g. a padding row). Rows move between checkpoints by *token identity*:
the row of token ``"<box>"`` in the source goes to wherever ``"<box>"`` lives in the target.

Depends on torch only, so any trainer can import it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

Vocab = list  # list[str | None]


def vocab_of(tokenizer) -> Vocab:
    """The ordered token strings of a Hugging Face tokenizer (length ``len(tokenizer)``)."""
    n = len(tokenizer)
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    return [t if isinstance(t, str) else None for t in toks]


def fingerprint(vocab: Sequence[str | None]) -> str:
    """A stable hash over the ordered token strings: equal iff every id maps to the same string."""
    h = hashlib.sha256()
    h.update(json.dumps(list(vocab), ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return "sha256:" + h.hexdigest()[:32]


NEW = -1  # a target row with no source row: must be initialized


@dataclass(frozen=True)
class RowMap:
    """``source[t]`` is the source row that target row ``t`` takes, or ``NEW`` (-1).

    ``dropped`` lists source rows (with their tokens) that no target row takes.
    ``assumed`` is a human sentence when the map was not built from token identity.
    """

    source: tuple[int, ...]
    source_rows: int
    new_tokens: dict[int, str | None] = field(default_factory=dict)  # target row -> token
    dropped: dict[int, str | None] = field(default_factory=dict)  # source row -> token
    assumed: str | None = None

    @property
    def target_rows(self) -> int:
        return len(self.source)

    @property
    def new_rows(self) -> list[int]:
        return [t for t, s in enumerate(self.source) if s == NEW]

    def is_identity(self) -> bool:
        return self.source_rows == self.target_rows and all(s == t for t, s in enumerate(self.source))

    def index_tensor(self) -> torch.Tensor:
        return torch.tensor(self.source, dtype=torch.long)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def by_identity(
        cls,
        source_vocab: Sequence[str | None],
        target_vocab: Sequence[str | None],
        source_rows: int | None = None,
        target_rows: int | None = None,
    ) -> "RowMap":
        """Map target rows to source rows by token string. Rows beyond a vocabulary (padding)
        map by index when both sides have them, else they are new."""
        source_rows = len(source_vocab) if source_rows is None else source_rows
        target_rows = len(target_vocab) if target_rows is None else target_rows
        if source_rows < len(source_vocab) or target_rows < len(target_vocab):
            raise ValueError("rows must be >= the vocabulary length on both sides")
        where: dict[str, int] = {}
        for i, tok in enumerate(source_vocab):
            if tok is not None and tok not in where:
                where[tok] = i
        src: list[int] = []
        new: dict[int, str | None] = {}
        for t in range(target_rows):
            tok = target_vocab[t] if t < len(target_vocab) else None
            if tok is not None:
                s = where.get(tok, NEW)
            else:  # padding row: keep the source's padding row at the same index if it has one
                s = t if len(source_vocab) <= t < source_rows else NEW
            src.append(s)
            if s == NEW:
                new[t] = tok
        taken = set(src)
        dropped = {i: tok for i, tok in enumerate(source_vocab) if tok is not None and i not in taken}
        return cls(tuple(src), source_rows, new, dropped)

    @classmethod
    def by_index(cls, source_rows: int, target_rows: int, reason: str) -> "RowMap":
        """The fallback with no vocabulary information: row i -> row i. ``reason`` names the assumption."""
        src = tuple(t if t < source_rows else NEW for t in range(target_rows))
        new = {t: None for t in range(source_rows, target_rows)}
        dropped = {i: None for i in range(target_rows, source_rows)}
        return cls(src, source_rows, new, dropped, assumed=reason)

    # -- algebra ------------------------------------------------------------------------------
    def then(self, other: "RowMap") -> "RowMap":
        """Compose: apply ``self`` (A->B) then ``other`` (B->C), giving A->C."""
        if other.source_rows != self.target_rows:
            raise ValueError(f"cannot compose: {self.target_rows} rows vs {other.source_rows}")
        src = tuple(NEW if s == NEW else self.source[s] for s in other.source)
        new = {t: other.new_tokens.get(t, self.new_tokens.get(other.source[t])) for t, s in enumerate(src) if s == NEW}
        taken = set(src)
        dropped = {**self.dropped, **{self.source[b]: tok for b, tok in other.dropped.items() if self.source[b] != NEW}}
        dropped = {i: tok for i, tok in dropped.items() if i not in taken}
        assumed = "; ".join(a for a in (self.assumed, other.assumed) if a) or None
        return RowMap(src, self.source_rows, new, dropped, assumed)

    def inverse(self, source_vocab: Sequence[str | None] | None = None) -> "RowMap":
        """The map back (B->A): shared rows return, rows this map dropped become new."""
        back = [NEW] * self.source_rows
        for t, s in enumerate(self.source):
            if s != NEW and back[s] == NEW:
                back[s] = t
        new = {s: (source_vocab[s] if source_vocab is not None and s < len(source_vocab) else self.dropped.get(s))
               for s, t in enumerate(back) if t == NEW}
        dropped = dict(self.new_tokens)
        return RowMap(tuple(back), self.target_rows, new, dropped, self.assumed)

    # -- application --------------------------------------------------------------------------
    def apply(self, tensor: torch.Tensor, dim: int = 0, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Gather ``tensor`` along ``dim`` into the target layout. New rows take ``fill``
        (shape: new rows x the other dims, in ``new_rows`` order) or zeros."""
        if tensor.shape[dim] != self.source_rows:
            raise ValueError(f"tensor has {tensor.shape[dim]} rows along dim {dim}, the map expects {self.source_rows}")
        moved = tensor.movedim(dim, 0)
        idx = self.index_tensor()
        out = moved.new_zeros((self.target_rows, *moved.shape[1:]))
        keep = idx != NEW
        out[keep] = moved[idx[keep]]
        if fill is not None and (~keep).any():
            out[~keep] = fill.to(out.dtype).reshape(int((~keep).sum()), *moved.shape[1:])
        return out.movedim(0, dim).contiguous()

    def summary(self) -> dict:
        moved = sum(1 for t, s in enumerate(self.source) if s not in (NEW, t))
        return {
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "kept": self.target_rows - len(self.new_rows),
            "moved": moved,
            "new": {str(t): tok for t, tok in self.new_tokens.items() if tok is not None},
            "new_padding_rows": sum(1 for tok in self.new_tokens.values() if tok is None),
            "dropped": {str(s): tok for s, tok in self.dropped.items()},
            "assumed": self.assumed,
        }
