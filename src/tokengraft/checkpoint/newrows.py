"""Values for rows new to the target vocabulary, one tensor at a time, by the strategies of
:mod:`tokengraft.init`. The source rows are read through :class:`Rows` (in memory) or a subclass
that reads from disk in chunks (``stream.FileRows``), so statistics never need the whole matrix
in float32."""
from __future__ import annotations

import torch

from .. import init as I
from ..vocab import NEW, RowMap
from .layout import VocabTensor

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
    then the rows that do not look trained (``init.looks_trained``) are read again (``take``) and taken out of the sum. Usually they are few."""
    n = min(base_rows, rows)
    norms, total = [], None
    for a in range(0, n, CHUNK_ROWS):
        chunk = read(a, min(a + CHUNK_ROWS, n)).float()  # a chunk at a time: never the whole matrix in float32
        norms.append(chunk.norm(dim=1))
        part = chunk.sum(0).double()
        total = part if total is None else total + part
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[:n] = I.looks_trained(torch.cat(norms))
    off = (~mask[:n]).nonzero().flatten().tolist()
    if off:
        total = total - take(off).float().sum(0).double()
    return mask, (total / (n - len(off))).float()


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
    for t in new:
        tok = rm.new_tokens.get(t)
        method = init
        if method == "auto":
            method = I.auto_method(vt.side, tied, tok is not None and tokenizer is not None)
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
