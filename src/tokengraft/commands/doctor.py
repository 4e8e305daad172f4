"""`tokengraft doctor PATH [--json] [--kl]` and `tokengraft doctor --checkpoint CKPT --model MODEL`."""
from __future__ import annotations

import argparse
import textwrap

from ..errors import TokengraftError
from ._common import result_only_on_stdout

DESCRIPTION = textwrap.dedent("""\
    Check that a checkpoint folder's tokenizer, config, weights, processor, generation config
    and tokengraft.json agree with each other. Reads the files lazily (the weights row chunk by
    row chunk, safetensors or .bin through the safe reader); never runs any code from the folder
    (trust_remote_code is always False); the model is built only with --kl.

    Checks: remote code (auto_map); vocab_size present, an integer, and equal to the embedding
    rows in every config (text_config, llm_config, language_config); len(tokenizer) vs rows;
    head rows vs embedding rows; the tie flag vs the weights; NaN/inf in any weight (named by
    token for the embedding and head); LLaVA's processor present and its image token id (in
    range, the processor's image token, a placeholder and not a generated token); bos/eos/pad
    ids; rows that look untrained (all-zero, near-zero, identical to other tokens' rows);
    padding rows missing from generation_config.suppress_tokens; the manifest vs the tokenizer
    in both directions (fingerprint, each recorded token's id, tokens it does not record) and
    the weights (rows, tied); special tokens the tokenizer splits into pieces.

    --checkpoint CKPT --model MODEL instead checks whether a training checkpoint (mmengine /
    XTuner iter_N.pth, DeepSpeed folder, Trainer checkpoint-N, safetensors, ...) has the model's
    vocabulary rows, and prints the `tokengraft convert` command when it does not.

    Each finding is one line: severity, a stable code, and what is wrong, where, and what to run.""")

EPILOG = textwrap.dedent("""\
    exit status:
      0  no errors (warnings and notes allowed)
      1  at least one error (a check failed)
      2  the input could not be examined (not a folder, unreadable checkpoint, bad arguments)

    examples:
      tokengraft doctor out/smollm2-boxes
      tokengraft doctor out/llava-grounding --json | jq '.findings[] | select(.severity=="error")'
      tokengraft doctor out/smollm2-boxes --kl
      tokengraft doctor --checkpoint work_dirs/run/iter_500.pth --model out/llava-grounding

    See docs/doctor.md for every code and how to fix it.""")


def register(subparsers, name: str = "doctor"):
    p = subparsers.add_parser(name, help="check tokenizer, config, weights, processor and manifest agree",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", nargs="?",
                   help="a Hugging Face checkpoint folder (causal LM or LLaVA)")
    p.add_argument("--json", action="store_true",
                   help="print the findings as JSON ({path, ok, counts, findings: [{severity, code, message}]})")
    p.add_argument("--kl", action="store_true",
                   help="also load the model and measure KL(base || grafted) on real prose: how much "
                        "probability the grafted tokens' rows take on text without them (needs tokengraft.json)")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="a training checkpoint (file or folder) to check against --model: do its vocabulary "
                        "tensors have the model's rows? (names and shapes only; nothing is executed)")
    p.add_argument("--model", metavar="MODEL",
                   help="with --checkpoint: the model folder the checkpoint should load into (default: PATH)")
    return p


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from .. import doctor

    hf_logging.set_verbosity_error()  # the findings are the report; library chatter is noise here
    hf_logging.disable_progress_bar()
    with result_only_on_stdout(args.json):
        if args.checkpoint is not None:
            model = args.model or args.path
            if model is None:
                raise TokengraftError("--checkpoint needs --model MODEL: the model folder the checkpoint should load into")
            findings = doctor.check_checkpoint(args.checkpoint, model)
            where = args.checkpoint
        elif args.model is not None:
            raise TokengraftError("--model goes with --checkpoint CKPT; to check a model folder: tokengraft doctor MODEL")
        elif args.path is None:
            raise TokengraftError("give a model folder to check (tokengraft doctor PATH), or --checkpoint CKPT --model MODEL")
        else:
            findings = doctor.check_folder(args.path, kl=args.kl)
            where = args.path
    print(doctor.to_json(findings, where) if args.json else doctor.format_table(findings))
    return 1 if doctor.has_errors(findings) else 0
