"""`tokengraft convert`: carry a checkpoint to another vocabulary by token identity, on disk."""
from __future__ import annotations

import argparse

from ._common import add_output, add_overwrite, check_inputs

DESCRIPTION = """\
Convert CHECKPOINT to the vocabulary of TARGET and write the result to OUT.

Rows of every vocabulary-shaped tensor (input embeddings, output heads and their biases, LoRA
factors on them, PEFT modules_to_save copies and trainable-token rows, optimizer moments) move by
token string: a token keeps its trained row wherever its id moved; tokens new to TARGET get
initialized rows (input side: mean of the token's sub-word pieces; output side: mean over trained
rows); tokens TARGET lacks are reported as dropped. A vocabulary-sized tensor that tokengraft does
not understand is an error, never silently loaded or dropped.

CHECKPOINT may be a Hugging Face folder (single or sharded safetensors, .bin), a single
.safetensors/.bin/.pt/.pth file, an XTuner/mmengine iter_N.pth file, an XTuner DeepSpeed folder
(mp_rank_00_model_states.pt; its ZeRO-1/2 optimizer partitions are remapped exactly for the same
world size, ZeRO-3 and tensor-parallel partitions are dropped with a note; ZeRO-3 weights are
consolidated by tokengraft's own reader, as DeepSpeed's zero_to_fp32 does) or a PEFT adapter folder.
No code from a checkpoint ever runs (safetensors, or a restricted unpickler), and an output names
only pickled globals known to be inert: anything else is refused in one line naming it.

The conversion streams: vocabulary-shaped tensors are read and written in row chunks, the other
tensors of their shards are copied byte for byte, and shards without any are hard-linked (or
copied); peak memory stays far below the model's size. OUT is written to a temporary sibling and renamed into place; CHECKPOINT
is never modified. HF and PEFT folders keep their layout; other sources become model.safetensors
(plus optimizer.pt with remapped moments when the source had an optimizer state). OUT also gets
TARGET's tokenizer and a tokengraft.json recording the conversion.

Source vocabulary:
  1. what you pass: --source-tokenizer DIR, or --source-tokens (TARGET's base vocabulary followed
     by these tokens, in id order); not both. It wins over the checkpoint's own tokenizer, and the
     report says when that one differs;
  2. else the checkpoint's own tokenizer or tokengraft.json;
  3. else none: rows are mapped BY INDEX, with a loud warning naming that assumption."""

EPILOG = """\
examples:
  # an XTuner checkpoint trained before three tokens were added (92,544 -> 92,547 rows)
  tokengraft convert work_dirs/iter_500.pth --to ./llava-grafted -o ./iter_500-grafted \\
      --source-tokens '<box>,<ref>'

  # a fine-tuned folder with its own tokenizer, to a vocabulary with tokens reordered
  tokengraft convert ./run-a/final --to ./vocab-b -o ./run-a-on-b

exit status: 0 on success, 2 on bad input (with a one-line reason); nothing is written on error.
docs: docs/convert.md"""


def register(subparsers, name):
    p = subparsers.add_parser(name, help="carry a checkpoint to another vocabulary by token identity",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or folder to convert (read only)")
    p.add_argument("--to", dest="target", metavar="TARGET", required=True,
                   help="folder with the target tokenizer (and usually config.json and tokengraft.json), or a "
                        "tokengraft.json alone when CHECKPOINT's tokenizer is the manifest's base vocabulary")
    add_output(p)
    p.add_argument("--source-tokenizer", metavar="DIR",
                   help="folder with the tokenizer CHECKPOINT was trained with (wins over a tokenizer inside CHECKPOINT)")
    p.add_argument("--source-tokens", metavar="'<a>,<b>'",
                   help="CHECKPOINT's vocabulary is TARGET's base plus these tokens, in id order")
    p.add_argument("--init", default="auto", choices=("auto", "mean", "hewitt", "subword", "zero"),
                   help="how rows new to TARGET are initialized (default: auto = sub-word mean on the "
                        "input side, mean over trained rows on the output side and for tied heads)")
    p.add_argument("--safetensors", action="store_true",
                   help="write an HF folder's .bin shards as safetensors (same sharding; default: keep .bin)")
    add_overwrite(p)
    return p


def _log(line: str) -> None:
    """The report on stdout; an assumption (rows mapped by index) on stderr as well, where it is seen."""
    import sys

    if line.startswith("WARNING"):
        print(f"tokengraft convert: {line}", file=sys.stderr)
    print(line)


def _return_freed_memory() -> None:
    """Have glibc serve large buffers (the row chunks) with mmap, so freeing one returns it to the
    OS. Its default adaptive threshold keeps them in a fragmented heap instead: measured on the
    1.7B benchmark, peak RSS 0.67 GB -> 0.36 GB. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def run(args) -> int:
    from ..checkpoint.convert import convert

    _return_freed_memory()
    check_inputs(args.output, args.overwrite, {"CHECKPOINT": args.checkpoint, "TARGET": args.target,
                                               "--source-tokenizer": args.source_tokenizer})

    convert(args.checkpoint, args.target, args.output, source_tokenizer=args.source_tokenizer,
            source_tokens=args.source_tokens, init=args.init, overwrite=args.overwrite,
            safetensors=args.safetensors, log=_log)
    return 0
