"""``export --layout internlm2``: a bridged InternLM2 model written back in its own layout.

The default export writes the Llama layout every consumer reads. XTuner and LMDeploy users may want
the original InternLM2 folder back instead: packed ``wqkv``, InternLM2 key names, the original
config (``auto_map`` included) and tokenizer files plus the new tokens. The writing is the bridge's
(:func:`tokengraft.internlm2.save_folder`); this module adds what export promises: finite weights,
finalized vocabulary facts, the manifest entry, and ``--verify`` before the folder is renamed into
place (reload through the bridge: every weight equals the model's, rounded to the folder's dtype;
each new token is one id; probe logits equal).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..hf import finalize
from .errors import ExportError
from .source import check_finite
from .verify import ATOL, VerifyError, VerifyReport, probe_logits

LAYOUTS = ("llama", "internlm2")


def export_internlm2_layout(model, tokenizer, processor, manifest, out, *, source, overwrite: bool, verify_output: bool,
                            log=print):
    """Write the InternLM2 layout; returns the finalized manifest (what was written)."""
    from ..internlm2 import bridge_source, export_internlm2

    if processor is not None:
        raise ExportError(f"{source}: --layout internlm2 writes a language model; a LLaVA export keeps the Llama layout")
    if bridge_source(manifest) is None:
        raise ExportError(f"{source}: --layout internlm2 needs a model read from an InternLM2 folder (its manifest "
                          f"records no InternLM2 source); export this model in the default llama layout")
    check_finite(model, str(source))
    manifest = finalize(model, tokenizer, None, copy.deepcopy(manifest))
    manifest.record("export", source=str(source), layout="internlm2", rows=manifest.rows, tied=manifest.tied)
    check = (lambda tmp: _verify(tmp, model, tokenizer, manifest, log)) if verify_output else None
    out = export_internlm2(model, tokenizer, out, manifest, overwrite=overwrite, check=check)
    log(f"exported {source} -> {out} (InternLM2 layout, {manifest.rows} rows)")
    return manifest


def _verify(folder: Path, model, tokenizer, manifest, log) -> None:
    """Reload ``folder`` through the bridge and compare with ``model`` rounded to the folder's dtype."""
    from ..checkpoint.safetensors import SafetensorsFile
    from ..internlm2 import load_folder, weight_files

    back, tok, _, _ = load_folder(folder, dtype=torch.float32)
    report = VerifyReport(ok=True, reference="merged model in memory, rounded to the folder's dtype", tied=False)
    with SafetensorsFile(weight_files(folder)[0]) as st:  # the folder's own dtype, from a header
        dtype = st.dtype(st.keys()[0])
    want = {k: v.detach().to(dtype).float() for k, v in model.state_dict().items()}
    got = back.state_dict()
    bad = [k for k in want if k not in got or not torch.equal(want[k], got[k])]
    if bad:
        report.problems.append(f"{len(bad)} weight(s) differ after the round trip, e.g. {bad[0]}")
    for t in manifest.tokens:
        ids = tok(t.content, add_special_tokens=False)["input_ids"]
        report.tokens_checked += 1
        if ids != [t.id]:
            report.problems.append(f"new token {t.content!r} encodes to {ids}, not [{t.id}]")
    if not bad:
        rounded = copy.deepcopy(model)
        rounded.load_state_dict(want)  # weights rounded; buffers (rotary inv_freq) stay fp32, as a reload computes
        with torch.no_grad():
            a = probe_logits(rounded, tokenizer, None, manifest)
            b = probe_logits(back, tok, None, manifest)
        report.probes = len(a)
        report.max_abs_diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
        if not report.max_abs_diff <= ATOL:
            report.problems.append(f"logits differ by {report.max_abs_diff:.3e} (tolerance {ATOL:.0e})")
    report.ok = not report.problems
    for line in report.lines():
        log(line)
    if not report.ok:
        raise VerifyError(report)

