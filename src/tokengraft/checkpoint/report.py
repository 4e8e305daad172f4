"""What a remap did: rows kept, moved, new and dropped, every tensor remapped, how new rows began."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..vocab import RowMap
from .layout import VocabTensor


@dataclass
class RemapReport:
    row_map: RowMap | None = None  # None: a report used only to collect remapped moments
    remapped: list[dict] = field(default_factory=list)  # key, kind, side, dim, shape before/after
    init: dict[str, str] = field(default_factory=dict)  # "input:<tok>" -> strategy
    untouched: int = 0
    notes: list[str] = field(default_factory=list)
    adapter_config: dict | None = None  # rewritten PEFT config (trainable_token_indices)
    optimizer: dict | None = None  # the remapped optimizer state, when one was given
    source_how: str | None = None  # how the source vocabulary was found
    tied: bool | None = None  # one matrix serves input and head (one row per token on both keys)
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


def record(report: "RemapReport", vt: VocabTensor, rm: RowMap, names: list[str], tied: bool,
           before, after) -> None:
    for t, n in zip(rm.new_rows, names):
        tok = rm.new_tokens.get(t)
        if tok is not None and vt.kind == "weight":
            report.init.setdefault(f"{'tied' if tied else vt.side}:{tok}", n)
    report.remapped.append({"key": vt.key, "kind": vt.kind, "side": vt.side, "dim": vt.dim,
                            "before": list(before), "after": list(after)})
