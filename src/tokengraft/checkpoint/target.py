"""The vocabulary a checkpoint is converted to: a folder with a tokenizer (and maybe config.json /
tokengraft.json), or a tokengraft.json alone (then the checkpoint's own tokenizer + its tokens)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files import read_json
from ..hf import config_rows
from ..manifest import FILENAME as MANIFEST_FILE
from ..manifest import Manifest
from ..vocab import fingerprint
from .errors import CheckpointError
from .sources import SourceVocabError

TOKENIZER_OUT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "processor_config.json", "preprocessor_config.json", "tekken.json")


@dataclass
class Target:
    folder: Path | None
    vocab: list
    rows: int | None
    tokenizer: object | None
    manifest: Manifest | None
    config: dict | None
    built: bool = False  # the tokenizer was built here (base + manifest tokens) and must be saved

    def base_size(self) -> int | None:
        """Tokens of the target's base vocabulary (before any added tokens), when known."""
        if self.manifest is not None:
            return self.manifest.base_size
        tk = getattr(self.tokenizer, "_tk", None)  # sources.JsonTokenizer
        if tk is not None:
            return tk.get_vocab_size(with_added_tokens=False)
        n = getattr(self.tokenizer, "vocab_size", None)
        return n if isinstance(n, int) else None


def load_target(target, source_vocab_hint=None) -> Target:
    """A folder with a tokenizer (and maybe config.json / tokengraft.json)."""
    from ..vocab import vocab_of
    from .sources import load_tokenizer

    p = Path(target)
    if p.is_file() and p.suffix == ".json":
        return Target(None, None, None, None, Manifest.load(p), None)
    if p.is_dir() and (p / MANIFEST_FILE).is_file() and not any((p / f).is_file() for f in TOKENIZER_OUT[:5]):
        return Target(None, None, None, None, Manifest.load(p), None)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: target folder not found (expected a folder with a tokenizer)")
    try:
        tok = load_tokenizer(p)
    except SourceVocabError as e:
        raise CheckpointError(f"target {e}; the target must be a folder with tokenizer files") from None
    config = None
    if (p / "config.json").is_file():
        config = read_json(p / "config.json", "a JSON model config", error=CheckpointError, kind=dict)
    manifest = Manifest.find(p)
    rows = config_rows(config) or (manifest.rows if manifest else None)
    return Target(p, vocab_of(tok), rows, tok, manifest, config)


def target_from_manifest(tgt: Target, info, source_tokenizer) -> None:
    """TARGET is a manifest alone: the target tokenizer is the checkpoint's (which must be the
    manifest's base vocabulary) plus the manifest's tokens at their ids."""
    from transformers import AddedToken, AutoTokenizer

    from ..vocab import vocab_of

    m = tgt.manifest
    tokdir = info.tokenizer_dir or (Path(source_tokenizer) if source_tokenizer else None)
    if tokdir is None:
        raise CheckpointError("a manifest as TARGET needs the checkpoint's tokenizer to build the target's: "
                              "pass --source-tokenizer DIR (or use a target folder with a tokenizer)")
    tok = AutoTokenizer.from_pretrained(tokdir, trust_remote_code=False)
    base = vocab_of(tok)
    if len(base) != m.base_size or fingerprint(base) != m.base_fingerprint:
        raise CheckpointError(f"{tokdir}: its vocabulary ({len(base)} tokens) is not the base the manifest was made "
                              f"on ({m.base_size} tokens, {m.base_fingerprint}); pass the target folder instead")
    for t in sorted(m.tokens, key=lambda t: t.id):
        tok.add_tokens([AddedToken(t.content, special=t.special, normalized=False)], special_tokens=t.special)
        if tok.convert_tokens_to_ids(t.content) != t.id:
            raise CheckpointError(f"manifest token {t.content!r} should have id {t.id} but lands at "
                                  f"{tok.convert_tokens_to_ids(t.content)}; the manifest has gaps tokengraft cannot rebuild")
    tgt.vocab, tgt.tokenizer, tgt.rows, tgt.built = vocab_of(tok), tok, m.rows, True
