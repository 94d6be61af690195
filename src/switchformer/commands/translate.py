"""``switchformer translate RUN``: translate a file (or standard input) line by line with a seq2seq
run, as :func:`switchformer.inference.translation.translate` does.

Input: UTF-8 text, one source per line (lines end at ``\\n``; a ``\\r`` before it is dropped; a
byte-order mark at the start is dropped), gzipped when the file name ends in ``.gz``: the reading
every command gives a text file (:func:`switchformer.data.files.read_text`). A
file is read and checked whole before anything is translated, so a bad byte is named
(``src.txt:12: not valid UTF-8``) before any output; standard input is read as it comes.

Output: exactly one line per input line, in input order: an empty or blank source gives an empty
line, and a line break inside a translation becomes a space. Lines are written as they are
produced, a buffer (``--buffer-size`` sources) at a time, whole lines only: a run that is stopped
leaves, in ``--output``, the translations of the first N input lines, never part of a line.
``--output`` may not be the input, nor lie inside the run (reading a run never writes into it).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from switchformer.commands.common import add_inference_arguments, inference_options, report_expert_cache

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

log = logging.getLogger("switchformer")

NAME = "translate"
HELP = "translate a file line by line with a seq2seq run (batched; greedy or beams)"
EPILOG = """examples:
  switchformer translate runs/de-en --input test.de --output hyp.en
  switchformer translate runs/de-en --num-beams 4 --length-penalty 0.6 < test.de > hyp.en
  switchformer translate runs/multi --source-lang fr --input test.fr --output hyp.en   # multilingual run
  sacrebleu test.en < hyp.en          # or: switchformer eval runs/de-en --data test.jsonl --metric bleu"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory or checkpoint (trained with objective=seq2seq)")
    parser.add_argument("--input", "-i", help="UTF-8 text, one source per line (default: standard input)")
    parser.add_argument(
        "--output",
        "-o",
        help="one translation per input line, written as produced (default: standard output); a stopped run "
        "leaves the first lines' translations, whole lines only",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sentences decoded together (default: 32)")
    parser.add_argument(
        "--buffer-size",
        type=int,
        default=1024,
        help="sentences read, sorted by length and translated before their output is written (default: 1024)",
    )
    parser.add_argument("--num-beams", type=int, help="1: greedy; more: beam search (default: the run's num_beams)")
    parser.add_argument("--length-penalty", type=float, help="beam search length penalty (default: the run's)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="tokens per translation at most (default: the run's seq_len)"
    )
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        help="no N-gram of tokens twice in a translation, the cure for loops such as 'a man holding a man "
        "holding ...' (0: off; default: the run's)",
    )
    parser.add_argument(
        "--source-lang", metavar="CODE", help="the language of every line, when the run's source_prefix names it"
    )
    parser.add_argument(
        "--target-lang", metavar="CODE", help="the target language, when the run's source_prefix names it"
    )
    parser.add_argument(
        "--routing",
        choices=["eval", "dropless"],
        default="eval",
        help="eval: the run's own eval routing (default); dropless: no token dropped, so batching never changes "
        "a translation",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    add_inference_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_paths(args) -> tuple[Path | None, Path | None]:
    from switchformer.runs.directory import run_dir_of

    source = Path(args.input) if args.input not in (None, "-") else None
    target = Path(args.output) if args.output not in (None, "-") else None
    if source is not None and not source.exists():
        raise FileNotFoundError(f"--input: {source}: no such file")
    if target is not None:
        same = target.exists() and source is not None and os.path.samefile(target, source)
        if same or (source is not None and target.resolve() == source.resolve()):
            raise ValueError(f"--output: {target} is the input file; write the translations to another file")
        if target.is_dir():
            raise ValueError(f"--output: {target} is a folder; give a file name")
        if not target.resolve().parent.is_dir():
            raise FileNotFoundError(f"--output: {target.parent} is not an existing folder")
        run_dir = run_dir_of(args.run).resolve()
        if target.resolve().is_relative_to(run_dir):
            raise ValueError(f"--output: {target} is inside the run {args.run}; reading a run never writes into it")
    return source, target


def _check_language_code(flag: str, code: str | None) -> None:
    from switchformer.data.formatting import is_language_code

    if code is not None and not is_language_code(code):
        raise ValueError(f"{flag}: {code!r} is not a language code (letters, digits, '-' or '_')")


def decoding_summary(settings: dict) -> str:
    how = "greedy" if settings["num_beams"] == 1 else f"beam search ({settings['num_beams']} beams"
    if settings["num_beams"] > 1:
        how += f", length penalty {settings['length_penalty']:g})"
    if settings.get("no_repeat_ngram_size"):
        how += f", no repeated {settings['no_repeat_ngram_size']}-gram"
    return f"{how}, at most {settings['max_new_tokens']} new tokens"


def run(args) -> int:
    from tqdm.auto import tqdm

    from switchformer.data.files import read_file_lines, read_stream_lines
    from switchformer.inference.routing import routing_description
    from switchformer.inference.translation import translate
    from switchformer.runtime import resolve_device

    source, target = _check_paths(args)
    _check_language_code("--source-lang", args.source_lang)
    _check_language_code("--target-lang", args.target_lang)
    device = resolve_device(args.device)
    # a file is read whole first: a bad byte is named before the model loads
    lines = read_file_lines(source, "--input") if source is not None else None
    model, tokenizer, config, settings = _checked_run(args)
    model.to(device)
    if lines is None:
        lines = read_stream_lines(sys.stdin)
    print(
        f"translate: {decoding_summary(settings)}, batches of {args.batch_size}; "
        f"routing: {routing_description(model, args.routing)}",
        file=sys.stderr,
    )
    total = len(lines) if isinstance(lines, list) else None
    bar = tqdm(total=total, unit="sent", desc="translating", disable=args.no_progress, dynamic_ncols=True,
               file=sys.stderr)  # fmt: skip
    start, cut = time.perf_counter(), []
    try:
        hypotheses = translate(
            model, tokenizer, config, lines, source_lang=args.source_lang, target_lang=args.target_lang,
            batch_size=args.batch_size, routing=args.routing, **settings, buffer_size=args.buffer_size,
            progress=bar.update, truncated=cut,
        )  # fmt: skip
        written = _write_lines(hypotheses, target)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    rate = f", {written / seconds:.1f} sentences/s" if seconds > 0 and written else ""
    where = f" -> {target}" if target is not None else ""
    print(f"translated {written} lines in {seconds:.1f} s{rate}{where}", file=sys.stderr)
    report_expert_cache(model)
    if sum(cut):
        print(
            f"translate: {sum(cut)} of {written} sources were longer than the run's seq_len - 1 = {config.seq_len - 1} "
            "tokens and were cut to it, as training cut its rows",
            file=sys.stderr,
        )
    return 0


def _checked_run(args):
    """(model, tokenizer, config, decoding settings) of the run, every setting checked against it."""
    from switchformer.data.formatting import prefix_fields
    from switchformer.inference.translation import check_languages, check_settings, decoding_settings, require_seq2seq
    from switchformer.train.run import load_run

    model, tokenizer, config = load_run(args.run, **inference_options(args, args.device))
    require_seq2seq(config, "translate")
    settings = decoding_settings(
        config, args.num_beams, args.length_penalty, args.max_new_tokens, args.no_repeat_ngram_size
    )
    check_settings(settings, args.batch_size, args.buffer_size)
    check_languages(config, args.source_lang, args.target_lang)  # a language the run does not know is named
    named = prefix_fields(config.source_prefix)
    for side, code in (("source", args.source_lang), ("target", args.target_lang)):
        if code is not None and not {f"{side}_lang", f"{side}_language"} & named:
            log.warning("--%s-lang: the run's source_prefix %r does not name the %s language; ignored",
                        side, config.source_prefix, side)  # fmt: skip
    return model, tokenizer, config, settings


def _write_lines(hypotheses, target: Path | None) -> int:
    """Each translation as one line of ``target`` (standard output for None), written as produced;
    returns how many. ``target`` is opened at the first translation, not before: an input that fails
    before any line is translated (a bad byte on standard input) leaves an existing file as it was."""
    out, written = None, 0
    try:
        for hypothesis in hypotheses:
            if out is None:
                out = open(target, "w", encoding="utf-8", newline="\n") if target is not None else sys.stdout  # noqa: SIM115
            try:
                out.write(hypothesis + "\n")
                out.flush()
            except OSError as err:  # a full disk, a closed pipe's cousins: name what could not be written
                if target is None:
                    raise
                failed, out = out, None
                with contextlib.suppress(OSError):  # closing flushes the same unwritable bytes again
                    failed.close()
                raise OSError(f"--output: {target}: cannot write ({err.strerror or err})") from None
            written += 1
        if out is None and target is not None:  # an empty input gives an empty output file
            target.write_text("", encoding="utf-8")
    finally:
        if target is not None and out is not None:
            out.close()
    return written
