"""The checks on config, sizes, tie, image token and special ids: each takes a Subject and returns
findings, one line each. Row checks live in ``rows.py``, manifest/tokenizer checks in ``tokens.py``."""
from __future__ import annotations

from ..hf import IMAGE_TOKEN_KEYS, text_configs
from .findings import Finding
from .subject import Subject

ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _field(name: str, key: str) -> str:
    return key if name == "config" else f"{name}.{key}"


def check_config(s: Subject) -> list[Finding]:
    """Remote code, and config values transformers needs: an integer vocab_size on the language
    model's config (without one transformers assumes the class default and cannot load the rows)."""
    out = []
    for file, amap in s.remote_code.items():
        names = ", ".join(f"{k}: {v}" for k, v in list(amap.items())[:3]) if isinstance(amap, dict) else str(amap)
        out.append(Finding("error", "remote-code",
                           f"{s.where}/{file}: ships remote code (auto_map {names}); tokengraft never runs it: "
                           f"use a model whose architecture transformers has built in, or convert it to one"))
    if s.config is None:
        return out
    bad = []
    for name, c in text_configs(s.config):
        for key in ("vocab_size", "hidden_size"):
            v = c.get(key)
            if key in c and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                bad.append(_field(name, key))
                out.append(Finding("error", "config-bad-value",
                                   f"{s.cfg_name}: {_field(name, key)} is {v!r}, not a positive integer; "
                                   f"transformers cannot load this config: set it to the number "
                                   + ("of embedding rows" + (f" ({s.rows})" if s.rows else "") if key == "vocab_size"
                                      else "the weights were saved with")))
    name, lm = text_configs(s.config)[-1]  # the language model's own config (nested for LLaVA)
    if "vocab_size" not in lm:
        rows = f" ({s.rows} rows)" if s.rows is not None else ""
        out.append(Finding("error", "vocab-size-missing",
                           f"{s.cfg_name}: no {_field(name, 'vocab_size')}; transformers would assume its class "
                           f"default and fail to load the embedding{rows}: set {_field(name, 'vocab_size')} to "
                           f"{s.rows if s.rows is not None else 'the embedding rows'}"))
    if s.config_error and not bad and not s.remote_code:
        out.append(Finding("error", "config-unloadable",
                           f"{s.cfg_name}: transformers cannot load it ({s.config_error}); restore it from the "
                           f"source checkpoint"))
    return out


def check_sizes(s: Subject) -> list[Finding]:
    """len(tokenizer) vs rows vs every vocab_size field, and head rows vs embedding rows."""
    out = []
    rows, ntok = s.rows, s.ntok
    if rows is not None and s.config is not None:
        for name, c in text_configs(s.config):
            v = c.get("vocab_size")
            field_name = _field(name, "vocab_size")
            if isinstance(v, int) and not isinstance(v, bool) and v != rows:
                out.append(Finding("error", "vocab-size-mismatch",
                                   f"{s.cfg_name}: {field_name} is {v} but {s.emb.name} has {rows} rows; "
                                   f"set {field_name} to {rows} (`tokengraft add` keeps every vocab_size in sync)"))
    if rows is not None and s.head is not None and s.head.n != rows:
        out.append(Finding("error", "head-rows-mismatch",
                           f"{s.where}: {s.head.name} has {s.head.n} rows but {s.emb.name} has {rows}; the "
                           f"checkpoint was resized on one side only: resize both (model.resize_token_embeddings)"))
    if rows is not None and ntok is not None:
        if ntok > rows:
            out.append(Finding("error", "tokenizer-larger-than-rows",
                               f"{s.where}: the tokenizer has {ntok} tokens but {s.emb.name} only {rows} rows; ids "
                               f"{rows}..{ntok - 1} index past the embedding: run `tokengraft add` to resize, or "
                               f"use the tokenizer saved with these weights"))
        elif ntok < rows:
            out.append(Finding("info", "padding-rows",
                               f"{s.where}: {rows - ntok} row(s) beyond the tokenizer's {ntok} tokens "
                               f"(ids {ntok}..{rows - 1}) are padding that no token uses"))
    return out


def check_tie(s: Subject) -> list[Finding]:
    """The config's tie flag vs reality: pointer equality in memory, tensors in files."""
    if s.emb is None or s.tie_flag is None:
        return []
    if s.in_memory:
        if s.head is None or s.tied_in_memory == s.tie_flag:
            return []
        if s.tie_flag:
            return [Finding("error", "tie-flag-mismatch",
                            "model: config.tie_word_embeddings is True but the output head is a separate Parameter "
                            "from the input embedding (training will move them apart); call model.tie_weights() or "
                            "set tie_word_embeddings=False")]
        return [Finding("error", "tie-flag-mismatch",
                        "model: config.tie_word_embeddings is False but the output head *is* the input embedding "
                        "Parameter; set model.config.tie_word_embeddings=True (or untie by cloning the head)")]
    if s.head is None and not s.tie_flag:
        return [Finding("error", "tie-flag-mismatch",
                        f"{s.cfg_name}: tie_word_embeddings is false but the weights hold no output head (only "
                        f"{s.emb.name}); transformers would initialize the head at random: set "
                        f"tie_word_embeddings to true")]
    if s.head is not None and s.tie_flag and s.head.shape == s.emb.shape and not s.head_equals_emb():
        return [Finding("error", "tie-flag-mismatch",
                        f"{s.cfg_name}: tie_word_embeddings is true but {s.head.name} differs from {s.emb.name}; "
                        f"transformers will not tie them and warns: set tie_word_embeddings to false")]
    return []


def check_image_token(s: Subject) -> list[Finding]:
    """LLaVA: a processor is there; the image token id is in range, is the processor's image token,
    and is known to it; without a processor, it at least names an input placeholder, not a
    generated token such as ``<box>``."""
    out = []
    cfg = s.config or {}
    field_name = next((k for k in IMAGE_TOKEN_KEYS if isinstance(cfg.get(k), int)), None)
    img = cfg[field_name] if field_name else None
    tok, proc = s.tokenizer, s.processor
    if img is not None and tok is not None:
        limit = min(x for x in (s.ntok, s.rows) if x is not None)
        if not 0 <= img < limit:
            out.append(Finding("error", "image-token-out-of-range",
                               f"{s.cfg_name}: {field_name} is {img}, outside the tokenizer's {s.ntok} tokens"
                               + (f" / {s.rows} rows" if s.rows is not None else "")
                               + "; set it to the id of the image token (graft it with `tokengraft add`)"))
    if proc is None:
        if s.in_memory or not s.is_llava:
            return out
        if not s.has_processor_files:  # (an unloadable one is reported where it is loaded)
            out.append(Finding("error", "processor-missing",
                               f"{s.where}: a LLaVA config (vision_config"
                               + (f", {field_name} {img}" if img is not None else "")
                               + ") but no processor files (processor_config.json, preprocessor_config.json); "
                                 "no image can be fed: copy them from the source model or processor.save_pretrained"))
        if img is not None and tok is not None and 0 <= img < (s.ntok or 0):
            out += _image_token_without_processor(s, field_name, img)
        return out
    name = getattr(proc, "image_token", None)
    if name is None or tok is None:
        return out
    known = s.vocab.get(name)
    if known is None:
        out.append(Finding("error", "image-token-unknown",
                           f"{s.where}: the processor's image token {name!r} is not in the tokenizer; every image "
                           f"placeholder would split into pieces: `tokengraft add DIR --tokens '{name}'` "
                           f"(role input) or fix image_token in processor_config.json"))
        return out
    if img is not None and known != img:
        out.append(Finding("error", "image-token-mismatch",
                           f"{s.cfg_name}: {field_name} is {img} ({s.token_name(img)}) but the processor's image "
                           f"token {name!r} has id {known} in the tokenizer; set {field_name} to {known}"))
    pid = getattr(proc, "image_token_id", None)
    if isinstance(pid, int) and pid != known:
        out.append(Finding("error", "image-token-mismatch",
                           f"{s.where}: the processor's image_token_id is {pid} but {name!r} has id {known} in "
                           f"the tokenizer; re-save the processor with this tokenizer"))
    return out


def _image_token_without_processor(s: Subject, field_name: str, img: int) -> list[Finding]:
    """With no processor to compare with: the id must name an added placeholder token, and one the
    manifest (if any) records as an input, not a token the model generates."""
    content = s.tokenizer.convert_ids_to_tokens(img)
    recorded = s.manifest.token(content) if s.manifest is not None else None
    added = {str(t) for t in getattr(s.tokenizer, "added_tokens_decoder", {}).values()}
    why = None
    if recorded is not None and recorded.role != "input":
        why = f"a token the model generates (role {recorded.role!r} in tokengraft.json)"
    elif recorded is None and content not in added:
        why = "an ordinary vocabulary piece, not an added placeholder"
    elif recorded is None and "image" not in content.lower() and "img" not in content.lower():
        why = "not an image placeholder"
    if why is None:
        return []
    return [Finding("error", "image-token-mismatch",
                    f"{s.cfg_name}: {field_name} is {img}, which is {content!r}: {why}; every image would be "
                    f"spliced in at that token: set {field_name} to the id of the image token (e.g. '<image>')")]


def check_special_ids(s: Subject) -> list[Finding]:
    """pad/eos/bos ids in config, generation config and tokenizer point at real tokens."""
    out = []
    limit = s.ntok if s.ntok is not None else s.rows
    if limit is None:
        return out
    what = f"the tokenizer's {s.ntok} tokens" if s.ntok is not None else f"the {s.rows} rows"
    sources = []
    for name, c in text_configs(s.config or {}):
        sources.append((s.cfg_name, "" if name == "config" else f"{name}.", c))
    if s.gen:
        sources.append((s.gen_name, "", s.gen))
    for where, prefix, c in sources:
        for f in ID_FIELDS:
            v = c.get(f)
            vals = v if isinstance(v, list) else [v]
            bad = [x for x in vals if isinstance(x, int) and not 0 <= x < limit]
            if bad:
                out.append(Finding("error", "special-id-out-of-range",
                                   f"{where}: {prefix}{f} {v} is outside {what}; set it to the tokenizer's "
                                   f"{f[:-3].replace('_token', '')} token id"
                                   + (f" ({getattr(s.tokenizer, f)})" if s.tokenizer is not None
                                      and getattr(s.tokenizer, f, None) is not None else "")))
    tok = s.tokenizer
    if tok is not None:
        for f in ID_FIELDS:
            name = getattr(tok, f.replace("_id", ""), None)
            tid = getattr(tok, f, None)
            if name is not None and (tid is None or not 0 <= tid < len(tok) or s.vocab.get(str(name)) is None):
                out.append(Finding("error", "special-id-out-of-range",
                                   f"{s.where}: the tokenizer's {f.replace('_id', '')} {str(name)!r} is not one of "
                                   f"its tokens; fix it in tokenizer_config.json or add it with `tokengraft add`"))
        # the model stops where the tokenizer says a turn ends: a differing eos is a silent run-on
        for where, prefix, c in sources:
            v = c.get("eos_token_id")
            vals = v if isinstance(v, list) else [v]
            if tok.eos_token_id is not None and vals and isinstance(vals[0], int) and tok.eos_token_id not in vals:
                out.append(Finding("warning", "eos-disagrees",
                                   f"{where}: {prefix}eos_token_id {v} does not include the tokenizer's eos "
                                   f"{tok.eos_token!r} (id {tok.eos_token_id}); generation may not stop at the end "
                                   f"of a turn: add {tok.eos_token_id} to eos_token_id"))
    return out
