"""``switchformer generate``: generate text from a trained run, streaming tokens."""

from __future__ import annotations

import argparse
import sys

from switchformer.commands.common import add_inference_arguments, inference_options, report_expert_cache

# The library is imported inside run(), on use: the parser is built from every command module, and
# `switchformer --help` should not load the library (models, tokenizers, plotting).

NAME = "generate"
HELP = "generate text from a trained run, streaming tokens"
EPILOG = """examples:
  switchformer generate runs/quick --prompt "The object"
  echo "Return the" | switchformer generate runs/quick --temperature 0.7 --top-p 0.9
  switchformer generate runs/de-en --prompt "Ein Hund rennt."   # seq2seq run: its translation, greedy
  switchformer generate runs/quick --prompt "The" --dtype int8 --max-memory 2GiB   # int8 experts, offloaded
  switchformer generate runs/quick --prompt "The" --cache static --compile          # a compiled static step"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory, checkpoint or Hugging Face T5/Switch directory")
    parser.add_argument("--prompt", help="prompt text (default: standard input)")
    # defaults depend on the run: sampling (temperature 0.8, top-p 0.95, repetition penalty 1.1, 64 tokens)
    # for language models and span corruption; for seq2seq, the run's decoding (greedy or its num_beams, no
    # repetition penalty, up to seq_len tokens), sampling only when a sampling setting is given
    parser.add_argument("--max-new-tokens", type=int, help="default: 64; seq2seq runs: the run's seq_len")
    parser.add_argument("--temperature", type=float, help="default: 0.8 (seq2seq: a value samples, else greedy)")
    parser.add_argument("--top-k", type=int, help="default: 0 (no top-k filter)")
    parser.add_argument("--top-p", type=float, help="default: 0.95 (seq2seq: 1.0)")
    parser.add_argument("--repetition-penalty", type=float, help="default: 1.1 (seq2seq: 1.0, none)")
    parser.add_argument("--greedy", action="store_true", help="no sampling (the default on seq2seq runs)")
    parser.add_argument("--num-beams", type=int, help="beam search (encoder-decoder; default: 1, seq2seq: the run's)")
    parser.add_argument("--length-penalty", type=float, help="beam search length penalty (default: the run's)")
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        help="no N-gram of tokens twice in the output (0: off; default: the run's no_repeat_ngram_size)",
    )
    parser.add_argument("--source-lang", metavar="CODE", help="seq2seq: the source language, when the prefix names it")
    parser.add_argument("--target-lang", metavar="CODE", help="seq2seq: the target language, when the prefix names it")
    parser.add_argument(
        "--seed", type=int, default=0, help="the sampling's random seed (default: 0, so a sampled output repeats)"
    )
    add_inference_arguments(parser)
    parser.add_argument(
        "--cache",
        choices=["dynamic", "static"],
        default="dynamic",
        help="the decoding cache: dynamic (grows with each token; default) or static (a fixed-size cache and a "
        "decoding step of fixed shapes that reads nothing back to the host: the same tokens)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --cache static: compile the decoding step whole (torch.compile; CUDA graphs on a GPU); the first "
        "tokens wait for the compilation",
    )
    parser.add_argument(
        "--routing",
        choices=["eval", "dropless"],
        default="eval",
        help="eval: the run's own eval routing, as `eval` and the model's forward (default); dropless: no "
        "token dropped (printed on standard error)",
    )


def run(args) -> int:
    from switchformer.inference.routing import routing_description
    from switchformer.inference.sampling import SamplingConfig
    from switchformer.inference.text import generate_text
    from switchformer.lifecycle.sources import load_source

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    given.update(repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
    SamplingConfig(**{k: v for k, v in given.items() if v is not None})  # bad values refused before loading
    if args.compile and args.cache != "static":
        raise ValueError("--compile: only the static decoding step compiles whole; add --cache static")
    if args.num_beams is not None and args.num_beams < 1:
        raise ValueError(f"--num-beams: must be >= 1, got {args.num_beams}")
    if not -(2**63) <= args.seed < 2**64:  # what a torch.Generator takes
        raise ValueError(f"--seed: must be in [-2**63, 2**64), got {args.seed}")
    text = read_text(args)  # before loading: a bad or empty input is said at once
    model, tokenizer, config = load_source(args.run, **inference_options(args))
    if args.cache == "static":
        from switchformer.inference.static import check_static_model

        check_static_model(model)  # before any output
    print(f"routing: {routing_description(model, args.routing)}", file=sys.stderr)
    seq2seq = config.resolved_objective == "seq2seq"  # the prompt is a source: its translation alone is printed
    chat = config.resolved_objective == "chat"  # the prompt is a user message: the answer alone is printed
    answer_only = seq2seq or chat
    prompt = prompt_of(text, args.prompt is None, seq2seq, chat)
    produced: list[int] = []
    printed = ""

    def stream(token):  # print each new piece of text as soon as its token is chosen
        nonlocal printed
        if not produced and not answer_only:  # the prompt once generation has really started (bad settings fail first)
            sys.stdout.write(prompt)
        produced.append(int(token[0]))
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    generate_text(
        model,
        tokenizer,
        prompt,
        args.max_new_tokens,
        seed=args.seed,
        do_sample=False if args.greedy else None,  # None: the run's objective chooses
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        routing=args.routing,
        streamer=stream,
        config=config,
        source_lang=args.source_lang,
        target_lang=args.target_lang,
        cache_implementation=args.cache,
        compile=args.compile,
    )
    if not produced and not answer_only:
        sys.stdout.write(prompt)
    sys.stdout.write("\n")
    report_expert_cache(model)
    return 0


def read_text(args) -> str:
    """The text of ``--prompt`` or standard input, checked: valid UTF-8, and standard input not empty."""
    from switchformer.data.files import read_stream_text
    from switchformer.data.formatting import lone_surrogate

    text = args.prompt if args.prompt is not None else read_stream_text(sys.stdin)
    if (position := lone_surrogate(text)) is not None:  # bytes that are not UTF-8 arrive as lone surrogates
        where = "--prompt" if args.prompt is not None else "standard input"
        raise ValueError(f"prompt: {where} is not valid UTF-8 (character {position})")
    if not text.strip() and args.prompt is None:
        raise ValueError("prompt: give --prompt or text on standard input")
    return text


def prompt_of(text: str, from_stdin: bool, seq2seq: bool, chat: bool) -> str:
    """The prompt the run's objective takes: a seq2seq run's source is one line (standard input's
    last newline dropped) and not empty; a chat message loses standard input's last newline."""
    prompt = text
    if chat and from_stdin:  # standard input's last newline is no part of the message
        prompt = prompt.removesuffix("\n").removesuffix("\r")
    if seq2seq and from_stdin:
        prompt = prompt.rstrip("\r\n")  # standard input's last newline is no part of the sentence
        if "\n" in prompt:
            raise ValueError(
                f"prompt: {prompt.count(chr(10)) + 1} lines on standard input; generate translates one source "
                "(switchformer translate translates a file line by line)"
            )
    if seq2seq and not prompt.strip():
        raise ValueError("prompt: empty; give the sentence to translate (--prompt or standard input)")
    return prompt
