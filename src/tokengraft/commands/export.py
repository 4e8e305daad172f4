"""`tokengraft export`: one complete checkpoint (merged) that plain transformers loads."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TokengraftError
from ..files import read_json
from ._common import add_dtype, add_max_shard_size, add_output, add_overwrite, check_inputs

DESCRIPTION = """\
Export SOURCE as one complete Hugging Face checkpoint in OUT: the base model, the new rows and any
LoRA merged into full weights, in the layout save_pretrained writes.

SOURCE is a training run folder or one of its checkpoint-N folders (made by `tokengraft train`;
the base model is re-loaded from the folder run.json names, and must still have the vocabulary the
run was trained with), or a Hugging Face model folder (e.g. made by `tokengraft add`), optionally
with --adapter, a PEFT LoRA adapter folder merged with peft's merge_and_unload.

OUT holds:
  model*.safetensors      sharded per --max-shard-size, with model.safetensors.index.json
  config.json             every vocab_size equal to the rows; tie_word_embeddings true to the
                          weights (tied stays tied, untied stays untied); LLaVA's image token id
  tokenizer files         added tokens with their special flags, the chat template
  processor files         for LLaVA (image processor, image token)
  generation_config.json  eos_token_id includes every token the manifest marks stop=true;
                          suppress_tokens lists the padding rows no token uses
  tokengraft.json         the manifest, with this export in its history

OUT is written to a temporary sibling and renamed into place: an interrupted or failed export
leaves nothing behind, and SOURCE is never modified. An existing OUT is refused unless
--overwrite.

--verify reloads the written folder with plain transformers in a fresh Python process (before it
is renamed into place) and compares it with the merged model in memory, computed in fp32:
  - logits on probe inputs: real prose without the new tokens, a text using them, and an image
    prompt for LLaVA; max |difference| must be <= 1e-5;
  - greedy generation (8 tokens per probe) identical;
  - each new token encodes to its one id and decodes back to itself;
  - a tied model loads tied, an untied one untied.
For --dtype bf16/fp16 the comparison is against the merged model rounded to that dtype (the same
1e-5 tolerance); the rounding drift itself, against the fp32 merged model, is printed, not failed.
Any problem prints one line each and exits non-zero; nothing is written.

--verify-python PYTHON runs that reload under another interpreter: the environment that will load
the export (XTuner's venv with transformers 4.48, vLLM's with 5.20, ...), so the check proves the
folder where it is used. tokengraft need not be installed there (this tokengraft is put on its
path); it needs torch, transformers, safetensors and pillow. Across versions the logit tolerance
is 1e-4 (docs/compat.md has the measured differences).

Every folder is written so transformers 4.48 ... 5.x read the same thing (rope_theta beside
rope_parameters, torch_dtype, a tokenizer class 4.x knows, preprocessor_config.json: docs/compat.md);
exporting a folder transformers 5 wrote elsewhere is how `doctor`'s old-transformers warnings are fixed."""

EPILOG = """\
examples:
  tokengraft export runs/grounding -o ./llava-grounding --verify
  tokengraft export runs/grounding/checkpoint-200 -o ./ck200 --dtype bf16 --max-shard-size 2GB
  tokengraft export ./llava-grafted --adapter ./my-lora -o ./llava-merged --verify
  tokengraft export runs/internlm2-run -o ./internlm2-new --layout internlm2 --verify   # for XTuner / LMDeploy
  tokengraft export ./llava-box -o ./for-xtuner --verify --verify-python ~/venvs/xtuner/bin/python

exit status: 0 on success; 1 when --verify finds a difference; 2 on bad input (one-line reason).
docs: docs/export.md"""


def register(subparsers, name):
    p = subparsers.add_parser(name, help="write one complete (merged) checkpoint; --verify reloads it",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="training run, checkpoint-N folder, or model folder (read only)")
    add_output(p)
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter folder to merge (model-folder SOURCE only)")
    add_dtype(p)
    add_max_shard_size(p)
    p.add_argument("--verify", action="store_true",
                   help="reload OUT with plain transformers in a fresh process and compare (see above)")
    p.add_argument("--verify-python", metavar="PYTHON",
                   help="with --verify: run the reload under this interpreter (the consumer's environment, e.g. "
                        "XTuner's venv/bin/python with transformers 4.48); tolerance 1e-4 across versions")
    p.add_argument("--layout", choices=("llama", "internlm2"), default="llama",
                   help="llama (default): the layout transformers, vLLM and llama.cpp read; internlm2: a model read "
                        "from an InternLM2 folder written back in that folder's own layout (packed wqkv, original "
                        "config with auto_map, original tokenizer files + the new tokens, original dtype)")
    add_overwrite(p)
    return p


def run_bases(source) -> list[str]:
    """The base model folders the run.json files of a run (or checkpoint-N) name: inputs too."""
    p = Path(source)
    bases = []
    if not p.is_dir():
        return bases
    for f in [p / "run.json", *sorted(p.glob("checkpoint-*/run.json"))]:
        try:
            base = read_json(f, "a training run's run.json").get("base_model")
        except (TokengraftError, AttributeError):
            continue  # export itself reports an unreadable run.json
        if isinstance(base, str) and base and base not in bases:
            bases.append(base)
    return bases


def run(args) -> int:
    from ..export import export

    inputs = {"SOURCE": args.source, "--adapter": args.adapter}
    for i, b in enumerate(run_bases(args.source)):
        inputs["base model (run.json)" + (f" #{i + 1}" if i else "")] = b
    check_inputs(args.output, args.overwrite, inputs)
    export(args.source, args.output, adapter=args.adapter, dtype=args.dtype, max_shard_size=args.max_shard_size,
           overwrite=args.overwrite, verify_output=args.verify, layout=args.layout, verify_python=args.verify_python)
    return 0
