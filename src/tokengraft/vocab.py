"""Vocabularies as ordered token strings, their fingerprints, and row maps between them.

A vocabulary here is ``list[str | None]``: entry ``i`` is the token string of id ``i`` (``None``
for an id no token uses, e.g. a padding row). Rows move between checkpoints by *token identity*:
the row of token ``"<box>"`` in the source goes to wherever ``"<box>"`` lives in the target.

Depends on torch only, so any trainer can import it.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import torch

from .errors import TokengraftError

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


class RowMapError(TokengraftError):
    """A tensor or vocabulary that does not fit the row map."""


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

    @cached_property
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
            raise RowMapError("rows must be >= the vocabulary length on both sides")
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

    # -- application: the one gather of rows by token identity --------------------------------
    def apply(self, tensor: torch.Tensor, dim: int = 0, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Gather ``tensor`` along ``dim`` into the target layout. New rows take ``fill``
        (shape: new rows x the other dims, in ``new_rows`` order) or zeros. One allocation of the
        output (a vocabulary matrix can be most of a model's memory)."""
        if tensor.shape[dim] != self.source_rows:
            raise RowMapError(f"tensor has {tensor.shape[dim]} rows along dim {dim}, the row map expects "
                              f"{self.source_rows}")
        moved = tensor.movedim(dim, 0)
        idx = self.index_tensor()
        out = moved.index_select(0, idx.clamp(min=0))  # new rows briefly hold row 0, overwritten below
        new = idx == NEW
        if new.any():
            out[new] = 0 if fill is None else fill.to(out.dtype).reshape(int(new.sum()), *moved.shape[1:])
        return out.movedim(0, dim).contiguous()

    def apply_chunk(self, take: Callable[[list[int]], torch.Tensor], a: int, b: int,
                    fill: torch.Tensor | None = None) -> torch.Tensor:
        """Target rows ``[a, b)`` (vocabulary dimension first) without the whole source in memory:
        ``take(ids)`` returns those source rows in that order (e.g. read from disk); new rows take
        their rows of ``fill`` (all new rows x the other dims, ``new_rows`` order) or zeros."""
        idx = self.source[a:b]
        pos = [i for i, s in enumerate(idx) if s != NEW]
        rows = take([idx[i] for i in pos])
        if len(pos) == len(idx):
            return rows
        out = rows.new_zeros((b - a, *rows.shape[1:]))
        if pos:
            out[torch.tensor(pos, dtype=torch.long)] = rows
        if fill is not None:
            new_here = [i for i, s in enumerate(idx) if s == NEW]
            first = bisect.bisect_left(self.new_rows, a)  # fill rows are in new_rows order
            out[torch.tensor(new_here, dtype=torch.long)] = fill[first:first + len(new_here)].to(out.dtype).reshape(
                len(new_here), *rows.shape[1:])
        return out

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


# -- adding tokens to a Hugging Face tokenizer (transformers imported lazily) ---------------

def runs(flags: list) -> list[tuple[int, int]]:
    """[start, end) of each run of equal consecutive values."""
    out, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            out.append((start, i))
            start = i
    return out


def encode_many(tokenizer, texts: list[str], batch: int = 2048) -> list[list[int]]:
    """input_ids of many texts, in batches (a fast tokenizer encodes a batch in one call)."""
    out = []
    for i in range(0, len(texts), batch):
        out += tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]
    return out


def add_token(tokenizer, content: str, special: bool) -> None:
    """Add one token (see :func:`add_tokens`)."""
    add_tokens(tokenizer, [content], special)


def add_tokens(tokenizer, contents: list[str], special: bool) -> None:
    """Add tokens, in order, the way transformers registers them: special tokens through
    ``add_special_tokens`` (so it is in ``all_special_tokens`` / ``all_special_ids``, dropped by
    ``skip_special_tokens=True``, and saved under ``extra_special_tokens`` in tokenizer_config.json,
    keeping the tokens already there); a non-special one as a plain added token."""
    from transformers import (
        AddedToken as HFAddedToken,  # lazily: this module needs torch only
    )

    toks = [HFAddedToken(c, special=special, normalized=False) for c in contents]
    if not special:
        tokenizer.add_tokens(toks)
        return
    params = getattr(tokenizer.add_special_tokens, "__code__", None)
    names = params.co_varnames if params else ()
    if "replace_extra_special_tokens" in names:  # transformers 5
        tokenizer.add_special_tokens({"extra_special_tokens": toks}, replace_extra_special_tokens=False)
    else:  # transformers 4 spelled it "additional"
        tokenizer.add_special_tokens({"additional_special_tokens": toks}, replace_additional_special_tokens=False)
