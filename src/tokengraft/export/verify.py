"""The parent side of ``--verify``: probe inputs, the child process that reloads the export with
plain transformers (:mod:`tokengraft.export.verify_child`), and the comparison with a reference
model computed here (logits, greedy generation, single-id new tokens, tied/untied)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..hf import is_tied
from ..manifest import Manifest
from .errors import ExportError

ATOL = 1e-5  # max abs logit difference allowed between the reloaded and the reference model (fp32 compute)
# ... when the reload runs under another interpreter (another transformers/torch): kernels and op
# order may differ; measured 4.48/5.20 vs 5.25 on SmolLM2 and its LLaVA: docs/compat.md
OTHER_ATOL = 1e-4
GEN_TOKENS = 8  # greedy tokens compared per probe
MAX_PROBE_TOKENS = 48  # new tokens spelled out in the probe text (all of them are checked for single ids)


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # over every probe's logits; None when no probe was compared
    probes: int = 0
    generation_equal: bool | None = None  # None when no generation was compared
    tokens_checked: int = 0
    tied: bool | None = None
    reference: str = "in-memory model"  # what the reload was compared with
    reloaded_by: str | None = None  # "transformers X (PYTHON)" when --verify-python ran the reload
    atol: float = ATOL

    def lines(self) -> list[str]:
        diff = "not compared" if self.max_abs_diff is None else f"{self.max_abs_diff:.2e}"
        gen = {None: "not compared", True: "identical", False: "DIFFERS"}[self.generation_equal]
        by = f", reloaded by {self.reloaded_by}" if self.reloaded_by else ""
        head = (f"verify: {'OK' if self.ok else 'FAILED'}: {self.probes} probe(s) against the {self.reference}{by}, "
                f"max |logit diff| {diff} (tolerance {self.atol:.0e}), greedy generation {gen}, "
                f"{self.tokens_checked} new token(s) single ids, head "
                f"{'unknown' if self.tied is None else 'tied' if self.tied else 'untied'}")
        return [head] + [f"verify: problem: {p}" for p in self.problems]


class VerifyError(ExportError):
    """The export was written to a temporary folder and failed its check: nothing put in place (exit 1)."""

    exit_code = 1

    def __init__(self, report: VerifyReport):
        self.report = report
        self.details = tuple(report.lines())  # the measurements, printed before the error line
        super().__init__("verification failed, nothing written: " + "; ".join(report.problems))


# -- probes -----------------------------------------------------------------------------------

def probe_texts(tokenizer, manifest: Manifest | None) -> list[str]:
    """Real prose without the new tokens, and a text that uses them (input-only image tokens aside)."""
    from ..probe import real_text

    prose = " ".join(real_text()[0].split()[:40])
    news = [t.content for t in (manifest.tokens if manifest else []) if t.content != "<image>"]
    texts = [prose]
    if news:
        words = prose.split()
        texts.append(" ".join(f"{w} {t}" for w, t in zip(words * 4, news[:MAX_PROBE_TOKENS])))
    return texts


def probe_image():
    """A real photograph (scikit-image, an optional extra) or, without it, a deterministic gradient."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data

        return Image.fromarray(data.chelsea()).convert("RGB")
    except Exception:  # scikit-image missing or its data unreadable: the gradient still exercises the tower
        y, x = np.mgrid[0:224, 0:224]
        return Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype("uint8"))


def image_prompt(processor) -> str:
    tok = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {tok}\nWhat is in this picture? ASSISTANT:"


def inputs_of(tokenizer, processor, text, image=None) -> dict:
    if image is not None:
        return dict(processor(text=text, images=image, return_tensors="pt"))
    return dict(tokenizer(text, return_tensors="pt"))


def probe_list(tokenizer, processor, manifest) -> list[tuple]:
    probes = [(t, None) for t in probe_texts(tokenizer, manifest)]
    if processor is not None and getattr(processor, "image_processor", None) is not None:
        probes.append((image_prompt(processor), probe_image()))
    return probes


@torch.no_grad()
def probe_logits(model, tokenizer, processor, manifest) -> list[torch.Tensor]:
    return [model(**inputs_of(tokenizer, processor, text, image)).logits[0].float()
            for text, image in probe_list(tokenizer, processor, manifest)]


# -- verify -----------------------------------------------------------------------------------

def check_python(python) -> str:
    """``--verify-python``: an executable file (one line otherwise, before any slow work)."""
    p = Path(python)
    if not p.is_file() or not os.access(p, os.X_OK):
        raise ExportError(f"--verify-python {python}: not an executable file; pass the python of the environment "
                          f"that will load the export (e.g. ~/venvs/xtuner/bin/python)")
    return str(p)


def _child_env(work: Path, python: str | None) -> dict:
    """Another interpreter imports this tokengraft through a folder holding only a link to the
    package (never our site-packages: its transformers would shadow the one under test)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if python is not None:
        (work / "pkg").mkdir()
        (work / "pkg" / "tokengraft").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
        env["PYTHONPATH"] = str(work / "pkg")
        env.pop("PYTHONHOME", None)
    return env


def _run_child(out: Path, probes, tokens, gen_tokens: int, timeout: float, python: str | None = None):
    """(result dict, tensors) from verify_child, or (None, problem) when it could not reload ``out``."""
    from safetensors.torch import load_file

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
        env = _child_env(work, python)
        try:
            proc = subprocess.run([python or sys.executable, "-m", "tokengraft.export.verify_child", str(work)],
                                  capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"reloading {out} took longer than {timeout:.0f} s; pass a larger timeout to verify()"
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            who = f"{python} (its transformers)" if python else "plain transformers"
            return None, f"{who} could not load {out}: {tail[0]}"
        return json.loads((work / "result.json").read_text(encoding="utf-8")), load_file(str(work / "result.safetensors"))


@torch.no_grad()
def verify(out, reference_model, tokenizer, processor=None, *, manifest: Manifest | None = None,
           atol: float = ATOL, gen_tokens: int = GEN_TOKENS, timeout: float = 1800, tied: bool | None = None,
           reference: str = "in-memory model", python: str | None = None) -> VerifyReport:
    """Reload ``out`` with plain transformers in a fresh process (fp32) and compare with
    ``reference_model`` (computed here, fp32): logits on probe inputs (max abs diff <= ``atol``),
    greedy generation, each new token one id that decodes back, and tied/untied (``tied``: what
    the export should be; default: the reference model's own tie). ``python``: run the reload
    under that interpreter (another environment's transformers; tolerance ``OTHER_ATOL``)."""
    out = Path(out)
    manifest = manifest or Manifest.find(out)
    reference_model = reference_model.eval()
    probes = probe_list(tokenizer, processor, manifest)
    tokens = [(t.content, t.id) for t in (manifest.tokens if manifest else [])]
    if python is not None:
        atol = max(atol, OTHER_ATOL)
    res, got = _run_child(out, probes, tokens, gen_tokens, timeout, python)
    by = f"transformers {res.get('transformers')} ({python})" if python and res else None
    if res is None:
        return VerifyReport(ok=False, problems=[got], probes=len(probes), reference=reference, atol=atol)

    problems = list(res["problems"])
    diffs, gen_equal = [], (True if gen_tokens else None)
    for i, (text, image) in enumerate(probes):
        inputs = inputs_of(tokenizer, processor, text, image)
        ids = inputs["input_ids"][0]
        if not torch.equal(ids, got[f"ids{i}"]):
            problems.append(f"probe {i}: the reloaded tokenizer/processor encodes the probe differently "
                            f"({got[f'ids{i}'].numel()} ids vs {ids.numel()})")
            continue
        ref = reference_model(**inputs).logits[0].float()
        if ref.shape != got[f"logits{i}"].shape:
            problems.append(f"probe {i}: logits shape {tuple(got[f'logits{i}'].shape)} after reload, "
                            f"{tuple(ref.shape)} in the {reference}")
            continue
        d = float((ref - got[f"logits{i}"]).abs().max())
        diffs.append(d)
        if not d <= atol:  # NaN fails too
            problems.append(f"probe {i}: max |logit diff| {d:.3e} exceeds {atol:.0e}")
        if gen_tokens:
            g = reference_model.generate(**inputs, max_new_tokens=gen_tokens, do_sample=False)[0, ids.numel():]
            if not torch.equal(g, got[f"gen{i}"]):
                gen_equal = False
                problems.append(f"probe {i}: greedy generation differs: {g.tolist()} in the {reference}, "
                                f"{got[f'gen{i}'].tolist()} after reload")
    want = is_tied(reference_model) if tied is None else tied
    if res["tied"] != want:
        problems.append(f"the model should be {'tied' if want else 'untied'} but loads "
                        f"{'tied' if res['tied'] else 'untied'} (check tie_word_embeddings in config.json)")
    return VerifyReport(ok=not problems, problems=problems, max_abs_diff=max(diffs) if diffs else None,
                        probes=len(probes), generation_equal=gen_equal if diffs else None,
                        tokens_checked=len(tokens), tied=res["tied"], reference=reference, reloaded_by=by, atol=atol)
