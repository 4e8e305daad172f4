"""What a user asks to add: ``TokenSpec`` and the tokens-file schema (docs/add.md), checked before
any model is loaded. ``--tokens '<a>,<b>'``, a list in Python, or a YAML/JSON tokens file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import init as I
from .errors import TokengraftError
from .files import MiB, describe, field, parse_json, read_text
from .manifest import ROLES


class GraftError(TokengraftError):
    pass


@dataclass
class TokenSpec:
    content: str
    special: bool = True
    role: str = "generate"
    init: str = "auto"
    description: str | None = None
    stop: bool = False


def parse_tokens(tokens=None, tokens_file: str | None = None) -> list[TokenSpec]:
    """Tokens from a comma-separated string, a list (of strings, dicts or TokenSpec), and/or a
    YAML/JSON tokens file, each checked against the schema (docs/add.md): ``content`` a non-empty
    string (valid UTF-8, no lone surrogates), ``special``/``stop`` true or false, ``role`` and
    ``init`` from their lists, ``description`` a string or null. Duplicates are errors."""
    items: list = []  # (item, where: the source and the entry's index in it)
    if isinstance(tokens, str):
        items += [(t, f"--tokens: token {i}") for i, t in enumerate(tokens.split(","))] if tokens else []
    elif tokens:
        items += [(t, f"token entry {i}") for i, t in enumerate(tokens)]
    if tokens_file:
        items += [(t, f"{tokens_file}: token entry {i}") for i, t in enumerate(_read_tokens_file(tokens_file))]
    specs, seen = [], set()
    for it, where in items:
        if isinstance(it, TokenSpec):
            spec = it
        elif isinstance(it, str):
            spec = TokenSpec(it.strip() if it.strip() else it)
        elif isinstance(it, dict):
            unknown = set(map(str, it)) - set(TokenSpec.__dataclass_fields__)
            if unknown or "content" not in it:
                raise GraftError(f"{where}: expected keys content[, description, role, special, init, stop], "
                                 f"got {sorted(map(str, it))}")
            spec = TokenSpec(**it)
        else:
            raise GraftError(f"{where}: expected a string or a mapping, got {describe(it)}")
        _check_spec(spec, where)
        if spec.content in seen:
            raise GraftError(f"{where}: token {spec.content!r} is listed twice; list each token once")
        seen.add(spec.content)
        specs.append(spec)
    return specs


def _check_spec(spec: TokenSpec, where: str) -> None:
    d = vars(spec)
    f = lambda key, kind: field(d, key, kind, where, error=GraftError)  # noqa: E731
    content = f("content", str)
    if not content.strip():
        raise GraftError(f"{where}: empty or whitespace-only token {content!r}; remove it")
    for key in ("content", "description"):
        if key == "content" or d[key] is not None:
            try:
                f(key, str).encode("utf-8")
            except UnicodeEncodeError:
                raise GraftError(f"{where}: field {key!r} holds {d[key]!r}, not valid Unicode text (a lone "
                                 f"surrogate or undecodable bytes); write the token in UTF-8") from None
    f("special", bool)
    f("stop", bool)
    if f("role", str) not in ROLES:
        raise GraftError(f"{where} ({content!r}): role {spec.role!r} is not one of {ROLES}")
    method = f("init", str).split(":", 1)[0]
    if method not in I.FOR_GRAFT:
        raise GraftError(f"{where} ({content!r}): init {spec.init!r} is not one of {I.FOR_GRAFT} "
                         f"(copy as copy:TOKEN)")
    if method in ("describe", "distill") and not spec.description:
        raise GraftError(f"token {content!r}: init '{method}' needs a description in the tokens file")


def _read_tokens_file(path: str) -> list:
    p = Path(path)
    is_json = p.suffix.lower() == ".json"
    what = "a tokens file (a list of tokens, or a mapping with key 'tokens')"
    text = read_text(p, what, error=GraftError, limit=64 * MiB, missing=f"{p}: cannot read tokens file (no such file)")
    if is_json:
        data = parse_json(text, str(p), what, error=GraftError)
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise GraftError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if isinstance(data, dict) and "tokens" in data:
        data = data["tokens"]
    if not isinstance(data, list):
        raise GraftError(f"{p}: expected a list of tokens (or a mapping with key 'tokens'), found {describe(data)}")
    return data
