"""Where the source vocabulary of a checkpoint comes from:

1. what the caller says explicitly: ``source_tokenizer`` (a tokenizer object or a folder holding
   one) or ``source_tokens`` (the target's base vocabulary plus these tokens, in id order); both
   at once is a conflict. An explicit source wins over the checkpoint's own tokenizer, and the
   sentence returned says when that one differs (never silently overridden either way);
2. the checkpoint's own tokenizer (its folder) or its ``tokengraft.json`` (base + added tokens);
3. nothing: the caller maps rows by index, and says so loudly.
"""
from __future__ import annotations

from pathlib import Path

from ..manifest import Manifest
from ..vocab import fingerprint, vocab_of
from ..errors import TokengraftError


class SourceVocabError(TokengraftError):
    pass


class JsonTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library alone: the vocabulary and encoding
    of a fast tokenizer without importing transformers (seconds and hundreds of MB saved)."""

    def __init__(self, tk):
        self._tk = tk

    def __len__(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids):
        return [self._tk.id_to_token(i) for i in ids]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self._tk.encode(text, add_special_tokens=add_special_tokens).ids}


def light_tokenizer(folder: Path):
    """A JsonTokenizer when ``tokenizer.json`` alone says everything, else None (use transformers):
    every added token the tokenizer config declares must sit at its id in tokenizer.json."""
    from ..files import read_json

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(path))
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg = read_json(cfg_path, "a tokenizer_config.json", kind=dict) if cfg_path.is_file() else {}
    except Exception:  # anything unusual: let transformers handle (or report) it
        return None
    for i, t in (cfg.get("added_tokens_decoder") or {}).items():
        content = t.get("content") if isinstance(t, dict) else None
        if content is None or tk.id_to_token(int(i)) != content:
            return None
    return JsonTokenizer(tk)


def load_tokenizer(folder):
    """A tokenizer from a folder: the light one when possible, else transformers' AutoTokenizer."""
    p = Path(folder)
    if not p.is_dir():
        raise SourceVocabError(f"{p}: not a folder with a tokenizer (tokenizer.json / tokenizer_config.json)")
    tok = light_tokenizer(p)
    if tok is not None:
        return tok
    from ..internlm2.config import is_internlm2_folder

    if is_internlm2_folder(p):  # InternLM2's tokenizer is remote code: read its sentencepiece model instead
        from ..internlm2 import load_tokenizer as internlm2_tokenizer

        return internlm2_tokenizer(p)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad folder
        raise SourceVocabError(f"{p}: cannot load a tokenizer from it ({type(e).__name__}: {e})") from None


def tokenizer_vocab(tok) -> list:
    """The vocabulary of a tokenizer object or folder."""
    if isinstance(tok, (str, Path)):
        tok = load_tokenizer(tok)
    return vocab_of(tok)


def manifest_vocab(manifest: Manifest, base_vocab: list, where: str) -> list:
    """Base vocabulary + the manifest's added tokens at their ids (needs the base to match)."""
    base = list(base_vocab[: manifest.base_size])
    if len(base) != manifest.base_size or fingerprint(base) != manifest.base_fingerprint:
        raise SourceVocabError(f"{where}: its tokengraft.json was made on a different base vocabulary than the "
                               f"target's; pass --source-tokenizer with the tokenizer the checkpoint was trained with")
    n = max([manifest.base_size] + [t.id + 1 for t in manifest.tokens])
    vocab = base + [None] * (n - len(base))
    for t in manifest.tokens:
        vocab[t.id] = t.content
    return vocab


def base_of(target_vocab: list, target_manifest: Manifest | None, tokens: list[str]) -> list:
    """The target's base vocabulary: what its manifest calls base, else everything before the first
    of ``tokens`` the target has, else the whole target vocabulary."""
    if target_manifest is not None:
        return list(target_vocab[: target_manifest.base_size])
    where = {t: i for i, t in enumerate(target_vocab) if t is not None}
    ids = [where[t] for t in tokens if t in where]
    return list(target_vocab[: min(ids)]) if ids else list(target_vocab)


def _own_vocab(info, target_vocab) -> tuple[list | None, str]:
    """The checkpoint's own vocabulary (its tokenizer, else its tokengraft.json), or (None, "")."""
    if info is not None and info.tokenizer_dir is not None:
        v = tokenizer_vocab(info.tokenizer_dir)
        return v, f"the checkpoint's own tokenizer ({info.tokenizer_dir}, {len(v)} tokens)"
    if info is not None and info.manifest is not None and target_vocab is not None:
        v = manifest_vocab(info.manifest, target_vocab, str(info.path))
        return v, f"the checkpoint's tokengraft.json (base {info.manifest.base_size} + {len(info.manifest.tokens)} tokens)"
    return None, ""


def _given_vocab(target_vocab, target_manifest, source_tokenizer, source_tokens) -> tuple[list, str]:
    if source_tokenizer is not None:
        v = tokenizer_vocab(source_tokenizer)
        return v, f"--source-tokenizer {source_tokenizer if isinstance(source_tokenizer, (str, Path)) else ''}".strip() \
            + f" ({len(v)} tokens)"
    toks = [t.strip() for t in source_tokens.split(",")] if isinstance(source_tokens, str) else list(source_tokens)
    toks = [t for t in toks if t]
    if target_vocab is None:
        raise SourceVocabError("--source-tokens needs a target tokenizer (its base vocabulary comes first)")
    if len(set(toks)) != len(toks):
        raise SourceVocabError(f"--source-tokens lists a token twice: {toks}")
    base = base_of(target_vocab, target_manifest, toks)
    clash = [t for t in toks if t in set(base)]
    if clash:
        raise SourceVocabError(f"--source-tokens: {clash} are already in the target's base vocabulary")
    return base + toks, f"the target's base ({len(base)} tokens) + --source-tokens {','.join(toks)}"


def resolve_source_vocab(info, target_vocab, *, target_manifest: Manifest | None = None, source_tokenizer=None,
                         source_tokens=None) -> tuple[list | None, str]:
    """(source vocabulary or None, a sentence saying where it came from)."""
    if source_tokenizer is not None and source_tokens is not None:
        raise SourceVocabError("--source-tokenizer and --source-tokens both say what the checkpoint's vocabulary is; "
                               "pass one of them")
    if source_tokenizer is None and source_tokens is None:
        own, how = _own_vocab(info, target_vocab)
        if own is not None:
            return own, how
        return None, "none found (no tokenizer or tokengraft.json in the checkpoint, no --source-tokenizer/--source-tokens)"
    v, how = _given_vocab(target_vocab, target_manifest, source_tokenizer, source_tokens)
    try:
        own, own_how = _own_vocab(info, target_vocab)
    except TokengraftError as e:  # the checkpoint's own is unreadable: the flag is all there is
        return v, f"{how}, as given (the checkpoint's own vocabulary is unreadable: {e})"
    if own is None:
        return v, how
    if own == v:
        return v, f"{how}, as given (the same as {own_how})"
    diff = next((i for i, (a, b) in enumerate(zip(own, v)) if a != b), min(len(own), len(v)))
    return v, (f"{how}, as given: it wins over {own_how}, which differs (first at id {diff}: "
               f"{own[diff] if diff < len(own) else '<none>'!r} vs {v[diff] if diff < len(v) else '<none>'!r})")
