"""InternLM2's sentencepiece tokenizer as a transformers tokenizer, without its remote code, checked
to encode exactly as sentencepiece does."""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from .config import InternLM2Error
from .weights import read_json

# -- tokenizer ------------------------------------------------------------------------------------

PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
SP_BPE = 2


def _sp_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise InternLM2Error(f"reading {path} needs the sentencepiece and protobuf packages "
                             f"(pip install sentencepiece protobuf): {e}") from None
    from google.protobuf.message import DecodeError

    m = pb.ModelProto()
    try:
        m.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise InternLM2Error(f"{path}: not a sentencepiece model ({e})") from None
    return m


def _check_sp(m, path: Path) -> None:
    """The sentencepiece options the bridge reproduces; anything else is refused by name."""
    ts, ns = m.trainer_spec, m.normalizer_spec
    bad = []
    if ts.model_type != SP_BPE:
        bad.append(f"trainer_spec.model_type {ts.model_type} (only BPE, 2)")
    if ts.treat_whitespace_as_suffix:
        bad.append("trainer_spec.treat_whitespace_as_suffix")
    if ns.remove_extra_whitespaces:
        bad.append("normalizer_spec.remove_extra_whitespaces")
    if ns.precompiled_charsmap or ns.name not in ("identity", ""):
        bad.append(f"normalizer_spec.name {ns.name!r} (only 'identity')")
    if bad:
        raise InternLM2Error(f"{path}: sentencepiece option(s) the bridge cannot reproduce exactly: {', '.join(bad)}")


def _sp_backend(m):
    """A ``tokenizers`` pipeline that segments like sentencepiece's BPE on one stretch of text.

    Sentencepiece merges the adjacent pair whose result has the highest score, so merges are ranked by
    the score of the piece they make (ties: lower id first); words start at whitespace (a run of
    whitespace stays with the word after it when whitespace-only pieces are allowed)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    pieces = m.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece for p in pieces if p.type == PIECE_NORMAL}
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != PIECE_NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            a, b = p.piece[:cut], p.piece[cut:]
            if a in mergeable and b in mergeable:
                ranked.append((-p.score, i, cut, a, b))
    ranked.sort()
    unk = next((p.piece for p in pieces if p.type == PIECE_UNKNOWN), None)
    bpe = BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk, fuse_unk=True,
              byte_fallback=m.trainer_spec.byte_fallback)
    ws = "\u2581"
    norm = [normalizers.Replace(" ", ws)]
    if m.normalizer_spec.add_dummy_prefix:
        norm.insert(0, normalizers.Prepend(ws))
    words = f"{ws}+[^{ws}]*|[^{ws}]+" if m.trainer_spec.allow_whitespace_only_pieces else f"{ws}[^{ws}]*|[^{ws}]+"
    pre = pre_tokenizers.Split(Regex(words), behavior="isolated") if m.trainer_spec.split_by_whitespace else None
    dec = [decoders.Replace(ws, " "), decoders.ByteFallback(), decoders.Fuse()]
    if m.normalizer_spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    return bpe, normalizers.Sequence(norm), pre, decoders.Sequence(dec)


def load_tokenizer(folder):
    """InternLM2's tokenizer as a transformers Llama tokenizer, without its remote code: the pieces and
    merges of ``tokenizer.model``, InternLM2's added tokens (``added_tokens_decoder``) at their ids, its
    bos/eos flags and chat template."""
    # LlamaTokenizerFast: the tokenizers-backed class in 4.x and 5.x (5.x's LlamaTokenizer is it too;
    # 4.x's LlamaTokenizer is the slow sentencepiece one, without a backend_tokenizer)
    from transformers import AddedToken, LlamaTokenizerFast, PreTrainedTokenizerFast

    folder = Path(folder)
    sp_file = folder / "tokenizer.model"
    if not sp_file.is_file():
        raise InternLM2Error(f"{folder}: no tokenizer.model; an InternLM2 folder keeps its sentencepiece model there")
    tc = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    m = _sp_proto(sp_file)
    _check_sp(m, sp_file)

    def tok_str(v, default):
        return v.get("content", default) if isinstance(v, dict) else (v or default)

    special = {k: tok_str(tc.get(k), d) for k, d in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    with tempfile.TemporaryDirectory(prefix="tokengraft-internlm2-") as tmp:
        shutil.copy(sp_file, Path(tmp) / "tokenizer.model")  # the model file alone: nothing else is read
        tok = LlamaTokenizerFast.from_pretrained(tmp, add_bos_token=bool(tc.get("add_bos_token", True)),
                                                 add_eos_token=bool(tc.get("add_eos_token", False)), **special)
    backend = tok.backend_tokenizer  # its post-processor (bos/eos) and added pieces are kept
    backend.model, backend.normalizer, backend.pre_tokenizer, backend.decoder = _sp_backend(m)
    # A plain tokenizers-backed class: transformers' LlamaTokenizer would rebuild its own pre-tokenizer
    # on reload (tokenizer.json's pipeline ignored), so a saved copy would no longer encode like InternLM2.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special, add_bos_token=bool(tc.get("add_bos_token", True)),
                                  add_eos_token=bool(tc.get("add_eos_token", False)),
                                  clean_up_tokenization_spaces=bool(tc.get("clean_up_tokenization_spaces", False)))

    n = len(m.pieces)
    decoder = sorted(((int(i), v) for i, v in (tc.get("added_tokens_decoder") or {}).items()), key=lambda x: x[0])
    for i, v in decoder:
        content = v["content"] if isinstance(v, dict) else str(v)
        if i < n:
            if m.pieces[i].piece != content:
                raise InternLM2Error(f"{folder / 'tokenizer_config.json'}: added token {content!r} at id {i}, but "
                                     f"tokenizer.model has {m.pieces[i].piece!r} there")
        elif i != len(tok):
            raise InternLM2Error(f"{folder / 'tokenizer_config.json'}: added token {content!r} at id {i}, but the "
                                 f"next free id is {len(tok)}; added tokens must follow the model's pieces without gaps")
        opts = v if isinstance(v, dict) else {}
        at = AddedToken(content, special=bool(opts.get("special", True)), normalized=bool(opts.get("normalized", False)),
                        lstrip=bool(opts.get("lstrip", False)), rstrip=bool(opts.get("rstrip", False)),
                        single_word=bool(opts.get("single_word", False)))
        tok.add_tokens([at], special_tokens=at.special)
        if tok.convert_tokens_to_ids(content) != i:
            raise InternLM2Error(f"added token {content!r} landed at id {tok.convert_tokens_to_ids(content)}, "
                                 f"not at its id {i}")
    extra = [tok_str(t, None) for t in tc.get("additional_special_tokens") or []]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": [t for t in extra if t]})
    pad = tc.get("pad_token")
    if pad:
        tok.pad_token = tok_str(pad, None)
    if tc.get("chat_template"):
        tok.chat_template = tc["chat_template"]
    if tc.get("model_max_length"):
        tok.model_max_length = tc["model_max_length"]
    _self_check(tok, sp_file)
    return tok


def sp_reference_ids(sp_file, text: str, added: dict[str, int], bos_id: int | None = None) -> list[int]:
    """What InternLM2's own tokenizer computes, straight from the sentencepiece library: ``bos_id``
    (if given), then the text cut at its added tokens (``added``: content -> id), every other stretch
    ``SentencePieceProcessor.encode``d."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    ids = [] if bos_id is None else [bos_id]
    chunks = [text]
    if added:
        pattern = "(" + "|".join(re.escape(s) for s in sorted(added, key=len, reverse=True)) + ")"
        chunks = re.split(pattern, text)
    for c in chunks:
        if c:
            ids += [added[c]] if c in added else sp.encode(c)
    return ids


# prose, code indentation, runs of spaces, a leading space, bytes outside the pieces
_PROBE = ("Beautiful is better than ugly.\nExplicit is better than implicit.\n\n"
          "def f(x):\n    return  x  # two\n\tpass\n leading, trailing   naïve café 日本語 😀 ∑ 1234567")


def _self_check(tok, sp_file: Path) -> None:
    """Refuse a tokenizer.model whose encoding the bridge does not reproduce (checked on a probe text
    with the sentencepiece library, when it is installed)."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return
    added = {t.content: i for i, t in tok.added_tokens_decoder.items()}
    text = _PROBE + "".join(f"{t} x{t}\ny " for t in list(added)[:12])
    want = sp_reference_ids(sp_file, text, added)
    got = tok(text, add_special_tokens=False)["input_ids"]
    if got != want:
        at = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise InternLM2Error(f"{sp_file}: the bridge does not tokenize this sentencepiece model exactly "
                             f"(ids differ from sentencepiece at position {at}); please report it")
