"""``switchformer eval``: validation loss, perplexity and routing statistics of a run."""

from __future__ import annotations

import argparse

from switchformer.commands.common import add_inference_arguments, inference_options

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "eval"
HELP = "validation loss, perplexity and routing statistics of a run"
EPILOG = """examples:
  switchformer eval runs/quick
  switchformer eval runs/quick --routing dropless   # no token dropped
  switchformer eval runs/quick --data test.txt --json   # every document of test.txt; JSON for machines
  switchformer eval runs/de-en --data test.jsonl --metric bleu chrf   # translate the sources, score with sacrebleu
  switchformer eval runs/de-en --metric bleu --num-beams 4 --json     # the validation split, beam search"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory or checkpoint")
    parser.add_argument(
        "--data", nargs="+", help="evaluate on every document of these files (default: the run's validation split)"
    )
    parser.add_argument("--batches", type=int, help="number of validation batches (default: the run's eval_batches)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (NaN as null)")
    parser.add_argument("--device")
    parser.add_argument(
        "--routing",
        choices=["eval", "dropless"],
        default="eval",
        help="eval: the run's eval capacity factor, tokens over it are dropped (default; what training "
        "reported, and how generate routes by default); dropless: no token dropped",
    )
    parser.add_argument(
        "--metric",
        nargs="+",
        choices=["bleu", "chrf"],
        help="seq2seq runs: translate the sources and score corpus BLEU/chrF against the targets with sacrebleu "
        "(pip install 'switchformer[metrics]'); per source language too when there are several. With --metric "
        "every pair is scored unless --batches is given",
    )
    parser.add_argument("--num-beams", type=int, help="with --metric: beams (1: greedy; default: the run's num_beams)")
    parser.add_argument("--length-penalty", type=float, help="with --metric: beam length penalty (default: the run's)")
    parser.add_argument("--max-new-tokens", type=int, help="with --metric: tokens per translation (default: seq_len)")
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        help="with --metric: no N-gram of tokens twice in a translation (0: off; default: the run's)",
    )
    parser.add_argument(
        "--source-lang", metavar="CODE", help="with --metric: the language of sources whose data does not say it"
    )
    add_inference_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while translating")


def run(args) -> int:
    from switchformer.analysis.evaluate_run import evaluate_run, format_eval

    report = evaluate_run(
        args.run,
        data=args.data,
        batches=args.batches,
        routing=args.routing,
        device=args.device,
        metrics=args.metric,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        max_new_tokens=args.max_new_tokens,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        source_lang=args.source_lang,
        progress=not args.no_progress,
        load_options=inference_options(args, args.device),
    )
    from switchformer.runs.files import to_json

    print(to_json(report, indent=2) if args.json else format_eval(report))
    return 0
