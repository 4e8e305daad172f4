"""`doctor`: every consistency check between tokenizer, config, weights, processor, generation
config and manifest. Each problem becomes one :class:`Finding`: one line saying what is wrong,
where, and what to run.

Two entry points share the same checks:

* :func:`check_folder` reads a checkpoint folder *lazily*: JSON files, the tokenizer (and
  processor), and only the embedding and head tensors, row chunk by row chunk, through
  ``safetensors.safe_open`` (single file or sharded with an index). No model is built unless
  ``kl=True``.
* :func:`check_model` checks an in-memory model (tie = the same Parameter object).

Both build a :class:`Subject` (what was found) and run the same functions on it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .manifest import FILENAME as MANIFEST_FILE
from .manifest import Manifest, ManifestError
from .errors import TokengraftError

SEVERITIES = ("error", "warning", "info")

# Where the input embedding and the output head live, most common layouts first. transformers 5
# writes LLaVA in the classic layout (language_model.model.*) but holds it in memory as
# model.language_model.*; InternLM2 (XTuner's usual LLM) says tok_embeddings / output.
EMBED_KEYS = ("model.embed_tokens.weight", "language_model.model.embed_tokens.weight",
              "model.language_model.embed_tokens.weight", "model.tok_embeddings.weight",
              "language_model.model.tok_embeddings.weight", "transformer.wte.weight",
              "gpt_neox.embed_in.weight")
HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight",
             "output.weight", "language_model.output.weight", "embed_out.weight")
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")  # nested LM configs
ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

UNTRAINED_REL = 0.05  # a row below 5% of the median row norm looks untrained (as init.trained_mask)
MAX_GROUPS = 4  # identical-row groups named in the one-line finding; the rest are counted
SEMANTIC_INITS = {"subword", "describe", "copy"}  # inits that take base rows' values
KL_WARN = 1e-3  # nats/token on prose without the new tokens: above this the new rows are visible


class DoctorError(TokengraftError):
    """The path cannot be examined at all (not a folder)."""


@dataclass
class Finding:
    severity: str  # error | warning | info
    code: str  # short stable id, e.g. "vocab-size-mismatch"
    message: str  # one line: what is wrong, where, what to run
    data: dict | None = None  # figures behind the message, for --json consumers

    def __post_init__(self):
        assert self.severity in SEVERITIES, self.severity

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["data"] is None:
            del d["data"]
        return d


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


# -- lazy rows --------------------------------------------------------------------------------

@dataclass
class Rows:
    """A vocabulary-shaped matrix read on demand: from a safetensors slice or an in-memory tensor."""

    name: str  # tensor key (folder) or a description (memory)
    shape: tuple[int, int]
    _range: Callable[[int, int], torch.Tensor]
    obj: Any = None  # the Parameter, for pointer equality in memory

    @classmethod
    def of_tensor(cls, name: str, t: torch.Tensor) -> "Rows":
        return cls(name, tuple(t.shape), lambda a, b: t[a:b].detach(), obj=t)

    @classmethod
    def of_slice(cls, name: str, sl) -> "Rows":
        shape = tuple(sl.get_shape())
        return cls(name, shape, lambda a, b: sl[a:b])

    @property
    def n(self) -> int:
        return self.shape[0]

    def chunks(self, size: int = 8192) -> Iterator[tuple[int, torch.Tensor]]:
        for a in range(0, self.n, size):
            yield a, self._range(a, min(a + size, self.n)).float()

    def row(self, i: int) -> torch.Tensor:
        return self._range(i, i + 1)[0].float()

    def equals(self, other: "Rows") -> bool:
        if self.shape != other.shape:
            return False
        return all(torch.equal(c, other._range(a, a + len(c)).float()) for a, c in self.chunks())


def row_stats(rows: Rows, limit: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm, key) per row for the first ``limit`` rows, chunk by chunk. ``key`` is a projection on
    a fixed random direction in float64: equal rows have equal keys; unequal rows almost never do
    (candidates are verified exactly)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(rows.shape[1], generator=g, dtype=torch.float64)
    norms, keys = [], []
    for a, c in rows.chunks():
        c = c[: max(0, limit - a)]
        norms.append(c.norm(dim=1))
        keys.append(c.double() @ direction)
    return torch.cat(norms), torch.cat(keys)


def identical_groups(rows: Rows, keys: torch.Tensor, skip: torch.Tensor) -> list[list[int]]:
    """Groups (size >= 2) of exactly identical rows among rows whose ``skip`` is False."""
    ids = (~skip).nonzero().flatten()
    _, inverse, counts = torch.unique(keys[ids], return_inverse=True, return_counts=True)
    groups = []
    for g in (counts > 1).nonzero().flatten().tolist():
        members = ids[inverse == g].tolist()
        first = rows.row(members[0])
        same = [m for m in members if torch.equal(rows.row(m), first)]
        if len(same) > 1:
            groups.append(same)
    return sorted(groups, key=lambda g: (-len(g), g[0]))


# -- what was found ---------------------------------------------------------------------------

@dataclass
class Subject:
    """Everything the checks look at, whether it came from a folder or from memory."""

    where: str  # the folder, or "model"
    in_memory: bool
    config: dict | None = None  # raw config (config.json, or model.config.to_dict())
    tie_flag: bool | None = None  # the tie flag as transformers reads it
    tokenizer: Any = None
    processor: Any = None
    emb: Rows | None = None
    head: Rows | None = None  # None: no separate head tensor (folder) / no head (memory)
    tied_in_memory: bool | None = None  # pointer equality (memory only)
    gen: dict | None = None  # generation config
    manifest: Manifest | None = None
    findings: list[Finding] = field(default_factory=list)  # found while gathering
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def vocab(self) -> dict[str, int]:
        if "vocab" not in self._cache:
            self._cache["vocab"] = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        return self._cache["vocab"]

    def head_equals_emb(self) -> bool:
        """Folder: the head tensor holds exactly the embedding's values (read once, in chunks)."""
        if "eq" not in self._cache:
            self._cache["eq"] = self.head is not None and self.emb is not None and self.head.equals(self.emb)
        return self._cache["eq"]

    @property
    def cfg_name(self) -> str:
        return "model.config" if self.in_memory else f"{self.where}/config.json"

    @property
    def gen_name(self) -> str:
        return "model.generation_config" if self.in_memory else f"{self.where}/generation_config.json"

    @property
    def rows(self) -> int | None:
        return self.emb.n if self.emb is not None else None

    @property
    def ntok(self) -> int | None:
        return len(self.tokenizer) if self.tokenizer is not None else None

    def separate_head(self) -> Rows | None:
        """The head when it is a different matrix from the embedding (untied)."""
        if self.head is None:
            return None
        if self.in_memory:
            return None if self.tied_in_memory else self.head
        return None if self.head_equals_emb() else self.head


def _read_json(path: Path, sub: Subject, code: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        sub.findings.append(Finding("error", code, f"{path}: not valid JSON ({e}); restore it from the source checkpoint"))
        return None
    return d if isinstance(d, dict) else None


def _text_configs(cfg: dict) -> list[tuple[str, dict]]:
    """(name, dict) for the top-level config and every nested language-model config."""
    out = [("", cfg)]
    out += [(k, cfg[k]) for k in TEXT_CONFIG_KEYS if isinstance(cfg.get(k), dict)]
    return out


def _weights(folder: Path, stack) -> tuple[dict[str, Any], str | None]:
    """key -> safetensors slice opener for every tensor in the folder's safetensors weights."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted(set(wm.values()))
        where = {k: f for k, f in wm.items()}
    elif (folder / "model.safetensors").is_file():
        files, where = ["model.safetensors"], None
    else:
        return {}, None
    handles = {}
    for f in files:
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f}: shard named in model.safetensors.index.json is missing; "
                                    f"copy the complete checkpoint")
        handles[f] = stack.enter_context(safe_open(str(folder / f), framework="pt"))
    if where is None:
        h = handles["model.safetensors"]
        where = {k: "model.safetensors" for k in h.keys()}
    return {k: (lambda k=k, f=f: handles[f].get_slice(k)) for k, f in where.items()}, (
        "model.safetensors.index.json" if index.is_file() else "model.safetensors")


def _find_key(keys, preferred: tuple[str, ...], suffixes: tuple[str, ...]) -> str | None:
    for k in preferred:
        if k in keys:
            return k
    # unknown layouts: any key with a familiar ending, outside a vision tower
    cands = [k for k in keys if k.endswith(suffixes) and "vision" not in k and "visual" not in k]
    return sorted(cands, key=len)[0] if cands else None


def gather_folder(path, stack) -> Subject:
    folder = Path(path)
    if not folder.is_dir():
        raise DoctorError(f"{folder}: not a folder; doctor checks a Hugging Face checkpoint folder "
                          f"(one written by save_pretrained or `tokengraft add`)")
    sub = Subject(where=str(folder), in_memory=False)

    sub.config = _read_json(folder / "config.json", sub, "config-invalid")
    if sub.config is None and not any(f.code == "config-invalid" for f in sub.findings):
        sub.findings.append(Finding("error", "config-missing",
                                    f"{folder}: no config.json; save the model with model.save_pretrained({str(folder)!r})"))
    if sub.config is not None:
        sub.tie_flag = _effective_tie_flag(folder, sub.config)

    try:
        get, wname = _weights(folder, stack)
    except FileNotFoundError as e:
        sub.findings.append(Finding("error", "weights-missing", str(e)))
        get, wname = {}, None
    except Exception as e:  # a truncated or corrupt safetensors file / index
        sub.findings.append(Finding("error", "weights-unreadable",
                                    f"{folder}: the safetensors weights cannot be read ({_first_line(e)}); "
                                    f"copy the checkpoint again (a download or copy was probably cut short)"))
        get, wname = {}, None
    if not get:
        if wname is None and not sub.findings:
            sub.findings.append(Finding("warning", "weights-missing",
                                        f"{folder}: no safetensors weights (model.safetensors or its index); weight "
                                        f"checks skipped: save with model.save_pretrained (safetensors is the default)"))
    else:
        ek = _find_key(get, EMBED_KEYS, ("embed_tokens.weight", "tok_embeddings.weight"))
        hk = _find_key(get, HEAD_KEYS, ("lm_head.weight",))
        if ek is None:
            sub.findings.append(Finding("warning", "embedding-not-found",
                                        f"{folder}/{wname}: no input embedding under a known name ({', '.join(EMBED_KEYS[:3])}, ...); "
                                        f"row checks skipped"))
        else:
            sub.emb = Rows.of_slice(ek, get[ek]())
            if hk is not None:
                sub.head = Rows.of_slice(hk, get[hk]())

    sub.gen = _read_json(folder / "generation_config.json", sub, "generation-config-invalid")

    try:
        sub.manifest = Manifest.find(folder)
    except ManifestError as e:
        sub.findings.append(Finding("error", "manifest-invalid", f"{e}"))

    _load_tokenizer(folder, sub)
    return sub


def _effective_tie_flag(folder: Path, raw: dict) -> bool | None:
    """The flag transformers acts on (model-class defaults and LLaVA's text_config fallback included)."""
    try:
        from transformers import AutoConfig

        return bool(getattr(AutoConfig.from_pretrained(folder), "tie_word_embeddings", False))
    except Exception:  # unknown model type: read the raw fields
        for _, c in _text_configs(raw):
            if "tie_word_embeddings" in c:
                return bool(c["tie_word_embeddings"])
        return None


def _load_tokenizer(folder: Path, sub: Subject) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    if (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file():
        try:
            proc = AutoProcessor.from_pretrained(folder)
            if getattr(proc, "tokenizer", None) is not None:  # a feature extractor alone is no processor here
                sub.processor, sub.tokenizer = proc, proc.tokenizer
        except Exception as e:
            sub.findings.append(Finding("warning", "processor-unloadable",
                                        f"{folder}: AutoProcessor cannot load the processor ({_first_line(e)}); "
                                        f"re-save it with processor.save_pretrained"))
    if sub.tokenizer is None:
        try:
            sub.tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            sub.findings.append(Finding("error", "tokenizer-unloadable",
                                        f"{folder}: AutoTokenizer cannot load a tokenizer ({_first_line(e)}); "
                                        f"save the tokenizer the model was trained with: tokenizer.save_pretrained"))


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def gather_model(model, tokenizer, processor=None, manifest: Manifest | None = None) -> Subject:
    sub = Subject(where="model", in_memory=True, tokenizer=tokenizer, processor=processor, manifest=manifest)
    sub.config = model.config.to_dict()
    sub.tie_flag = bool(getattr(model.config, "tie_word_embeddings", False))
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    sub.emb = Rows.of_tensor("input embedding", emb.weight)
    if head is not None:
        sub.head = Rows.of_tensor("output head", head.weight)
        sub.tied_in_memory = head.weight is emb.weight
    gc = getattr(model, "generation_config", None)
    sub.gen = gc.to_dict() if gc is not None else None
    return sub


# -- the checks -------------------------------------------------------------------------------

def check_sizes(s: Subject) -> list[Finding]:
    """len(tokenizer) vs rows vs every vocab_size field, and head rows vs embedding rows."""
    out = []
    rows, ntok = s.rows, s.ntok
    if rows is not None and s.config is not None:
        for name, c in _text_configs(s.config):
            v = c.get("vocab_size")
            field_name = f"{name}.vocab_size" if name else "vocab_size"
            if isinstance(v, int) and v != rows:
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
    """LLaVA: the image token id is in range, is the processor's image token, and is known to it."""
    out = []
    cfg = s.config or {}
    img = next((cfg[k] for k in ("image_token_id", "image_token_index") if isinstance(cfg.get(k), int)), None)
    field_name = next((k for k in ("image_token_id", "image_token_index") if isinstance(cfg.get(k), int)), None)
    tok, proc = s.tokenizer, s.processor
    if img is not None and tok is not None:
        limit = min(x for x in (s.ntok, s.rows) if x is not None)
        if not 0 <= img < limit:
            out.append(Finding("error", "image-token-out-of-range",
                               f"{s.cfg_name}: {field_name} is {img}, outside the tokenizer's {s.ntok} tokens"
                               + (f" / {s.rows} rows" if s.rows is not None else "")
                               + "; set it to the id of the image token (graft it with `tokengraft add`)"))
    if proc is None:
        if img is not None and not s.in_memory and "vision_config" in cfg:
            out.append(Finding("warning", "processor-missing",
                               f"{s.where}: config names an image token ({field_name} {img}) but the folder has no "
                               f"processor (processor_config.json); save it with processor.save_pretrained"))
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
                           f"{s.cfg_name}: {field_name} is {img} but the processor's image token {name!r} has id "
                           f"{known} in the tokenizer; set {field_name} to {known}"))
    pid = getattr(proc, "image_token_id", None)
    if isinstance(pid, int) and pid != known:
        out.append(Finding("error", "image-token-mismatch",
                           f"{s.where}: the processor's image_token_id is {pid} but {name!r} has id {known} in "
                           f"the tokenizer; re-save the processor with this tokenizer"))
    return out


def check_special_ids(s: Subject) -> list[Finding]:
    """pad/eos/bos ids in config, generation config and tokenizer point at real tokens."""
    out = []
    limit = s.ntok if s.ntok is not None else s.rows
    if limit is None:
        return out
    what = f"the tokenizer's {s.ntok} tokens" if s.ntok is not None else f"the {s.rows} rows"
    sources = []
    for name, c in _text_configs(s.config or {}):
        sources.append((s.cfg_name, f"{name}." if name else "", c))
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
            if tok.eos_token_id is not None and isinstance(vals[0], int) and tok.eos_token_id not in vals:
                out.append(Finding("warning", "eos-disagrees",
                                   f"{where}: {prefix}eos_token_id {v} does not include the tokenizer's eos "
                                   f"{tok.eos_token!r} (id {tok.eos_token_id}); generation may not stop at the end "
                                   f"of a turn: add {tok.eos_token_id} to eos_token_id"))
    return out


def _manifest_roles(s: Subject) -> dict[int, Any]:
    return {t.id: t for t in s.manifest.tokens} if s.manifest is not None else {}


def _by_design(group: list[int], added: dict[int, Any], side: str) -> str | None:
    """Why a group of identical rows is expected from its init, or None. New tokens that start from
    the same row (the mean, or the subword mean of the same pieces) are identical until training
    separates them; a semantic init from a single piece (subword of "box" for "<box>",
    ``copy:TOKEN``) equals that one base token's row."""
    new = [added[i] for i in group if i in added]
    base = [i for i in group if i not in added]
    if not new or len(base) > 1:  # two base tokens alike: the base itself has the problem
        return None
    inits = sorted({_side_init(t.init, side) for t in new})
    if base and not set(inits) <= SEMANTIC_INITS:
        return None
    return "/".join(inits)


def _side_init(init: str, side: str) -> str:
    """The method name on one side of a recorded init: "subword/mean" (input/output),
    "subword*0.39+mean" (tied blend), "copy:<x>", "mean"."""
    parts = init.split("/")
    part = parts[1] if side == "output" and len(parts) == 2 else parts[0]
    m = re.match(r"[a-z]+", part)
    return m.group(0) if m else part


def check_rows(s: Subject) -> list[Finding]:
    """Rows used by tokens that look untrained: all-zero / near-zero rows, identical rows."""
    if s.emb is None:
        return []
    limit = min(s.rows, s.ntok) if s.ntok is not None else s.rows
    tok = s.tokenizer
    added = _manifest_roles(s)

    def name(i: int) -> str:
        t = tok.convert_ids_to_tokens(i) if tok is not None else None
        return repr(t) if t is not None else "?"

    out = []
    sides = [("input", s.emb)]
    head = s.separate_head()
    if head is not None and head.n >= limit:
        sides.append(("output", head))
    for side, rows in sides:
        norms, keys = row_stats(rows, limit)
        med = float(norms.median()) if len(norms) else 0.0
        zero = norms == 0
        weak = (norms < UNTRAINED_REL * med) & ~zero
        # input-role tokens (image placeholders) never get generated: their output row is not used
        if side == "output":
            inp = [i for i, t in added.items() if t.role == "input" and i < limit]
            zero[inp] = False
            weak[inp] = False
        for mask, kind in ((zero, "all-zero"), (weak, f"near-zero (norm < {UNTRAINED_REL:g} x median)")):
            ids = mask.nonzero().flatten().tolist()
            if ids:
                shown = ", ".join(f"{i} {name(i)}" for i in ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
                out.append(Finding("warning", "untrained-rows",
                                   f"{s.where}: {len(ids)} token(s) have {kind} {side} rows in {rows.name} ({shown}); "
                                   f"they look untrained: train them before relying on them, or give them rows "
                                   f"(`tokengraft add` initializes every row it adds)"))
        groups = identical_groups(rows, keys, zero | weak)
        warn, info = [], []
        for g in groups:
            why = _by_design(g, added, side)
            (info if why else warn).append((g, why))
        if warn:
            gs = [g for g, _ in warn]
            shown = "; ".join("[" + ", ".join(f"{i} {name(i)}" for i in g[:4]) + (f", ... {len(g)} in all" if len(g) > 4 else "")
                              + "]" for g in gs[:MAX_GROUPS]) + ("; ..." if len(gs) > MAX_GROUPS else "")
            out.append(Finding("warning", f"identical-{side}-rows",
                               f"{s.where}: {sum(map(len, gs))} tokens in {len(gs)} group(s) share identical {side} "
                               f"rows in {rows.name} ({shown}); the model cannot tell a group apart: they look "
                               f"untrained, train them before use"))
        for g, why in info:
            if side == "output" and not set(why.split("/")) & SEMANTIC_INITS:
                continue  # new output rows start equal by design (the invisible mean)
            out.append(Finding("info", f"identical-{side}-rows-by-init",
                               f"{s.where}: tokens {', '.join(f'{i} {name(i)}' for i in g[:6])} share one {side} row, "
                               f"as their init ({why}) makes them; expected until training separates them"))
    return out


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
    added = _manifest_roles(s)
    base = s.manifest.base_size if s.manifest is not None else s.ntok
    stuck = sorted(i for i in sup if (base <= i < s.ntok and (i not in added or added[i].role == "generate")))
    if stuck:
        tok = s.tokenizer
        shown = ", ".join(f"{i} {tok.convert_ids_to_tokens(i)!r}" for i in stuck[:5]) + (", ..." if len(stuck) > 5 else "")
        out.append(Finding("warning", "token-suppressed",
                           f"{where}: suppress_tokens lists {len(stuck)} added token(s) ({shown}), so generation "
                           f"can never emit them; remove them from suppress_tokens"))
    return out


def _span(ids: list[int]) -> str:
    if len(ids) > 3 and ids[-1] - ids[0] == len(ids) - 1:
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def check_manifest(s: Subject) -> list[Finding]:
    """tokengraft.json present and consistent with the tokenizer and the weights."""
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
        from .vocab import fingerprint, vocab_of

        vocab_list = vocab_of(tok)
        fp = fingerprint(vocab_list)
        if m.vocab_fingerprint is not None and fp != m.vocab_fingerprint:
            recorded = {t.id for t in m.tokens}
            extra = [(i, t) for i, t in enumerate(vocab_list) if i >= m.base_size and i not in recorded]
            names = (f"; not in the manifest: {', '.join(f'{i} {t!r}' for i, t in extra[:5])}"
                     + (", ..." if len(extra) > 5 else "")) if extra else ""
            out.append(Finding("error", "manifest-fingerprint-mismatch",
                               f"{mname}: the tokenizer's vocabulary ({len(tok)} tokens, {fp}) is not the one "
                               f"recorded ({m.vocab_fingerprint}){names}; it was edited outside tokengraft: restore "
                               f"the saved tokenizer, or add tokens with `tokengraft add` so their rows are "
                               f"initialized and recorded"))
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
    real_tied = _tied_reality(s)
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


def _tied_reality(s: Subject) -> bool | None:
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


CHECKS = (check_sizes, check_tie, check_image_token, check_special_ids, check_rows,
          check_suppressed, check_manifest, check_split_tokens)


def summary(s: Subject) -> Finding:
    bits = []
    if s.ntok is not None:
        bits.append(f"{s.ntok} tokens")
    if s.rows is not None:
        bits.append(f"{s.rows} rows ({s.emb.name})")
    tied = _tied_reality(s)
    if tied is not None:
        bits.append("tied head" if tied else "untied head")
    elif s.head is not None:
        bits.append("head equal to the embedding")
    if s.processor is not None:
        bits.append(f"processor {type(s.processor).__name__}")
    if s.manifest is not None:
        bits.append(f"manifest: {len(s.manifest.tokens)} grafted token(s) on a {s.manifest.base_size}-token base")
    return Finding("info", "summary", f"{s.where}: " + ", ".join(bits))


def run_checks(s: Subject) -> list[Finding]:
    out = list(s.findings) + [summary(s)]
    for check in CHECKS:
        out += check(s)
    order = {k: i for i, k in enumerate(SEVERITIES)}
    return sorted(out, key=lambda f: order[f.severity])  # stable: checks keep their order


# -- KL ---------------------------------------------------------------------------------------

@torch.no_grad()
def kl_of_grafted(hidden: torch.Tensor, weight: torch.Tensor, new_ids: list[int],
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position KL(base || grafted), where base is the head without rows ``new_ids`` and grafted
    the whole head, from the head's inputs ``hidden`` (exact: see init.kl_of_added)."""
    from .init import kl_of_added

    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[new_ids] = False
    z = hidden.float() @ weight[keep].float().T
    if bias is not None:
        z = z + bias[keep].float()
    return kl_of_added(hidden, torch.logsumexp(z, dim=1), weight[new_ids].float(),
                       None if bias is None else bias[new_ids])


@torch.no_grad()
def kl_findings(model, tokenizer, manifest: Manifest | None, where: str = "model",
                hidden: torch.Tensor | None = None) -> list[Finding]:
    """KL(base || grafted) on real prose: how much probability the grafted tokens' output rows take
    from the rest of the vocabulary on text that contains none of them. ``hidden``: the head's
    inputs on real text, if already computed (probe.head_inputs)."""
    from .probe import head_inputs, real_text

    if manifest is None or not manifest.tokens:
        return [Finding("info", "kl-skipped", f"{where}: no {MANIFEST_FILE} records which rows were grafted; "
                                              f"KL(base || grafted) needs it")]
    head = model.get_output_embeddings()
    new = sorted(t.id for t in manifest.tokens if 0 <= t.id < head.weight.shape[0])
    if hidden is None:
        hidden = head_inputs(model, tokenizer, real_text())
    kl = kl_of_grafted(hidden, head.weight, new, getattr(head, "bias", None))
    mean, mass = float(kl.mean()), 1.0 - math.exp(-float(kl.max()))
    data = {"kl_mean": mean, "max_mass": mass, "positions": len(kl), "rows": new}
    msg = (f"{where}: KL(base || grafted) on {len(kl)} positions of real prose is {mean:.2e} nats/token; the "
           f"{len(new)} grafted token row(s) take at most {mass:.2e} of the probability at any position")
    out = [Finding("info", "kl-invisibility", msg, data)]
    if mean > KL_WARN:
        out.append(Finding("warning", "kl-visible",
                           f"{where}: grafted rows take {mean:.2e} nats/token (> {KL_WARN:g}) on text without "
                           f"them; the model predicts them where they do not belong: re-initialize their output "
                           f"rows (graft again from the base with `tokengraft add --init auto`) or train on text that uses them", data))
    return out


# -- entry points -----------------------------------------------------------------------------

def check_folder(path, kl: bool = False) -> list[Finding]:
    """Every check on a checkpoint folder, reading the files lazily; ``kl`` also loads the model."""
    import contextlib

    with contextlib.ExitStack() as stack:
        sub = gather_folder(path, stack)
        findings = run_checks(sub)
    if kl:
        if has_errors(findings):
            findings.append(Finding("info", "kl-skipped", f"{path}: KL not measured: fix the errors first"))
        else:
            from .io import load_folder

            model, tok, _, manifest = load_folder(path)
            findings += kl_findings(model, tok, manifest, where=str(path))
    return findings


def check_model(model, tokenizer, processor=None, manifest: Manifest | None = None,
                kl: bool = False) -> list[Finding]:
    """The same checks on an in-memory model (tie means the same Parameter object)."""
    findings = run_checks(gather_model(model, tokenizer, processor, manifest))
    if kl:
        findings += kl_findings(model, tokenizer, manifest)
    return findings


def format_table(findings: list[Finding]) -> str:
    """A readable table: severity, code, message; then the counts."""
    w = max([len(f.code) for f in findings] + [4])
    lines = [f"{'SEVERITY':<8}  {'CODE':<{w}}  MESSAGE"]
    lines += [f"{f.severity:<8}  {f.code:<{w}}  {f.message}" for f in findings]
    n = {k: sum(f.severity == k for f in findings) for k in SEVERITIES}
    verdict = "FAIL" if n["error"] else "OK"
    lines.append(f"{verdict}: {n['error']} error(s), {n['warning']} warning(s), {n['info']} note(s)")
    return "\n".join(lines)


def to_json(findings: list[Finding], path=None) -> str:
    n = {k: sum(f.severity == k for f in findings) for k in SEVERITIES}
    return json.dumps({"path": None if path is None else str(path), "ok": not n["error"], "counts": n,
                       "findings": [f.to_dict() for f in findings]}, indent=2, ensure_ascii=False)
