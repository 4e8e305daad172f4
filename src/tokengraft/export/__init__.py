"""Export: one complete checkpoint (merged base + new rows + LoRA) that plain transformers loads.

``export(source, out)`` takes a training run / checkpoint folder (through
:func:`tokengraft.train.run.load_run`) or a Hugging Face folder (optionally with a PEFT adapter to
merge) and writes the ``save_pretrained`` layout: sharded safetensors, a config whose vocab sizes
and tie flag are true to the weights, the tokenizer, the processor, a generation config that stops
at the manifest's stop tokens and suppresses padding rows, and ``tokengraft.json`` with the export
in its history.

``verify(out, model, tokenizer, processor)`` reloads ``out`` with plain transformers in a *fresh
process* (:mod:`.verify_child`, so nothing cached in this one can hide a broken file) and compares
it with a reference model: logits on probe inputs, greedy generation, single-id new tokens, tie.

Modules: ``source`` (what is exported, loaded and checked), ``adapter`` (merging a PEFT adapter,
refusing one that drops trained rows), ``write`` (finalize, dtype, shards, atomic write),
``verify`` (the parent side) and ``verify_child`` (the fresh process).
"""
from .errors import ExportError
from .source import check_consistent, check_finite, load_source, source_kind
from .verify import ATOL, GEN_TOKENS, VerifyError, VerifyReport, probe_logits, verify
from .write import ExportReport, export, export_model

__all__ = ["ATOL", "GEN_TOKENS", "ExportError", "ExportReport", "VerifyError", "VerifyReport", "check_consistent",
           "check_finite", "export", "export_model", "load_source", "probe_logits", "source_kind", "verify"]
