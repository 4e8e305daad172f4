"""The one reader of user JSON files, and a typed-field helper for their schemas. stdlib only (core).

Every JSON file a user hands tokengraft (configs, manifests, tokens files, index files, run.json,
data) is read here, so each refusal is the same one line: a FIFO or device named as ``config.json``
is refused before it is opened (it would block), a file over ``limit`` bytes is refused before it is
read, undecodable UTF-8 and invalid JSON name the file and line. ``field`` checks one value of a
parsed object by JSON type: ``"false"`` (a string) is not a boolean, ``true`` is not an integer.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .errors import TokengraftError

MiB = 1 << 20
LIMIT = 256 * MiB  # configs, manifests, tokenizers, indexes: the largest real tokenizer.json is ~35 MiB
_MISSING = object()


class FileError(TokengraftError):
    """A user file that cannot be read as what it should be."""


def read_text(path, what: str, *, error: type[TokengraftError] = FileError, limit: int = LIMIT,
              missing: str | None = None) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes; ``what`` says what it should be
    ("a model config"), ``missing`` the message for a file that is not there."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(missing or f"{p}: no such file; expected {what}") from None
    except OSError as e:
        raise error(f"{p}: cannot read it ({e.strerror or e}); expected {what}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise error(f"{p}: is {kind}; expected {what} as a plain file")
    if st.st_size > limit:
        raise error(f"{p}: {st.st_size:,} bytes, over the {limit:,}-byte limit for {what}; "
                    f"is this the right file?")
    try:
        with open(p, "rb") as f:  # a regular file: opening cannot block
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{p}: cannot read it ({e.strerror or e}); expected {what}") from None
    if len(data) > limit:  # grew since the stat
        raise error(f"{p}: over the {limit:,}-byte limit for {what}; is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{p}: not UTF-8 text (byte {e.start}); expected {what}") from None


def parse_json(text: str, where: str, what: str, *, error: type[TokengraftError] = FileError):
    """``text`` parsed as JSON; ``where`` (a file, ``file:line`` or a flag) names it in the error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg}, line {e.lineno}); expected {what}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply; expected {what}") from None


def read_json(path, what: str, *, error: type[TokengraftError] = FileError, limit: int = LIMIT,
              missing: str | None = None, kind: type | None = None):
    """The JSON value in ``path`` (see ``read_text``); with ``kind`` (dict, list) it must be one."""
    value = parse_json(read_text(path, what, error=error, limit=limit, missing=missing), str(path), what,
                       error=error)
    if kind is not None and not _is(value, kind):
        raise error(f"{path}: expected a JSON {_JSON_NAME.get(kind, kind.__name__)} ({what}), found {describe(value)}")
    return value


# -- typed fields ---------------------------------------------------------------------------------

_JSON_NAME = {dict: "object", list: "list"}
_EXPECTED = {bool: "true or false", str: "a string", int: "an integer", float: "a number",
             list: "a list", dict: "an object"}


def describe(v) -> str:
    """A JSON value as a user reads it: "the string 'false'", "the number 1", "null", "a list"."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    return {list: "a list", dict: "an object"}.get(type(v), f"a {type(v).__name__}")


def _is(v, kind) -> bool:
    if kind is bool:
        return isinstance(v, bool)
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, kind)


def out_of_range(v, kind: type, lo=None, hi=None, *, above: bool = False) -> str | None:
    """What is wrong with the number ``v`` as ``kind`` (int, float) in [lo, hi] (``above``: lo
    itself excluded), e.g. "expected an integer from 1 to 65,536"; None when it is fine. The one
    range rule of flags (commands._common.number), YAML configs and JSON fields."""
    want = _EXPECTED[kind] if kind in (int, float) else kind.__name__
    if lo is not None and hi is not None and not above:
        want += f" from {_num(lo)} to {_num(hi)}"
    else:
        want += " and".join(f" {op} {_num(b)}" for op, b in ((">" if above else ">=", lo), ("<=", hi))
                            if b is not None)
    ok = _is(v, kind) and (lo is None or (v > lo if above else v >= lo)) and (hi is None or v <= hi)
    return None if ok else f"expected {want}" + (" (finite)" if kind is float and None in (lo, hi) else "")


def _num(b) -> str:
    return f"{int(b):,}" if float(b).is_integer() and abs(b) < 1e15 else f"{b:g}"


def field(d: dict, key: str, kind: type, where: str, default=_MISSING, *, lo=None, hi=None,
          error: type[TokengraftError] = FileError, expected: str | None = None, nullable: bool = False):
    """``d[key]`` if it is of JSON type ``kind`` (bool, str, int, float = any finite number, list,
    dict) and, for numbers, in [lo, hi]; ``default`` when absent (absent and no default: an error);
    ``nullable``: null is allowed too. Else one line "WHERE: field 'stop' must be true or false, got
    the string 'false'"."""
    if key not in d:
        if default is _MISSING:
            raise error(f"{where}: field {key!r} is missing; it must be {expected or _EXPECTED[kind]}")
        return default
    v = d[key]
    if v is None and nullable:
        return v
    if kind in (int, float) and (lo is not None or hi is not None):
        problem = out_of_range(v, kind, lo, hi)
        if problem:
            raise error(f"{where}: field {key!r} must be {problem[len('expected '):]}, got {describe(v)}")
    elif not _is(v, kind):
        want = expected or _EXPECTED[kind] + (" (finite)" if kind is float else "")
        raise error(f"{where}: field {key!r} must be {want}" + (" or null" if nullable else "")
                    + f", got {describe(v)}")
    return v


def read_index(path, *, error: type[TokengraftError] = FileError) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index (``model.safetensors.index.json``): a
    non-empty object of tensor name -> shard file name, each shard a plain name in the same folder."""
    what = "a sharded checkpoint index with a 'weight_map'"
    wm = field(read_json(path, what, error=error, kind=dict), "weight_map", dict, str(path), error=error,
               expected="an object of tensor name -> shard file")
    if not wm:
        raise error(f"{path}: field 'weight_map' is empty; the index is corrupt")
    for k, v in wm.items():
        if not isinstance(v, str) or not v or os.path.basename(v) != v or v in (".", ".."):
            raise error(f"{path}: weight_map[{k[:60]!r}] must be a shard file name in the same folder, "
                        f"got {describe(v)}; the index is corrupt")
    return wm
