"""What doctor looks at: a :class:`Subject` gathered from a folder (lazily: JSON files, the
tokenizer and processor, and weight rows read on demand) or from a live model. The checks only
ever see a Subject, so a folder and a model are judged by the same code.

Nothing here runs a folder's code: every transformers load passes ``trust_remote_code=False``
(transformers then never asks on a terminal), and ``.bin`` weights go through the restricted
unpickler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..files import FileError, read_json
from ..hf import text_configs
from ..internlm2.config import is_internlm2
from ..manifest import Manifest, ManifestError
from .findings import DoctorError, Finding, first_line
from .weights import FolderWeights, WeightsMissing

# Where the input embedding and the output head live, most common layouts first. transformers 5
# writes LLaVA in the classic layout (language_model.model.*) but holds it in memory as
# model.language_model.*; InternLM2 (XTuner's usual LLM) says tok_embeddings / output.
EMBED_KEYS = ("model.embed_tokens.weight", "language_model.model.embed_tokens.weight",
              "model.language_model.embed_tokens.weight", "model.tok_embeddings.weight",
              "language_model.model.tok_embeddings.weight", "transformer.wte.weight",
              "gpt_neox.embed_in.weight")
HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight",
             "output.weight", "language_model.output.weight", "embed_out.weight")
# files whose `auto_map` names Python code that transformers would import (and run) on request
CODE_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
CHUNK = 8192  # rows per read: bounded memory whatever the vocabulary


@dataclass
class Rows:
    """A matrix read on demand, row range by row range: from the folder's weights or a tensor."""

    name: str  # tensor key (folder) or a description (memory)
    shape: tuple[int, ...]
    _range: Callable[[int, int], torch.Tensor]
    dtype: torch.dtype | None = None
    obj: Any = None  # the Parameter, for pointer equality in memory

    @classmethod
    def of_tensor(cls, name: str, t: torch.Tensor) -> "Rows":
        return cls(name, tuple(t.shape), lambda a, b: t[a:b].detach() if t.dim() else t.detach(), t.dtype, obj=t)

    @classmethod
    def of_weights(cls, w: FolderWeights, key: str) -> "Rows":
        return cls(key, w.shape(key), lambda a, b: w.rows(key, a, b), w.dtype(key))

    @property
    def n(self) -> int:
        return self.shape[0] if self.shape else 1

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        for a in range(0, self.n, size):
            yield a, self._range(a, min(a + size, self.n)).float()

    def row(self, i: int) -> torch.Tensor:
        return self._range(i, i + 1)[0].float()

    def equals(self, other: "Rows") -> bool:
        if self.shape != other.shape:
            return False
        return all(torch.equal(c, other._range(a, a + len(c)).float()) for a, c in self.chunks())


@dataclass
class Subject:
    """Everything the checks look at, whether it came from a folder or from memory."""

    where: str  # the folder, or "model"
    in_memory: bool
    config: dict | None = None  # raw config (config.json, or model.config.to_dict())
    config_error: str | None = None  # why transformers cannot load config.json (one line)
    tie_flag: bool | None = None  # the tie flag as transformers reads it
    tokenizer: Any = None
    processor: Any = None
    has_processor_files: bool = False
    remote_code: dict[str, dict] = field(default_factory=dict)  # file -> its auto_map
    emb: Rows | None = None
    head: Rows | None = None  # None: no separate head tensor (folder) / no head (memory)
    tied_in_memory: bool | None = None  # pointer equality (memory only)
    tensors: list[Rows] = field(default_factory=list)  # every weight tensor (the non-finite scan)
    weights_kind: str | None = None  # "safetensors" | "pickle" | None (no weights read)
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

    @property
    def is_llava(self) -> bool:
        """A vision-language config: a vision tower beside the language model."""
        return isinstance((self.config or {}).get("vision_config"), dict)

    def separate_head(self) -> Rows | None:
        """The head when it is a different matrix from the embedding (untied)."""
        if self.head is None:
            return None
        if self.in_memory:
            return None if self.tied_in_memory else self.head
        return None if self.head_equals_emb() else self.head

    def token_name(self, i: int) -> str:
        t = self.tokenizer.convert_ids_to_tokens(i) if self.tokenizer is not None and i < (self.ntok or 0) else None
        return repr(t) if t is not None else "?"


# -- a folder ---------------------------------------------------------------------------------

def _read_json(path: Path, sub: Subject, code: str) -> dict | None:
    if not path.exists():  # a FIFO or device is there, and refused by read_json (never opened)
        return None
    try:
        return read_json(path, "a JSON object", kind=dict)
    except FileError as e:
        sub.findings.append(Finding("error", code, f"{e}; restore it from the source checkpoint"))
        return None


def _find_key(keys, preferred: tuple[str, ...], suffixes: tuple[str, ...]) -> str | None:
    for k in preferred:
        if k in keys:
            return k
    # unknown layouts: any key with a familiar ending, outside a vision tower
    cands = [k for k in keys if k.endswith(suffixes) and "vision" not in k and "visual" not in k]
    return sorted(cands, key=len)[0] if cands else None


def gather_folder(path, stack) -> Subject:
    """The facts of a folder; open files are closed by ``stack`` (a contextlib.ExitStack)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DoctorError(f"{folder}: not a folder; doctor checks a Hugging Face checkpoint folder "
                          f"(one written by save_pretrained or `tokengraft add`)")
    sub = Subject(where=str(folder), in_memory=False)
    sub.config = _read_json(folder / "config.json", sub, "config-invalid")
    # InternLM2 is read by the built-in bridge: its auto_map names code nobody needs to run
    bridged = is_internlm2(sub.config)
    for name in CODE_MAP_FILES:
        d = _read_json(folder / name, Subject(where="", in_memory=False), "")  # errors reported below
        if d is not None and d.get("auto_map") and not bridged:
            sub.remote_code[name] = d["auto_map"]

    if sub.config is None and not any(f.code == "config-invalid" for f in sub.findings):
        sub.findings.append(Finding("error", "config-missing",
                                    f"{folder}: no config.json; save the model with model.save_pretrained({str(folder)!r})"))
    if sub.config is not None:
        sub.tie_flag = _effective_tie_flag(folder, sub)

    _gather_weights(folder, sub, stack)
    sub.gen = _read_json(folder / "generation_config.json", sub, "generation-config-invalid")
    try:
        sub.manifest = Manifest.find(folder)
    except ManifestError as e:
        sub.findings.append(Finding("error", "manifest-invalid", f"{e}"))
    sub.has_processor_files = any((folder / f).is_file() for f in PROCESSOR_FILES)
    if bridged:
        _load_bridged_tokenizer(folder, sub)
    else:
        _load_tokenizer(folder, sub)
    return sub


def _load_bridged_tokenizer(folder: Path, sub: Subject) -> None:
    """InternLM2's sentencepiece tokenizer through the bridge (its tokenization_*.py is never imported)."""
    from ..internlm2 import load_tokenizer

    try:
        sub.tokenizer = load_tokenizer(folder)
    except Exception as e:  # the bridge's own one-line reason (missing tokenizer.model, a mismatch, ...)
        sub.findings.append(Finding("error", "tokenizer-unloadable",
                                    f"{folder}: the InternLM2 tokenizer cannot be read ({first_line(e)})"))


def _gather_weights(folder: Path, sub: Subject, stack) -> None:
    try:
        w = FolderWeights(folder)
    except WeightsMissing as e:
        sub.findings.append(Finding("error", "weights-missing", str(e)))
        return
    except ImportError:  # our own bug, never the folder's fault
        raise
    except Exception as e:  # a truncated, corrupt or unsafe file / index: its own one-line reason
        sub.findings.append(Finding("error", "weights-unreadable",
                                    f"{folder}: the weights cannot be read ({first_line(e)}); copy the checkpoint "
                                    f"again (a download or copy was probably cut short) or re-save it"))
        return
    stack.callback(w.close)
    sub.weights_kind = w.kind
    keys = w.keys()
    sub.tensors = [Rows.of_weights(w, k) for k in keys]
    ek = _find_key(keys, EMBED_KEYS, ("embed_tokens.weight", "tok_embeddings.weight"))
    hk = _find_key(keys, HEAD_KEYS, ("lm_head.weight",))
    if ek is None or len(w.shape(ek)) != 2:
        sub.findings.append(Finding("warning", "embedding-not-found",
                                    f"{folder}/{w.name}: no input embedding under a known name "
                                    f"({', '.join(EMBED_KEYS[:3])}, ...); row checks skipped"))
        return
    sub.emb = Rows.of_weights(w, ek)
    if hk is not None and len(w.shape(hk)) == 2:
        sub.head = Rows.of_weights(w, hk)


def _effective_tie_flag(folder: Path, sub: Subject) -> bool | None:
    """The flag transformers acts on (model-class defaults and LLaVA's text_config fallback included)."""
    if is_internlm2(sub.config):  # no transformers class: the raw field (InternLM2 keeps its head apart)
        return bool(sub.config.get("tie_word_embeddings", False))
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        return bool(getattr(cfg, "tie_word_embeddings", False))
    except Exception as e:  # unknown model type, remote code, a bad value: read the raw fields
        sub.config_error = first_line(e)
        for _, c in text_configs(sub.config):
            if "tie_word_embeddings" in c:
                return bool(c["tie_word_embeddings"])
        return None


def _load_tokenizer(folder: Path, sub: Subject) -> None:
    from transformers import AutoProcessor, AutoTokenizer, PretrainedConfig

    # a config transformers cannot read must not hide the tokenizer: it is reported on its own
    kw = {"trust_remote_code": False}
    if sub.config_error is not None:
        kw["config"] = PretrainedConfig()
    if sub.has_processor_files:
        try:
            proc = AutoProcessor.from_pretrained(folder, **kw)
            if getattr(proc, "tokenizer", None) is not None:  # a feature extractor alone is no processor here
                sub.processor, sub.tokenizer = proc, proc.tokenizer
        except Exception as e:
            sub.findings.append(Finding("warning" if not sub.is_llava else "error", "processor-unloadable",
                                        f"{folder}: AutoProcessor cannot load the processor ({first_line(e)}); "
                                        f"re-save it with processor.save_pretrained"))
    if sub.tokenizer is None:
        try:
            sub.tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        except Exception as e:
            if sub.remote_code and "tokenizer_config.json" in sub.remote_code:
                return  # a tokenizer that exists only as the folder's code: reported as remote-code
            sub.findings.append(Finding("error", "tokenizer-unloadable",
                                        f"{folder}: AutoTokenizer cannot load a tokenizer ({first_line(e)}); "
                                        f"save the tokenizer the model was trained with: tokenizer.save_pretrained"))


# -- a live model -----------------------------------------------------------------------------

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
    seen = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in seen:  # a tied head is one tensor: scanned once
            seen.add(id(t))
            sub.tensors.append(Rows.of_tensor(name, t))
    gc = getattr(model, "generation_config", None)
    sub.gen = gc.to_dict() if gc is not None else None
    return sub
