"""The manifest (``tokengraft.json``): what vocabulary change was made, recorded with every artifact.

Pure data, JSON in and out. Depends on nothing but the standard library.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from .errors import TokengraftError
from .files import field as read_field
from .files import read_json

SCHEMA_VERSION = 1
FILENAME = "tokengraft.json"
ROLES = ("generate", "input")
MAX_ROWS = 1 << 24  # 16.7M rows: 64x the largest real vocabulary (262k); a larger id or row count is corrupt
MAX_PAD_MULTIPLE = 1 << 16  # --pad-to-multiple-of: real models use 8 to 1024


class ManifestError(TokengraftError):
    pass


@dataclass
class AddedToken:
    content: str
    id: int
    special: bool = True
    role: str = "generate"  # "generate": the model emits it; "input": a placeholder never generated
    init: str = "auto"  # the strategy that initialized it, input side / output side ("subword/mean")
    description: str | None = None
    stop: bool = False  # generation stops at it (export adds it to eos_token_id)


@dataclass
class Manifest:
    base_fingerprint: str
    base_size: int
    rows: int
    tied: bool
    pad_multiple: int = 64
    tokens: list[AddedToken] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    vocab_fingerprint: str | None = None  # fingerprint of the tokenizer after the last change
    schema_version: int = SCHEMA_VERSION

    # -- queries ------------------------------------------------------------------------------
    def token(self, content: str) -> AddedToken | None:
        return next((t for t in self.tokens if t.content == content), None)

    @property
    def contents(self) -> list[str]:
        return [t.content for t in self.tokens]

    def record(self, op: str, **details) -> None:
        from ._version import __version__

        self.history.append({"op": op, "tool": f"tokengraft {__version__}",
                             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details})

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object (schema_version, tokens, ...), found "
                                f"{type(d).__name__}; is this a tokengraft.json?")
        v = d.get("schema_version")
        if not isinstance(v, int) or isinstance(v, bool):
            raise ManifestError(f"{where}: no integer 'schema_version'; is this a tokengraft.json?")
        if v > SCHEMA_VERSION:
            raise ManifestError(f"{where}: schema version {v} is newer than this tokengraft understands "
                                f"({SCHEMA_VERSION}); upgrade tokengraft (pip install -U tokengraft)")
        f = lambda key, kind, *a, **k: read_field(d, key, kind, where, *a, error=ManifestError, **k)  # noqa: E731
        rows = f("rows", int, lo=1, hi=MAX_ROWS)
        base_size = f("base_size", int, lo=0, hi=rows)
        toks = [_token(t, i, where, rows) for i, t in enumerate(f("tokens", list, []))]
        for kind, values in (("content", [t.content for t in toks]), ("id", [t.id for t in toks])):
            if len(set(values)) != len(values):
                dup = Counter(values).most_common(1)[0][0]
                raise ManifestError(f"{where}: two tokens share the {kind} {dup!r}; the manifest is corrupt")
        history = f("history", list, [])
        return cls(base_fingerprint=f("base_fingerprint", str), base_size=base_size, rows=rows,
                   tied=f("tied", bool), pad_multiple=f("pad_multiple", int, 64, lo=1, hi=MAX_PAD_MULTIPLE),
                   tokens=toks, history=list(history),
                   vocab_fingerprint=f("vocab_fingerprint", str, None, nullable=True), schema_version=v)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / FILENAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        d = read_json(p, "a tokengraft manifest (tokengraft.json)", error=ManifestError, kind=dict,
                      missing=f"{p}: no manifest here; create one with `tokengraft add`")
        return cls.from_dict(d, where=str(p))

    @classmethod
    def find(cls, folder: str | os.PathLike) -> "Manifest | None":
        p = Path(folder) / FILENAME
        return cls.load(p) if p.is_file() else None


def _token(t, i: int, where: str, rows: int) -> AddedToken:
    """One entry of ``tokens``, by the schema: its id inside the rows, booleans that are booleans."""
    at = f"{where}: tokens[{i}]"
    if not isinstance(t, dict):
        raise ManifestError(f"{at}: expected an object (content, id, ...), got {type(t).__name__}")
    unknown = sorted(set(map(str, t)) - set(AddedToken.__dataclass_fields__))
    if unknown:
        raise ManifestError(f"{at}: unknown field(s) {', '.join(unknown)}; the manifest is corrupt")
    f = lambda key, kind, *a, **k: read_field(t, key, kind, at, *a, error=ManifestError, **k)  # noqa: E731
    tok = AddedToken(content=f("content", str), id=f("id", int, lo=0, hi=rows - 1), special=f("special", bool, True),
                     role=f("role", str, "generate"), init=f("init", str, "auto"),
                     description=f("description", str, None, nullable=True), stop=f("stop", bool, False))
    if not tok.content:
        raise ManifestError(f"{at}: field 'content' is empty; the manifest is corrupt")
    if tok.role not in ROLES:
        raise ManifestError(f"{where}: token {tok.content!r} has role {tok.role!r}, expected one of {ROLES}")
    return tok
