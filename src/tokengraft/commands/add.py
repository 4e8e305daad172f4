"""`tokengraft add`: graft tokens onto a checkpoint folder and write a complete new folder."""
from __future__ import annotations

import argparse
import json

from ..manifest import MAX_PAD_MULTIPLE
from ._common import add_init, add_output, add_overwrite, add_tokens, check_inputs, number, result_only_on_stdout


def register(sub, name):
    p = sub.add_parser(
        name, help="add tokens to a model folder (resize, initialize, record)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Add special tokens to a Hugging Face checkpoint folder (a causal LM, or a LLaVA with its\n"
                    "processor): the tokenizer learns them, the embeddings and head grow (never shrink; padded\n"
                    "rows are reused; tied stays tied), every new row is initialized, every vocab_size field\n"
                    "and the image token stay consistent, and tokengraft.json records the change. The output\n"
                    "is a complete folder that plain transformers loads. MODEL_DIR is never modified.",
        epilog="init strategies (per side: input embedding / output head):\n"
               "  auto      input: subword (or describe, with a description); output: the mean row, so\n"
               "            the model is unchanged on text without the tokens. Tied heads: the semantic\n"
               "            row blended toward the mean as far as a KL budget on real text allows.\n"
               "  mean      mean of trained rows (untrained all-zero rows excluded), both sides\n"
               "  hewitt    mean + small noise shaped like the rows' covariance\n"
               "  subword   mean of the rows of the pieces the base tokenizer splits the token into\n"
               "  describe  mean of the pieces of the token's description (tokens file)\n"
               "  distill   input row fitted so the token acts like its description (needs one)\n"
               "  copy:TOK  the row of an existing token\n\n"
               "tokens file (YAML or JSON): a list of strings or mappings with keys\n"
               "  content, description, role (generate|input), special (bool), init, stop (bool)\n\n"
               "examples:\n"
               "  tokengraft add ./llava --tokens '<box>,</box>,<ref>,</ref>' -o ./llava-box\n"
               "  tokengraft add ./model --tokens-file tokens.yaml --pad-to-multiple-of 128 -o ./out\n"
               "  tokengraft add ./llava-box --tokens '<box>' -o ./again   # no-op: already grafted\n\n"
               "exit status: 0 on success, 2 on bad input (nothing written)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model folder (config, weights, tokenizer)")
    add_tokens(p)
    add_init(p)
    p.add_argument("--pad-to-multiple-of", type=number(int, 1, MAX_PAD_MULTIPLE), default=64, metavar="N",
                   help=f"when rows must grow, round up to a multiple of N (default 64; 1 disables; "
                        f"at most {MAX_PAD_MULTIPLE:,})")
    p.add_argument("--not-special", action="store_true",
                   help="add as normal (not special) tokens: kept by decode(skip_special_tokens=True)")
    add_output(p)
    add_overwrite(p)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return p


def run(args) -> int:
    from ..graft import GraftError, graft, parse_tokens
    from ..io import load_folder, save_folder

    if not args.tokens and not args.tokens_file:
        raise GraftError("no tokens given; pass --tokens '<a>,<b>' or --tokens-file FILE")
    specs = parse_tokens(args.tokens, args.tokens_file)
    if args.not_special:
        for s in specs:
            s.special = False
    if args.init:
        for s in specs:
            s.init = args.init
        specs = parse_tokens(specs)
    inputs = {"MODEL_DIR": args.model_dir, "tokens file": args.tokens_file}
    check_inputs(args.output, args.overwrite, inputs)  # before the slow part
    with result_only_on_stdout(args.json):
        model, tok, processor, manifest = load_folder(args.model_dir)
        manifest = graft(model, tok, specs, pad_to_multiple_of=args.pad_to_multiple_of, manifest=manifest,
                         processor=processor)
        save_folder(args.output, model, tok, manifest, processor=processor, overwrite=args.overwrite,
                    inputs=inputs)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(f"wrote {args.output}  (rows {manifest.rows}, tied={manifest.tied})")
        for t in manifest.tokens:
            print(f"  {t.id:>7}  {t.content:<20} special={t.special!s:<5} role={t.role:<8} init={t.init}")
    return 0
