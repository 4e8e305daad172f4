"""`tokengraft doctor PATH [--json] [--kl]`: consistency checks on a checkpoint folder."""
from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = textwrap.dedent("""\
    Check that a checkpoint folder's tokenizer, config, weights, processor, generation config
    and tokengraft.json agree with each other. Reads the files lazily (only the embedding and
    head tensors, in row chunks); the model is built only with --kl.

    Checks: len(tokenizer) vs embedding rows vs every vocab_size field (config, text_config);
    head rows vs embedding rows; the tie flag vs the weights; LLaVA's image token id (in range,
    the processor's image token, known to the tokenizer); bos/eos/pad ids in config, generation
    config and tokenizer; rows of tokens that look untrained (all-zero, near-zero, identical to
    other tokens' rows); padding rows missing from generation_config.suppress_tokens; the
    manifest vs tokenizer (fingerprint, each token's id) and weights (rows, tied); special tokens
    the tokenizer splits into pieces.

    Each finding is one line: severity, a stable code, and what is wrong, where, and what to run.""")

EPILOG = textwrap.dedent("""\
    exit status:
      0  no errors (warnings and notes allowed)
      1  at least one error
      2  PATH could not be examined (not a folder)

    examples:
      tokengraft doctor out/smollm2-boxes
      tokengraft doctor out/llava-grounding --json | jq '.findings[] | select(.severity=="error")'
      tokengraft doctor out/smollm2-boxes --kl

    See docs/doctor.md for every code and how to fix it.""")


def register(subparsers, name: str = "doctor"):
    p = subparsers.add_parser(name, help="check tokenizer, config, weights, processor and manifest agree",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="a Hugging Face checkpoint folder (causal LM or LLaVA)")
    p.add_argument("--json", action="store_true",
                   help="print the findings as JSON ({path, ok, counts, findings: [{severity, code, message}]})")
    p.add_argument("--kl", action="store_true",
                   help="also load the model and measure KL(base || grafted) on real prose: how much "
                        "probability the grafted tokens' rows take on text without them (needs tokengraft.json)")
    return p


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from .. import doctor

    hf_logging.set_verbosity_error()  # the findings are the report; library chatter is noise here
    hf_logging.disable_progress_bar()
    findings = doctor.check_folder(args.path, kl=args.kl)
    print(doctor.to_json(findings, args.path) if args.json else doctor.format_table(findings))
    return 1 if doctor.has_errors(findings) else 0
