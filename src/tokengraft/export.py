"""Export: one complete checkpoint (merged base + new rows + LoRA) that plain transformers loads.

``export(source, out)`` takes a training run / checkpoint folder (through
:func:`tokengraft.train.run.load_run`) or a Hugging Face folder (optionally with a PEFT LoRA
adapter to merge) and writes the ``save_pretrained`` layout: sharded safetensors, a config whose
vocab sizes and tie flag are true to the weights, the tokenizer, the processor, a generation config
that stops at the manifest's stop tokens and suppresses padding rows, and ``tokengraft.json`` with
the export in its history.

``verify(out, model, tokenizer, processor)`` reloads ``out`` with plain transformers in a *fresh
process* (so nothing cached in this one can hide a broken file) and compares it with the in-memory
model: logits on probe inputs, greedy generation, single-id new tokens, tied/untied.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .hf import is_tied, rows_of, sync_config
from .io import atomic_folder, is_llava
from .manifest import Manifest
from .vocab import fingerprint, vocab_of
from .errors import TokengraftError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = 1e-5  # max abs logit difference allowed between the reloaded and the in-memory model (fp32 compute)
GEN_TOKENS = 8  # greedy tokens compared per probe
MAX_PROBE_TOKENS = 48  # new tokens spelled out in the probe text (all of them are checked for single ids)


class ExportError(TokengraftError):
    """A bad input or a failed check: the message says what, where and what to do."""


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0  # over every probe's logits
    probes: int = 0
    generation_equal: bool = True
    tokens_checked: int = 0
    tied: bool | None = None

    def lines(self) -> list[str]:
        head = (f"verify: {'OK' if self.ok else 'FAILED'}: {self.probes} probe(s), max |logit diff| "
                f"{self.max_abs_diff:.2e} (tolerance {ATOL:.0e}), greedy generation "
                f"{'identical' if self.generation_equal else 'DIFFERS'}, {self.tokens_checked} new token(s) "
                f"single ids, head {'tied' if self.tied else 'untied'}")
        return [head] + [f"verify: problem: {p}" for p in self.problems]


@dataclass
class ExportReport:
    out: str
    source: str
    kind: str  # "run" or "hf"
    rows: int
    tokenizer_size: int
    tied: bool
    dtype: str
    files: list[str]
    new_tokens: int
    stop_token_ids: list[int]
    suppressed_rows: int
    rounding_drift: float | None = None  # max |logit diff| fp32 merged vs the rounded (bf16/fp16) export
    verify: VerifyReport | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# -- loading the source -----------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _is_hf_model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / f).is_file() for f in _WEIGHT_FILES)


def source_kind(source) -> str:
    """"hf" for a plain Hugging Face model folder, "run" for a training run or one of its checkpoints."""
    p = Path(source)
    if not p.exists():
        raise ExportError(f"{p}: no such file or folder; pass a training run, a checkpoint or a model folder")
    # a run (or checkpoint-N) holds run.json and only the trained parts; the base comes from elsewhere
    if p.is_dir() and ((p / "run.json").is_file() or any(p.glob("checkpoint-*/run.json"))):
        return "run"
    if _is_hf_model_folder(p):
        return "hf"
    raise ExportError(f"{p}: neither a model folder (config.json + weights) nor a tokengraft training run "
                      f"(run.json); pass the folder `tokengraft add` or `tokengraft train` wrote")


def load_source(source, adapter=None, log=print):
    """(model, tokenizer, processor or None, manifest or None, kind): the merged model in memory, fp32."""
    p = Path(source)
    kind = source_kind(p)
    if kind == "run":
        if adapter is not None:
            raise ExportError(f"{p}: --adapter applies to a model folder; a training run already knows its adapter")
        try:
            from .train.run import load_run
        except ImportError:
            raise ExportError(f"{p}: not a model folder (no config.json with weights), and reading training "
                              f"runs needs tokengraft.train, which this installation lacks") from None
        model, tokenizer, processor, manifest = load_run(p)
        model = model.float().eval()
        return model, tokenizer, processor, manifest, kind
    from .io import load_folder

    model, tokenizer, processor, manifest = load_folder(p, dtype=torch.float32)
    check_consistent(model, tokenizer, manifest, where=str(p))
    if adapter is not None:
        model = merge_adapter(model, tokenizer, adapter, log=log)
    return model.eval(), tokenizer, processor, manifest, kind


def check_consistent(model, tokenizer, manifest: Manifest | None, where: str) -> None:
    """The tokenizer, the weights and the manifest belong together (else: a clear one-line error)."""
    rows = rows_of(model)
    if len(tokenizer) > rows:
        raise ExportError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} rows; "
                          f"run `tokengraft doctor {where}`")
    if manifest is None:
        return
    fp = fingerprint(vocab_of(tokenizer))
    if manifest.vocab_fingerprint and manifest.vocab_fingerprint != fp:
        raise ExportError(f"{where}: the tokenizer is not the one tokengraft.json records (fingerprint "
                          f"{fp} != {manifest.vocab_fingerprint}); was it edited or replaced? "
                          f"run `tokengraft doctor {where}`")
    if manifest.rows != rows:
        raise ExportError(f"{where}: the weights have {rows} rows but tokengraft.json records {manifest.rows}; "
                          f"run `tokengraft doctor {where}`")


def merge_adapter(model, tokenizer, adapter, log=print):
    """Merge a PEFT LoRA adapter folder into ``model`` (peft's merge_and_unload); keep tied as it was."""
    from peft import PeftModel

    a = Path(adapter)
    if not (a / "adapter_config.json").is_file():
        raise ExportError(f"{a}: no adapter_config.json; --adapter expects a PEFT adapter folder "
                          f"(saved with model.save_pretrained on a PeftModel)")
    am = Manifest.find(a)
    if am is not None and am.vocab_fingerprint and am.vocab_fingerprint != fingerprint(vocab_of(tokenizer)):
        raise ExportError(f"{a}: the adapter was trained with another vocabulary than the model folder's "
                          f"tokenizer (fingerprint {am.vocab_fingerprint}); move it first with "
                          f"`tokengraft convert {a} --to MODEL_DIR`")
    tied = is_tied(model)
    try:
        merged = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    except RuntimeError as e:  # size mismatches: the adapter belongs to another vocabulary
        first = str(e).strip().splitlines()
        raise ExportError(f"{a}: the adapter does not fit the model ({first[-1].strip() if first else e}); "
                          f"was it trained on another vocabulary? `tokengraft convert` moves it") from None
    if is_tied(merged) != tied:
        raise ExportError(f"{a}: merging the adapter {'untied' if tied else 'tied'} the head; refusing to export "
                          f"a model whose tie state changed")
    log(f"merged LoRA adapter {a}")
    return merged


# -- making the in-memory model self-consistent -------------------------------------------------

def image_token_of(model, tokenizer, processor) -> int | None:
    """LLaVA's image placeholder id, read from the processor's token (the tokenizer is the truth)."""
    if not is_llava(model.config.to_dict()):
        return None
    tok = getattr(processor, "image_token", None) or "<image>"
    tid = tokenizer.convert_tokens_to_ids(tok)
    if not isinstance(tid, int) or tid == tokenizer.unk_token_id or tok not in tokenizer.get_vocab():
        raise ExportError(f"the LLaVA tokenizer has no image token {tok!r}; add it with `tokengraft add`")
    return tid


def padding_rows(tokenizer, rows: int) -> list[int]:
    """Rows no token uses (beyond the tokenizer, or ids with no token): they must never be generated."""
    vocab = vocab_of(tokenizer)
    return [i for i, t in enumerate(vocab) if t is None] + list(range(len(vocab), rows))


def finalize(model, tokenizer, processor, manifest: Manifest | None) -> Manifest:
    """Sync config (vocab sizes, tie flag, image token id) and generation config with the weights and
    the tokenizer; return the manifest to write (a fresh one if the source had none)."""
    rows, tied = rows_of(model), is_tied(model)
    if len(tokenizer) > rows:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens but the model only {rows} rows")
    sync_config(model, rows, tied)
    img = image_token_of(model, tokenizer, processor)
    if img is not None:
        model.config.image_token_id = img
    vocab = vocab_of(tokenizer)
    if manifest is None:  # a folder tokengraft never touched: record its vocabulary as the base
        manifest = Manifest(base_fingerprint=fingerprint(vocab), base_size=len(vocab), rows=rows, tied=tied)
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for t in manifest.tokens:
        if t.stop and t.id not in eos:
            eos.append(t.id)
    gen.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
    pad = padding_rows(tokenizer, rows)
    # a token the manifest added to be generated must never be suppressed (older `add` outputs
    # kept the suppression of the padding row the token took over)
    generated = {t.id for t in manifest.tokens if t.role == "generate"}
    keep = [t for t in (gen.suppress_tokens or []) if t < len(vocab) and vocab[t] is not None and t not in generated]
    gen.suppress_tokens = sorted(set(keep) | set(pad)) or None
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    manifest.rows, manifest.tied, manifest.vocab_fingerprint = rows, tied, fingerprint(vocab)
    return manifest


# -- export -----------------------------------------------------------------------------------

def export(source, out, *, adapter=None, dtype: str = "fp32", max_shard_size="5GB", overwrite: bool = False,
           verify_output: bool = False, log=print) -> ExportReport:
    """Write ``source`` (run, checkpoint, or model folder [+ adapter]) to ``out`` as one full checkpoint.

    With ``verify_output`` the written folder is reloaded in a fresh process and compared with the
    merged model *before* it is renamed into place: a failed check leaves no ``out`` and raises."""
    _check_args(source, out, dtype, overwrite)
    model, tokenizer, processor, manifest, kind = load_source(source, adapter, log=log)
    return export_model(model, tokenizer, processor, manifest, out, source=source, kind=kind, adapter=adapter,
                        dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                        verify_output=verify_output, log=log)


def _check_args(source, out, dtype, overwrite) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; choose another output folder or pass --overwrite")
    if source is not None:
        src = Path(source).resolve()
        if out.resolve() == src or src in out.resolve().parents:
            raise ExportError(f"{out}: is (inside) the source {source}; export into a separate folder")


def export_model(model, tokenizer, processor, manifest: Manifest | None, out, *, source=None, kind: str = "memory",
                 adapter=None, dtype: str = "fp32", max_shard_size="5GB", overwrite: bool = False,
                 verify_output: bool = False, log=print) -> ExportReport:
    """Export an in-memory (already merged, fp32) model; ``export`` is this after loading a source.
    The model's config and generation config are updated in place (they describe what is written)."""
    _check_args(source, out, dtype, overwrite)
    src, out = Path(source) if source is not None else None, Path(out)
    model = model.eval()
    manifest = finalize(model, tokenizer, processor, copy.deepcopy(manifest))  # the caller's stays as it was
    manifest.record("export", source=str(src) if src else None, adapter=str(adapter) if adapter else None, dtype=dtype,
                    rows=manifest.rows, tied=manifest.tied)
    stop_ids = [t.id for t in manifest.tokens if t.stop]
    suppressed = len(model.generation_config.suppress_tokens or [])

    drift = None
    target = DTYPES[dtype]
    if target != torch.float32 and verify_output:
        reference = probe_logits(model, tokenizer, processor, manifest)
    with atomic_folder(out, overwrite) as tmp:
        _save_as(model, tmp, target, max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest.save(tmp)
        report_v = None
        if verify_output:
            if target != torch.float32:
                rounded = probe_logits(model, tokenizer, processor, manifest)
                drift = max(float((a - b).abs().max()) for a, b in zip(reference, rounded))
            report_v = verify(tmp, model, tokenizer, processor, manifest=manifest)
            for line in report_v.lines():
                log(line)
            if not report_v.ok:
                raise VerifyError(report_v)
        files = sorted(f.name for f in Path(tmp).iterdir())
    log(f"exported {src or 'model'} -> {out} ({dtype}, {manifest.rows} rows, {'tied' if manifest.tied else 'untied'}, "
        f"{sum(f.endswith('.safetensors') for f in files)} safetensors file(s))")
    return ExportReport(out=str(out), source=str(src) if src else "", kind=kind, rows=manifest.rows,
                        tokenizer_size=len(tokenizer), tied=manifest.tied, dtype=dtype, files=files,
                        new_tokens=len(manifest.tokens), stop_token_ids=stop_ids, suppressed_rows=suppressed,
                        rounding_drift=drift, verify=report_v)


def _save_as(model, folder, dtype, max_shard_size) -> None:
    """save_pretrained in ``dtype``; afterwards the weights are back in fp32 (exact from bf16/fp16,
    so the in-memory model *is* the rounded export). Buffers are restored as they were: a rotary
    ``inv_freq`` rounded to bf16 would differ from the one a fresh load recomputes in fp32."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to(dtype)
    try:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    finally:
        model.to(torch.float32)
        for n, b in list(model.named_buffers()):
            mod, _, attr = n.rpartition(".")
            owner = model.get_submodule(mod) if mod else model
            if attr in owner._buffers:
                owner._buffers[attr] = buffers[n]


class VerifyError(ExportError):
    def __init__(self, report: VerifyReport):
        self.report = report
        super().__init__("verification failed, nothing written:\n" + "\n".join(report.lines()[1:]))


# -- probes -----------------------------------------------------------------------------------

def probe_texts(tokenizer, manifest: Manifest | None) -> list[str]:
    """Real prose without the new tokens, and a text that uses them (input-only image tokens aside)."""
    from .probe import real_text

    prose = " ".join(real_text()[0].split()[:40])
    news = [t.content for t in (manifest.tokens if manifest else []) if t.content != "<image>"]
    texts = [prose]
    if news:
        words = prose.split()
        texts.append(" ".join(f"{w} {t}" for w, t in zip(words * 4, news[:MAX_PROBE_TOKENS])))
    return texts


def probe_image():
    """A real photograph (scikit-image) or, without it, a deterministic gradient."""
    try:
        from .assets import real_images
        return real_images()["chelsea"]
    except Exception:  # scikit-image is an optional extra
        import numpy as np
        from PIL import Image

        y, x = np.mgrid[0:224, 0:224]
        return Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype("uint8"))


def image_prompt(processor) -> str:
    tok = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {tok}\nWhat is in this picture? ASSISTANT:"


def _inputs(tokenizer, processor, text, image=None):
    if image is not None:
        return dict(processor(text=text, images=image, return_tensors="pt"))
    return dict(tokenizer(text, return_tensors="pt"))


@torch.no_grad()
def probe_logits(model, tokenizer, processor, manifest) -> list[torch.Tensor]:
    out = []
    for text, image in _probe_list(tokenizer, processor, manifest):
        out.append(model(**_inputs(tokenizer, processor, text, image)).logits[0].float())
    return out


def _probe_list(tokenizer, processor, manifest):
    probes = [(t, None) for t in probe_texts(tokenizer, manifest)]
    if processor is not None and getattr(processor, "image_processor", None) is not None:
        probes.append((image_prompt(processor), probe_image()))
    return probes


# -- verify -----------------------------------------------------------------------------------

@torch.no_grad()
def verify(out, reference_model, tokenizer, processor=None, *, manifest: Manifest | None = None,
           atol: float = ATOL, gen_tokens: int = GEN_TOKENS, timeout: float = 1800) -> VerifyReport:
    """Reload ``out`` with plain transformers in a fresh process (fp32) and compare with
    ``reference_model`` (computed here, fp32): logits on probe inputs (max abs diff <= ``atol``),
    greedy generation, each new token one id that decodes back, and tied/untied."""
    out = Path(out)
    manifest = manifest or Manifest.find(out)
    reference_model = reference_model.eval()
    probes = _probe_list(tokenizer, processor, manifest)
    tokens = [(t.content, t.id) for t in (manifest.tokens if manifest else [])]
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tokengraft-verify-") as work:
        work = Path(work)
        req = {"out": str(out), "probes": [], "tokens": tokens, "gen_tokens": gen_tokens}
        for i, (text, image) in enumerate(probes):
            img_path = None
            if image is not None:
                img_path = str(work / f"probe{i}.png")
                image.save(img_path)
            req["probes"].append({"text": text, "image": img_path})
        (work / "request.json").write_text(json.dumps(req, ensure_ascii=False), encoding="utf-8")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(work)], capture_output=True, text=True,
                                  env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return VerifyReport(ok=False, problems=[f"reloading {out} took longer than {timeout:.0f} s; "
                                                    f"pass a larger timeout to verify()"])
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return VerifyReport(ok=False, problems=[f"plain transformers could not load {out}: {tail[0]}"])
        res = json.loads((work / "result.json").read_text(encoding="utf-8"))
        from safetensors.torch import load_file

        got = load_file(str(work / "result.safetensors"))

    problems += res["problems"]
    max_diff, gen_equal = 0.0, True
    for i, (text, image) in enumerate(probes):
        inputs = _inputs(tokenizer, processor, text, image)
        ids = inputs["input_ids"][0]
        if not torch.equal(ids, got[f"ids{i}"]):
            problems.append(f"probe {i}: the reloaded tokenizer/processor encodes the probe differently "
                            f"({got[f'ids{i}'].numel()} ids vs {ids.numel()})")
            continue
        ref = reference_model(**inputs).logits[0].float()
        if ref.shape != got[f"logits{i}"].shape:
            problems.append(f"probe {i}: logits shape {tuple(got[f'logits{i}'].shape)} after reload, "
                            f"{tuple(ref.shape)} in memory")
            continue
        d = float((ref - got[f"logits{i}"]).abs().max())
        max_diff = max(max_diff, d)
        if not d <= atol:
            problems.append(f"probe {i}: max |logit diff| {d:.3e} exceeds {atol:.0e}")
        if gen_tokens:
            g = reference_model.generate(**inputs, max_new_tokens=gen_tokens, do_sample=False)[0, ids.numel():]
            if not torch.equal(g, got[f"gen{i}"]):
                gen_equal = False
                problems.append(f"probe {i}: greedy generation differs: {g.tolist()} in memory, "
                                f"{got[f'gen{i}'].tolist()} after reload")
    tied = is_tied(reference_model)
    if res["tied"] != tied:
        problems.append(f"the model is {'tied' if tied else 'untied'} in memory but loads "
                        f"{'tied' if res['tied'] else 'untied'} (check tie_word_embeddings in config.json)")
    return VerifyReport(ok=not problems, problems=problems, max_abs_diff=max_diff, probes=len(probes),
                        generation_equal=gen_equal, tokens_checked=len(tokens), tied=res["tied"])


# The child runs with nothing but torch, transformers and safetensors: exactly what a user has.
_CHILD = r'''
import json, sys
from pathlib import Path
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer)

work = Path(sys.argv[1])
req = json.loads((work / "request.json").read_text(encoding="utf-8"))
out = req["out"]
cfg = AutoConfig.from_pretrained(out)
llava = hasattr(cfg, "vision_config")
cls = AutoModelForImageTextToText if llava else AutoModelForCausalLM
model, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
model.eval()
problems = []
for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    if info.get(kind):
        problems.append(f"loading {out}: {kind.replace('_', ' ')}: {sorted(map(str, info[kind]))[:5]}")
processor = AutoProcessor.from_pretrained(out) if llava else None
tok = processor.tokenizer if llava else AutoTokenizer.from_pretrained(out)
emb, head = model.get_input_embeddings(), model.get_output_embeddings()
tied = head is not None and head.weight is emb.weight
for content, tid in req["tokens"]:
    ids = tok(content, add_special_tokens=False)["input_ids"]
    if ids != [tid]:
        problems.append(f"token {content!r} encodes to {ids}, expected [{tid}]")
    back = tok.decode([tid])
    if back != content:
        problems.append(f"id {tid} decodes to {back!r}, expected {content!r}")
tensors = {}
with torch.no_grad():
    for i, p in enumerate(req["probes"]):
        if p["image"]:
            inputs = dict(processor(text=p["text"], images=Image.open(p["image"]).convert("RGB"), return_tensors="pt"))
        else:
            inputs = dict(tok(p["text"], return_tensors="pt"))
        n = inputs["input_ids"].shape[1]
        tensors[f"ids{i}"] = inputs["input_ids"][0].contiguous()
        tensors[f"logits{i}"] = model(**inputs).logits[0].float().contiguous()
        if req["gen_tokens"]:
            g = model.generate(**inputs, max_new_tokens=req["gen_tokens"], do_sample=False)
            tensors[f"gen{i}"] = g[0, n:].contiguous()
save_file(tensors, str(work / "result.safetensors"))
(work / "result.json").write_text(json.dumps({"problems": problems, "tied": tied}), encoding="utf-8")
'''
