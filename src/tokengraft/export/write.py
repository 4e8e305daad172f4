"""Writing an export: finalize the in-memory model (hf.finalize), refuse broken weights, save in
the requested dtype and shard size into a temporary sibling, optionally verify it there, and only
then rename it into place."""
from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..hf import DTYPES, finalize
from ..outdir import atomic_folder
from ..portable import make_portable
from ..manifest import Manifest
from .errors import ExportError
from .layout import LAYOUTS, export_internlm2_layout
from .source import check_finite, load_source
from .verify import VerifyError, VerifyReport, check_python, probe_logits, verify


@dataclass
class ExportReport:
    out: str
    source: str
    kind: str  # "run", "hf" or "memory"
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


def export(source, out, *, adapter=None, dtype: str = "fp32", max_shard_size="5GB", overwrite: bool = False,
           verify_output: bool = False, layout: str = "llama", verify_python=None, log=print) -> ExportReport:
    """Write ``source`` (run, checkpoint, or model folder [+ adapter]) to ``out`` as one full checkpoint.

    With ``verify_output`` the written folder is reloaded in a fresh process and compared, *before*
    it is renamed into place, with a reference: for ``adapter``, PEFT's own (unmerged) load of the
    adapter on a fresh copy of the base; otherwise the merged model. A failed check leaves no
    ``out`` and raises :class:`VerifyError`.

    ``layout="internlm2"`` writes a model read from an InternLM2 folder back in that folder's own
    layout and dtype (:mod:`.layout`); ``dtype`` and ``max_shard_size`` then do not apply.

    ``verify_python``: the reload of ``verify_output`` runs under that interpreter (the consumer's
    environment, e.g. XTuner's with transformers 4.48) instead of this one."""
    if layout not in LAYOUTS:
        raise ExportError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if verify_python is not None:
        if not verify_output or layout != "llama":
            raise ExportError("--verify-python: needs --verify and the llama layout (the internlm2 layout is "
                              "checked through tokengraft's own InternLM2 bridge)")
        verify_python = check_python(verify_python)
    _check_args(source, out, dtype, overwrite)
    model, tokenizer, processor, manifest, kind = load_source(source, adapter, log=log)
    if layout == "internlm2":
        m = export_internlm2_layout(model, tokenizer, processor, manifest, out, source=source, overwrite=overwrite,
                                    verify_output=verify_output, log=log)
        return ExportReport(out=str(out), source=str(source), kind=kind, rows=m.rows, tokenizer_size=len(tokenizer),
                            tied=m.tied, dtype="as the InternLM2 source", files=sorted(f.name for f in Path(out).iterdir()),
                            new_tokens=len(m.tokens), stop_token_ids=[t.id for t in m.tokens if t.stop],
                            suppressed_rows=len(model.generation_config.suppress_tokens or []))
    reference = None
    if adapter is not None and verify_output:
        reference = peft_reference(source, adapter)
    return export_model(model, tokenizer, processor, manifest, out, source=source, kind=kind, adapter=adapter,
                        dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                        verify_output=verify_output, reference=reference, verify_python=verify_python, log=log)


def peft_reference(base, adapter):
    """PEFT's own view of ``base`` + ``adapter``: a fresh load, the adapter applied, not merged,
    so verify never compares the merged model with itself."""
    from peft import PeftModel

    from ..io import load_folder

    model, _, _, _ = load_folder(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


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
                 verify_output: bool = False, reference=None, verify_python=None, log=print) -> ExportReport:
    """Export an in-memory (already merged, fp32) model; ``export`` is this after loading a source.
    The model's config and generation config are updated in place (they describe what is written).
    ``reference``: an independent model the reload must equal (fp32), e.g. PEFT's load of an adapter."""
    _check_args(source, out, dtype, overwrite)
    src, out = Path(source) if source is not None else None, Path(out)
    model = model.eval()
    check_finite(model, str(src or "the model"))
    manifest = finalize(model, tokenizer, processor, copy.deepcopy(manifest))  # the caller's stays as it was
    manifest.record("export", source=str(src) if src else None, adapter=str(adapter) if adapter else None, dtype=dtype,
                    rows=manifest.rows, tied=manifest.tied)
    stop_ids = [t.id for t in manifest.tokens if t.stop]
    suppressed = len(model.generation_config.suppress_tokens or [])

    drift, target = None, DTYPES[dtype]
    pre = None
    if verify_output and (target != torch.float32 or reference is not None):
        pre = probe_logits(model, tokenizer, processor, manifest)  # the fp32 merged model, before rounding
    merge_problem = None
    if verify_output and reference is not None and target != torch.float32:
        # the reload is compared with the rounded model below; the merge itself with PEFT here, in fp32
        ref = probe_logits(reference, tokenizer, processor, manifest)
        d = max(float((a - b).abs().max()) for a, b in zip(pre, ref))
        if not d <= 1e-5:
            merge_problem = f"the merged model differs from PEFT's own load of the adapter by {d:.3e} (fp32)"
    with atomic_folder(out, overwrite) as tmp:
        _save_as(model, tmp, target, max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _carry_sentencepiece(manifest, tmp)
        make_portable(tmp)  # before verify: the child reads what old transformers will read
        manifest.save(tmp)
        report_v = None
        if verify_output:
            if target != torch.float32:
                rounded = probe_logits(model, tokenizer, processor, manifest)
                drift = max(float((a - b).abs().max()) for a, b in zip(pre, rounded))
            independent = reference is not None and target == torch.float32
            report_v = verify(tmp, reference if independent else model, tokenizer, processor, manifest=manifest,
                              tied=manifest.tied,
                              reference="PEFT load of the adapter" if independent else "merged model in memory",
                              python=verify_python)
            if merge_problem:
                report_v.problems.append(merge_problem)
                report_v.ok = False
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


def _carry_sentencepiece(manifest, folder: Path) -> None:
    """A model bridged from InternLM2 keeps its ``tokenizer.model`` beside the Llama-layout export:
    llama.cpp's converter reads the sentencepiece vocabulary from it (the new tokens come from
    tokenizer.json's added tokens)."""
    from ..internlm2 import bridge_source

    src = bridge_source(manifest)
    if src is not None and (src / "tokenizer.model").is_file() and not (folder / "tokenizer.model").exists():
        shutil.copy2(src / "tokenizer.model", folder / "tokenizer.model")


@torch.no_grad()
def _refuse_overflow(model, dtype) -> None:
    """Every tensor written stays finite after rounding to ``dtype``: a finite fp32 row beyond fp16's
    range (65504) would be written as inf. One line naming the tensor and the row; the model is unchanged."""
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or torch.isfinite(t.to(dtype)).all():
            continue
        rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
        r = int((~torch.isfinite(rows.to(dtype))).any(dim=1).nonzero()[0])
        big = float(rows[r].abs().max())
        raise ExportError(f"{name}: row {r} holds {big:.6g}, beyond {str(dtype).removeprefix('torch.')}'s range "
                          f"(largest {torch.finfo(dtype).max:.6g}): it would be written as inf; export with "
                          f"--dtype bf16 or fp32")


def _save_as(model, folder, dtype, max_shard_size) -> None:
    """save_pretrained in ``dtype``; afterwards the weights are back in fp32 (exact from bf16/fp16,
    so the in-memory model *is* the rounded export). Buffers are restored as they were: a rotary
    ``inv_freq`` rounded to bf16 would differ from the one a fresh load recomputes in fp32."""
    if dtype != torch.float32:
        _refuse_overflow(model, dtype)
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
