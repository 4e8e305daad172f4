"""Would a supported transformers (4.48 ... 5.x) read this folder differently from transformers 5?

A folder transformers 5 wrote (not through tokengraft) can keep its rope only in
``rope_parameters``, name the tokenizer class ``TokenizersBackend``, list extra special tokens in
5.x's form, or lack a LLaVA's ``preprocessor_config.json``: transformers 4.48 (XTuner's pin)
then reads another rope silently, or fails. The rules are ``portable.py``'s, the same that every
tokengraft writer applies; the fix is an export, which writes a copy and never touches the input.
"""
from __future__ import annotations

import shlex

from ..portable import misreadings
from .findings import Finding
from .subject import Subject


def check_compat(s: Subject) -> list[Finding]:
    """One warning per misread field, naming the version, what it reads instead, and the fix."""
    if s.in_memory or s.config is None:
        return []
    src = shlex.quote(str(s.where))
    dst = shlex.quote(str(s.where).rstrip("/") + "-portable")
    return [Finding("warning", "old-transformers-misreads",
                    f"{s.where}/{m}; fix: tokengraft export {src} -o {dst} (writes a copy every supported "
                    f"transformers reads the same way; the folder is not changed)", data={"field": m})
            for m in misreadings(s.where)]
