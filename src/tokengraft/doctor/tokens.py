"""Checks between the tokenizer, the manifest and the generation config: padding rows suppressed,
added tokens not suppressed, tokengraft.json and the tokenizer agreeing in both directions,
special tokens that encode to one id."""
from __future__ import annotations

from ..manifest import FILENAME as MANIFEST_FILE
from .findings import Finding
from .rows import manifest_roles
from .subject import Subject


def _span(ids: list[int]) -> str:
    if len(ids) > 3 and ids[-1] - ids[0] == len(ids) - 1:
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def check_suppressed(s: Subject) -> list[Finding]:
    """Padding rows (ids >= len(tokenizer)) must never be generated: listed in suppress_tokens.
    And the reverse: a token added on a padding row must not stay suppressed."""
    if s.rows is None or s.ntok is None:
        return []
    out = []
    sup = set((s.gen or {}).get("suppress_tokens") or [])
    missing = sorted(set(range(s.ntok, s.rows)) - sup)
    where = s.gen_name if s.gen is not None else f"{s.where} (no generation_config.json)"
    if missing:
        out.append(Finding("warning", "padding-not-suppressed",
                           f"{where}: {len(missing)} padding row(s) with no token (ids {_span(missing)}) are not in "
                           f"suppress_tokens, so generation can emit ids the tokenizer cannot decode; add them to "
                           f"suppress_tokens (`tokengraft add` does this)"))
    # tokens beyond the base vocabulary (grafted, or added by hand on a padding row) that generation
    # can never emit; suppressing real base tokens (as Whisper does) is left alone
    added = manifest_roles(s)
    base = s.manifest.base_size if s.manifest is not None else s.ntok
    stuck = sorted(i for i in sup if isinstance(i, int) and base <= i < s.ntok
                   and (i not in added or added[i].role == "generate"))
    if stuck:
        tok = s.tokenizer
        shown = ", ".join(f"{i} {tok.convert_ids_to_tokens(i)!r}" for i in stuck[:5]) + (", ..." if len(stuck) > 5 else "")
        out.append(Finding("warning", "token-suppressed",
                           f"{where}: suppress_tokens lists {len(stuck)} added token(s) ({shown}), so generation "
                           f"can never emit them; remove them from suppress_tokens"))
    return out


def check_manifest(s: Subject) -> list[Finding]:
    """tokengraft.json present and consistent with the tokenizer (both ways) and the weights."""
    m = s.manifest
    if m is None:
        if s.in_memory or any(f.code == "manifest-invalid" for f in s.findings):
            return []
        return [Finding("info", "manifest-missing",
                        f"{s.where}: no {MANIFEST_FILE}; tokens were not added with tokengraft (`tokengraft add` "
                        f"records every change)")]
    out = []
    mname = "manifest" if s.in_memory else f"{s.where}/{MANIFEST_FILE}"
    tok = s.tokenizer
    if tok is not None:
        from ..vocab import fingerprint, vocab_of

        vocab_list = vocab_of(tok)
        fp = fingerprint(vocab_list)
        recorded = {t.id for t in m.tokens}
        # tokens after the base that the manifest does not record: added by hand, or their record
        # was removed from tokengraft.json; either way nothing says how their rows were made
        extra = [(i, t) for i, t in enumerate(vocab_list) if i >= m.base_size and i not in recorded and t is not None]
        names = ", ".join(f"{i} {t!r}" for i, t in extra[:5]) + (", ..." if len(extra) > 5 else "")
        if m.vocab_fingerprint is not None and fp != m.vocab_fingerprint:
            out.append(Finding("error", "manifest-fingerprint-mismatch",
                               f"{mname}: the tokenizer's vocabulary ({len(tok)} tokens, {fp}) is not the one "
                               f"recorded ({m.vocab_fingerprint})" + (f"; not in the manifest: {names}" if extra else "")
                               + "; it was edited outside tokengraft: restore the saved tokenizer, or add tokens "
                                 "with `tokengraft add` so their rows are initialized and recorded"))
        elif extra:
            out.append(Finding("error", "manifest-token-unrecorded",
                               f"{mname}: the tokenizer has {len(extra)} token(s) after the {m.base_size}-token base "
                               f"that the manifest does not record ({names}); their rows' origin is unknown: restore "
                               f"{MANIFEST_FILE} from the folder `tokengraft add` wrote, or re-add the tokens with "
                               f"`tokengraft add`"))
        vocab = s.vocab
        for t in m.tokens:
            got = vocab.get(t.content)
            if got != t.id:
                where_now = "is not in the tokenizer" if got is None else f"has id {got} in the tokenizer"
                out.append(Finding("error", "manifest-token-mismatch",
                                   f"{mname}: token {t.content!r} is recorded at id {t.id} but {where_now}; rows "
                                   f"would be read for the wrong token: restore the saved tokenizer"))
    if s.rows is not None and m.rows != s.rows:
        out.append(Finding("error", "manifest-rows-mismatch",
                           f"{mname}: records {m.rows} rows but {s.emb.name} has {s.rows}; the weights were resized "
                           f"outside tokengraft: convert them with `tokengraft convert`"))
    real_tied = tied_reality(s)
    if real_tied is not None and m.tied != real_tied:
        out.append(Finding("error", "manifest-tied-mismatch",
                           f"{mname}: records tied={str(m.tied).lower()} but the weights are "
                           f"{'tied' if real_tied else 'untied'}; the head was (un)tied outside tokengraft: restore "
                           f"the checkpoint the manifest belongs to"))
    for t in m.tokens:
        if s.rows is not None and not 0 <= t.id < s.rows:
            out.append(Finding("error", "manifest-token-out-of-range",
                               f"{mname}: token {t.content!r} has id {t.id}, outside the {s.rows} rows"))
    return out


def tied_reality(s: Subject) -> bool | None:
    if s.emb is None:
        return None
    if s.in_memory:
        return s.tied_in_memory
    if s.head is None:
        return True if s.tie_flag is not False else None
    return None if s.head_equals_emb() else False  # equal tensors: either is true


def check_split_tokens(s: Subject) -> list[Finding]:
    """Special tokens (the manifest's, the tokenizer's added specials, the image token) must each
    encode to their own single id, alone and inside running text."""
    tok = s.tokenizer
    if tok is None:
        return []
    cands: dict[str, str] = {}
    if s.manifest is not None:
        cands.update({t.content: "grafted" for t in s.manifest.tokens})
    for t in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(t, "special", False):
            cands.setdefault(str(t), "special")
    if s.processor is not None and getattr(s.processor, "image_token", None):
        cands.setdefault(s.processor.image_token, "image")
    vocab = s.vocab
    out = []
    for content, kind in cands.items():
        tid = vocab.get(content)
        if tid is None:
            continue  # reported by the manifest / image checks
        alone = tok(content, add_special_tokens=False)["input_ids"]
        inside = tok(f"a{content}b {content}.", add_special_tokens=False)["input_ids"]
        if alone != [tid] or inside.count(tid) != 2:
            how = (f"alone encodes to {alone}" if alone != [tid]
                   else f"inside running text ({f'a{content}b {content}.'!r}) encodes to {inside}")
            out.append(Finding("error", "special-token-split",
                               f"{s.where}: {kind} token {content!r} (id {tid}) is split into pieces: {how}, not "
                               f"[{tid}]; fix its entry in tokenizer.json (normalized, single_word, lstrip/rstrip "
                               f"false) or restore the tokenizer `tokengraft add` saved"))
    return out
