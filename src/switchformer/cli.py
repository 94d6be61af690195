"""The ``switchformer`` command: train | eval | generate | translate | compare | convert | info | report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

EPILOGS = {
    "train": """examples:
  switchformer train                                   # tiny preset on the embedded corpus (a few minutes)
  switchformer train --preset tiny --max-steps 200 --run-name quick
  switchformer train --data notes/ --set vocab_size=8000 --set num_experts=16
  switchformer train --config my.toml --model t5       # T5 span corruption
  switchformer train --resume runs/quick               # continue exactly where it stopped
  switchformer train --model t5 --set objective=seq2seq --data train.de.gz train.en.gz \
      --source-lang de --target-lang en --valid val.de.gz val.en.gz   # translation pairs, your dev set
  torchrun --nproc_per_node 4 -m switchformer train --expert-parallel 2   # 2-way experts x 2-way data""",
    "eval": """examples:
  switchformer eval runs/quick
  switchformer eval runs/quick --routing dropless   # no token dropped
  switchformer eval runs/quick --data test.txt --json   # every document of test.txt; JSON for machines
  switchformer eval runs/de-en --data test.jsonl --metric bleu chrf   # translate the sources, score with sacrebleu
  switchformer eval runs/de-en --metric bleu --num-beams 4 --json     # the validation split, beam search""",
    "generate": """examples:
  switchformer generate runs/quick --prompt "The object"
  echo "Return the" | switchformer generate runs/quick --temperature 0.7 --top-p 0.9
  switchformer generate runs/de-en --prompt "Ein Hund rennt."   # seq2seq run: its translation, greedy""",
    "translate": """examples:
  switchformer translate runs/de-en --input test.de --output hyp.en
  switchformer translate runs/de-en --num-beams 4 --length-penalty 0.6 < test.de > hyp.en
  switchformer translate runs/multi --source-lang fr --input test.fr --output hyp.en   # multilingual run
  sacrebleu test.en < hyp.en          # or: switchformer eval runs/de-en --data test.jsonl --metric bleu""",
    "serve": """examples:
  switchformer serve runs/chat                      # http://127.0.0.1:8000/ : the chat page; the OpenAI API under /v1
  switchformer serve runs/de-en --port 8080         # a translation run: /v1/completions translates the prompt
  switchformer serve path/to/hf-switch-dir --api-key secret --max-batch-size 32
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'""",
    "upcycle": """examples:
  switchformer upcycle runs/dense runs/upcycled --num-experts 8   # top-2 every other layer: the dense function
  switchformer train --init-from runs/upcycled --run-name up --max-steps 500 --set lr=1e-3 --set optimizer=adamw
  switchformer upcycle path/to/t5-small-dir t5-moe --num-experts 16 --sparse-step 2 --expert-noise 0.01""",
    "distill": """examples:
  switchformer distill runs/switch runs/student --max-steps 800               # its dense twin, alpha 0.75
  switchformer distill runs/switch runs/small --max-steps 800 --set d_model=128 --temperature 2""",
    "compare": """examples:
  switchformer compare                    # Switch vs its FLOP-matched dense twin, compare-long preset (about an hour)
  switchformer compare --preset compare   # the quick check (about 15 minutes; within seed noise)
  switchformer compare --preset compare --max-steps 200 --set num_experts=8
  switchformer compare --seeds 3          # three seeds: is the gap larger than the spread?
  switchformer compare --preset compare-gpu --device cuda   # d_model 512, 8 layers, 49M tokens each (one GPU)""",
    "convert": """examples:
  switchformer convert path/to/hf-switch-dir native-run/      # Hugging Face -> switchformer
  switchformer convert runs/t5-run hf-export/                 # switchformer (T5) -> Hugging Face""",
    "info": """examples:
  switchformer info runs/quick
  switchformer info --preset compare
  switchformer info --preset compare --world-size 8 --expert-parallel 4   # memory per rank
  switchformer info --d-model 768 --d-ff 3072 --num-experts 128       # one Switch layer""",
    "report": """examples:
  switchformer report runs/quick --out quick-plots   # loss, expert load, dropped fraction
  switchformer report runs/multi --by-language       # which experts each source language uses""",
}


# ----------------------------------------------------------------------------- helpers

# `switchformer compare` runs, by default, the regime where the paper's effect shows on a laptop
# (README, "A small model trained long"); the 800-step `compare` preset is the quick check.
COMPARE_PRESET = "compare-long"
TRAIN_PRESET = "tiny"
PRESET_NAMES = ("tiny", "test", "compare", "compare-long", "compare-gpu", "mt-small")


def _add_config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    names = ", ".join(f"{name} (default)" if name == default_preset else name for name in PRESET_NAMES)
    p.add_argument("--preset", default=None, help=names)
    p.add_argument("--config", help="a .toml, .yaml or .json file of settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    p.add_argument("--model", choices=["lm", "t5"], help="model family")
    p.add_argument(
        "--data",
        nargs="+",
        help="text files or folders, .jsonl, .arrow/.parquet; seq2seq pairs also .tsv or line-aligned text files "
        "(train.de train.en); .gz read as gzip (default: the embedded corpus)",
    )
    p.add_argument(
        "--valid",
        nargs="+",
        metavar="FILE",
        help="validation files, in --data's formats and pairing rules (default: the first validation_fraction of "
        "--data is held out)",
    )
    p.add_argument(
        "--source-lang",
        metavar="CODE[,CODE...]",
        help="seq2seq: the source language(s) of line-aligned files named by language (train.de); several make "
        "a multilingual set (default: every language but the target)",
    )
    p.add_argument("--target-lang", metavar="CODE", help="seq2seq: the target language (train.en pairs with train.de)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--out-dir", help="parent folder of runs (default: runs)")
    p.add_argument("--run-name")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config_from_args(args, default_preset: str):
    from switchformer.train.config import FLAG_NAMES, build_config, settings_given

    overrides = {
        "model": args.model,
        "data": args.data,
        "max_steps": args.max_steps,
        "out_dir": args.out_dir,
        "run_name": args.run_name,
        "expert_parallel": getattr(args, "expert_parallel", None),
        "init_from": getattr(args, "init_from", None),
        "valid_data": getattr(args, "valid", None),
        "source_lang": getattr(args, "source_lang", None),
        "target_lang": getattr(args, "target_lang", None),
    }
    given, sources = settings_given(args.config, args.set)
    init_from = overrides["init_from"] or given.get("init_from")
    if init_from:  # the source decides the model family; a contradicting one is refused by name
        from switchformer.train.init_from import source_family

        family = source_family(init_from)
        asked = args.model if args.model is not None else given.get("model")
        if asked is not None and asked != family:
            where = FLAG_NAMES["model"] if args.model is not None else sources["model"]
            raise ValueError(f"model: --init-from {init_from} holds a {family} model, {where} asks for {asked!r}; "
                             "leave it out (the family comes from the pretrained model)")  # fmt: skip
        overrides["model"] = family
    return build_config(args.preset or default_preset, args.config, overrides, args.set, FLAG_NAMES)


def _run_dir(config) -> Path:
    name = config.run_name or f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.out_dir) / name


def load_run(source: str | Path, need_tokenizer: bool = True):
    """(model, tokenizer, train config) of a run or checkpoint; see :mod:`switchformer.train.run`."""
    from switchformer.train.run import load_run as _load_run

    return _load_run(source, need_tokenizer)


def _print_summary(summary: dict, config) -> None:
    print(
        f"\nvalidation loss {summary['eval_loss']:.4f}, perplexity {summary['perplexity']:.2f} "
        f"after {summary['step']} steps"
    )
    params = summary["parameters"]
    print(
        f"parameters: {params['total']:,} total, {params['active']:,} active per token, "
        f"{params['flops_per_token']:,} FLOPs per token"
    )
    if summary["routing"]:
        print(f"routing (validation, {summary['routing_used']}):")
        for name, r in summary["routing"].items():
            print(
                f"  {name}: max/mean expert load {r['max_load_over_mean']:.2f}, dropped {r['dropped_fraction']:.1%}, "
                f"router entropy {r['router_entropy']:.2f} nats"
            )
    if summary["sample"] is not None:  # sample_tokens=0: none
        print(f"sample: {summary['sample']!r}")
    print(f"run directory: {summary['run_dir']}")


# ----------------------------------------------------------------------------- commands


def _resume_settings(args):
    """The resumed run's config: its own, with the changes the flags ask for (validated; only
    bookkeeping and max_steps may change, see ``RESUMABLE_FIELDS``)."""
    from switchformer.train.config import FLAG_NAMES, resolve_paths, resume_config, settings_given
    from switchformer.train.run import read_run_config

    flags_for_new_runs = (
        ("--preset", args.preset),
        ("--out-dir", args.out_dir),
        ("--run-name", args.run_name),
        ("--init-from", args.init_from),
    )
    for flag, value in flags_for_new_runs:
        if value is not None:
            raise ValueError(f"{flag}: not used with --resume (the run directory is given; its settings are kept)")
    if (Path(args.resume) / "state.json").exists():
        raise ValueError(
            f"--resume: {args.resume} is a checkpoint; --resume takes the run directory and continues from its "
            "latest checkpoint (to go back to this one, move the later checkpoints out of checkpoints/)"
        )
    run = read_run_config(args.resume)
    changes, sources = settings_given(args.config, args.set)
    flags = {"model": args.model, "data": args.data, "max_steps": args.max_steps}
    flags["expert_parallel"] = getattr(args, "expert_parallel", None)
    flags.update(valid_data=args.valid, source_lang=args.source_lang, target_lang=args.target_lang)
    for name, value in flags.items():
        if value is not None:
            changes[name], sources[name] = value, FLAG_NAMES[name]
    resolve_paths(changes)
    return resume_config(run.train_values, str(run.file), changes, sources), run


def _init_from_settings(args, config):
    """(config, model config, weights) of a new run started from ``config.init_from``; the size
    settings the user gave must agree with the pretrained model; the fine-tuning defaults fill in
    the training settings the user did not give (printed, on the main rank)."""
    from switchformer.train.config import FLAG_NAMES, settings_given
    from switchformer.train.init_from import (
        check_settings_fit,
        describe_fine_tuning,
        fine_tuning_config,
        load_pretrained,
    )

    given, sources = settings_given(args.config, args.set)
    if args.model is not None:
        given["model"], sources["model"] = args.model, FLAG_NAMES["model"]
    pretrained = load_pretrained(config.init_from, tokenizer=config.tokenizer if "tokenizer" in given else None)
    check_settings_fit(pretrained, given, sources)
    config, model_values, applied = fine_tuning_config(pretrained, config, given, sources)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in describe_fine_tuning(applied, model_values, pretrained):
            print(line, flush=True)
    return config, model_values, pretrained.state


def cmd_train(args) -> int:
    from switchformer.runs.state import check_resumable, claim_run
    from switchformer.train.trainer import Trainer

    model_values, init_state = None, None
    if args.resume:  # first: a run with no complete checkpoint, or in use, is named as such
        check_resumable(args.resume, probe_lock=os.environ.get("RANK", "0") == "0")
        config, run = _resume_settings(args)
        run_dir, model_values = run.run_dir, run.model_values
    else:
        config = _config_from_args(args, TRAIN_PRESET)
        if config.init_from:
            config, model_values, init_state = _init_from_settings(args, config)
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if distributed and not config.run_name:
            raise ValueError("--run-name: required under torchrun, so that every rank writes to the same run")
        run_dir = _run_dir(config)
    from switchformer.train.layout import check_start_layout

    check_start_layout(config, model_values)  # a layout that cannot work: refused before anything is written
    main_rank = int(os.environ.get("RANK", "0")) == 0
    # one writer per run directory (rank 0 locks it); under the lock, a fresh run over one holding a
    # checkpoint is refused (--resume it) and one over a run stopped before its first starts over
    lock = claim_run(run_dir, resume=bool(args.resume), main=main_rank)
    if main_rank:
        print(
            f"training {config.model} ("
            + (f"{config.num_experts} experts every {config.sparse_step} layers" if config.sparse_step else "dense")
            + f") for {config.max_steps} steps -> {run_dir}",
            flush=True,
        )
    try:
        trainer = Trainer(
            config,
            run_dir,
            resume=bool(args.resume),
            progress=not args.no_progress,
            device=args.device,
            model_config=model_values,
            init_state=init_state,
        )
        summary = trainer.train()
    finally:
        if lock is not None:
            lock.release()
    if main_rank:
        _print_summary(summary, config)
    return 0


def cmd_eval(args) -> int:
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
    )
    from switchformer.runs.files import to_json

    print(to_json(report, indent=2) if args.json else format_eval(report))
    return 0


def cmd_generate(args) -> int:
    from switchformer.inference.routing import routing_description
    from switchformer.inference.text import generate_text

    model, tokenizer, config = load_run(args.run)
    print(f"routing: {routing_description(model, args.routing)}", file=sys.stderr)
    from switchformer.data.files import read_stream_text
    from switchformer.data.formatting import lone_surrogate

    prompt = args.prompt if args.prompt is not None else read_stream_text(sys.stdin)

    if (position := lone_surrogate(prompt)) is not None:  # bytes that are not UTF-8 arrive as lone surrogates
        where = "--prompt" if args.prompt is not None else "standard input"
        raise ValueError(f"prompt: {where} is not valid UTF-8 (character {position})")
    if not prompt.strip() and args.prompt is None:
        raise ValueError("prompt: give --prompt or text on standard input")
    seq2seq = config.resolved_objective == "seq2seq"  # the prompt is a source: its translation alone is printed
    chat = config.resolved_objective == "chat"  # the prompt is a user message: the answer alone is printed
    answer_only = seq2seq or chat
    if chat and args.prompt is None:  # standard input's last newline is no part of the message
        prompt = prompt.removesuffix("\n").removesuffix("\r")
    if seq2seq and args.prompt is None:
        prompt = prompt.rstrip("\r\n")  # standard input's last newline is no part of the sentence
        if "\n" in prompt:
            raise ValueError(
                f"prompt: {prompt.count(chr(10)) + 1} lines on standard input; generate translates one source "
                "(switchformer translate translates a file line by line)"
            )
    if seq2seq and not prompt.strip():
        raise ValueError("prompt: empty; give the sentence to translate (--prompt or standard input)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
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
    )
    if not produced and not answer_only:
        sys.stdout.write(prompt)
    sys.stdout.write("\n")
    return 0


def cmd_translate(args) -> int:
    from switchformer.translate_command import run_translate

    return run_translate(args)


def cmd_serve(args) -> int:
    from switchformer.serve.command import run_serve

    return run_serve(args)


def cmd_upcycle(args) -> int:
    from switchformer.lifecycle.upcycle import run_upcycle

    return run_upcycle(args)


def cmd_distill(args) -> int:
    from switchformer.lifecycle.distill import run_distill

    return run_distill(args)


def cmd_compare(args) -> int:
    from switchformer.analysis.compare import format_seed_summary, format_table, run_compare, run_compare_seeds
    from switchformer.runs.files import write_text_atomic

    config = _config_from_args(args, COMPARE_PRESET)
    out_dir = Path(config.out_dir) / (config.run_name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.seeds == 1:
        result = run_compare(config, out_dir, progress=not args.no_progress, device=args.device)
        table = format_table(result)
        write_text_atomic(out_dir / "compare.md", table + "\n")
        print(table)
        print(f"plot: {result['plot']}")
        return 0
    results = run_compare_seeds(config, out_dir, args.seeds, progress=not args.no_progress, device=args.device)
    parts = [f"## seed {r['seed']}\n\n{format_table(r)}\n\nplot: {r['plot']}" for r in results]
    text = "\n\n".join([*parts, "## all seeds\n\n" + format_seed_summary(results)])
    write_text_atomic(out_dir / "compare.md", text + "\n")
    print(text)
    return 0


def cmd_convert(args) -> int:
    from switchformer.lifecycle.convert import convert

    print(f"wrote {convert(args.source, args.target)}")
    return 0


def cmd_info(args) -> int:
    import torch

    if args.source:
        model, _, train = load_run(args.source, need_tokenizer=False)
        title = f"{args.source}: {train.model}"
    elif args.preset:
        from switchformer.train.config import build_config
        from switchformer.train.run import build_model

        train = build_config(args.preset)
        with torch.device("meta"):
            model = build_model(train, train.vocab_size)
        title = f"preset {args.preset}: {train.model}"
    else:
        if args.world_size is not None or args.expert_parallel is not None or args.no_fsdp:
            raise ValueError("--world-size: memory per rank needs a model: give a run directory or --preset")
        return _layer_info(args)
    counts = model.num_parameters()
    config = model.config
    print(title)
    print(f"  d_model {config.d_model}, d_ff {config.d_ff}, heads {config.num_heads}, vocab {config.vocab_size}")
    layout = (
        config.sparse_layers()
        if hasattr(config, "sparse_step")
        else config.sparse_layers("encoder") + config.sparse_layers("decoder")
    )
    print("  layers: " + " ".join("S" if s else "d" for s in layout) + "   (S: Switch layer, d: dense FFN)")
    print(f"  experts per Switch layer: {config.num_experts}, top-{config.top_k}")
    print(f"  parameters: {counts['total']:,} total, {counts['active']:,} active per token")
    print(f"  forward FLOPs per token: {counts['flops_per_token']:,}")
    if args.no_fsdp and args.world_size is None:
        raise ValueError("--no-fsdp: memory per rank needs --world-size W")
    if args.world_size is not None or args.expert_parallel is not None:
        from switchformer.parallel.memory import memory_report

        world = 1 if args.world_size is None else args.world_size
        fsdp = getattr(train, "fsdp", True) and not args.no_fsdp and world > 1  # a run's own setting first
        optimizer = getattr(train, "optimizer", "adamw")
        expert_parallel = 1 if args.expert_parallel is None else args.expert_parallel
        for line in memory_report(model, world, expert_parallel, fsdp, optimizer):
            print(line)
    return 0


def _layer_info(args) -> int:
    import torch

    from switchformer import SwitchMoE
    from switchformer.moe.layer import num_active_expert_params

    with torch.device("meta"):  # shapes only: no memory for the weights
        layer = SwitchMoE(args.d_model, args.d_ff, args.num_experts, top_k=args.top_k, activation=args.activation)
    total = sum(p.numel() for p in layer.parameters())
    active = num_active_expert_params(layer)
    print(
        f"SwitchMoE: d_model {args.d_model}, d_ff {args.d_ff}, {args.num_experts} experts, top-{args.top_k}, "
        f"{args.activation}"
    )
    print(f"  parameters: {total:,} total, {active:,} active per token")
    print(f"  matmul FLOPs per token (forward): {2 * active:,}")
    return 0


def cmd_report(args) -> int:
    from switchformer.analysis.plots import plot_run

    run = Path(args.run)
    out = Path(args.out) if args.out else Path.cwd() / f"{run.resolve().name}-report"
    if out.resolve().is_relative_to(run.resolve()):
        raise ValueError(f"--out: {out} is inside the run {run}; reading a run never writes into it")
    paths = plot_run(run, out)
    if args.by_language:
        from switchformer.analysis.routing_report import routing_by_language_report

        paths += routing_by_language_report(run, out, data=args.data, device=args.device)
    elif args.data or args.device:
        raise ValueError("--data/--device: used only with --by-language (which loads the model)")
    for path in paths:
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (a flag's bad value, an unknown flag, a missing argument), as
    every other error of the command line, pointing to ``--help`` instead of printing the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="switchformer", description="Switch Transformers in PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text, func):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    p = command("train", "train a Switch model (default: the tiny preset on the embedded corpus)", cmd_train)
    _add_config_args(p, TRAIN_PRESET)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument(
        "--init-from",
        metavar="SOURCE",
        help="start a new run from pretrained weights: a Hugging Face T5/Switch directory, a run or a checkpoint "
        "(architecture and tokenizer come from SOURCE; optimizer and schedule start fresh)",
    )
    p.add_argument(
        "--expert-parallel",
        type=int,
        metavar="P",
        help="under torchrun: split each layer's experts over P ranks (batch size is per rank)",
    )

    p = command("eval", "validation loss, perplexity and routing statistics of a run", cmd_eval)
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument(
        "--data", nargs="+", help="evaluate on every document of these files (default: the run's validation split)"
    )
    p.add_argument("--batches", type=int, help="number of validation batches (default: the run's eval_batches)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (NaN as null)")
    p.add_argument("--device")
    p.add_argument(
        "--routing",
        choices=["eval", "dropless"],
        default="eval",
        help="eval: the run's eval capacity factor, tokens over it are dropped (default; what training "
        "reported, and how generate routes by default); dropless: no token dropped",
    )
    p.add_argument(
        "--metric",
        nargs="+",
        choices=["bleu", "chrf"],
        help="seq2seq runs: translate the sources and score corpus BLEU/chrF against the targets with sacrebleu "
        "(pip install 'switchformer[metrics]'); per source language too when there are several. With --metric "
        "every pair is scored unless --batches is given",
    )
    p.add_argument("--num-beams", type=int, help="with --metric: beams (1: greedy; default: the run's num_beams)")
    p.add_argument("--length-penalty", type=float, help="with --metric: beam length penalty (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, help="with --metric: tokens per translation (default: seq_len)")
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        help="with --metric: no N-gram of tokens twice in a translation (0: off; default: the run's)",
    )
    p.add_argument(
        "--source-lang", metavar="CODE", help="with --metric: the language of sources whose data does not say it"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar while translating")

    p = command("generate", "generate text from a trained run, streaming tokens", cmd_generate)
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("--prompt", help="prompt text (default: standard input)")
    # defaults depend on the run: sampling (temperature 0.8, top-p 0.95, repetition penalty 1.1, 64 tokens)
    # for language models and span corruption; for seq2seq, the run's decoding (greedy or its num_beams, no
    # repetition penalty, up to seq_len tokens), sampling only when a sampling setting is given
    p.add_argument("--max-new-tokens", type=int, help="default: 64; seq2seq runs: the run's seq_len")
    p.add_argument("--temperature", type=float, help="default: 0.8 (seq2seq: a value samples, else greedy)")
    p.add_argument("--top-k", type=int, help="default: 0 (no top-k filter)")
    p.add_argument("--top-p", type=float, help="default: 0.95 (seq2seq: 1.0)")
    p.add_argument("--repetition-penalty", type=float, help="default: 1.1 (seq2seq: 1.0, none)")
    p.add_argument("--greedy", action="store_true", help="no sampling (the default on seq2seq runs)")
    p.add_argument("--num-beams", type=int, help="beam search (encoder-decoder; default: 1, seq2seq: the run's)")
    p.add_argument("--length-penalty", type=float, help="beam search length penalty (default: the run's)")
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        help="no N-gram of tokens twice in the output (0: off; default: the run's no_repeat_ngram_size)",
    )
    p.add_argument("--source-lang", metavar="CODE", help="seq2seq: the source language, when the prefix names it")
    p.add_argument("--target-lang", metavar="CODE", help="seq2seq: the target language, when the prefix names it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--routing",
        choices=["eval", "dropless"],
        default="eval",
        help="eval: the run's own eval routing, as `eval` and the model's forward (default); dropless: no "
        "token dropped (printed on standard error)",
    )

    p = command(
        "translate", "translate a file line by line with a seq2seq run (batched; greedy or beams)", cmd_translate
    )
    p.add_argument("run", help="run directory or checkpoint (trained with objective=seq2seq)")
    p.add_argument("--input", "-i", help="UTF-8 text, one source per line (default: standard input)")
    p.add_argument(
        "--output",
        "-o",
        help="one translation per input line, written as produced (default: standard output); a stopped run "
        "leaves the first lines' translations, whole lines only",
    )
    p.add_argument("--batch-size", type=int, default=32, help="sentences decoded together (default: 32)")
    p.add_argument(
        "--buffer-size",
        type=int,
        default=1024,
        help="sentences read, sorted by length and translated before their output is written (default: 1024)",
    )
    p.add_argument("--num-beams", type=int, help="1: greedy; more: beam search (default: the run's num_beams)")
    p.add_argument("--length-penalty", type=float, help="beam search length penalty (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per translation at most (default: the run's seq_len)")
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        help="no N-gram of tokens twice in a translation, the cure for loops such as 'a man holding a man "
        "holding ...' (0: off; default: the run's)",
    )
    p.add_argument(
        "--source-lang", metavar="CODE", help="the language of every line, when the run's source_prefix names it"
    )
    p.add_argument("--target-lang", metavar="CODE", help="the target language, when the run's source_prefix names it")
    p.add_argument(
        "--routing",
        choices=["eval", "dropless"],
        default="eval",
        help="eval: the run's own eval routing (default); dropless: no token dropped, so batching never changes "
        "a translation",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command(
        "serve", "serve a model over an OpenAI-compatible HTTP API with continuous batching; chat page", cmd_serve
    )
    p.add_argument("source", help="a run, a checkpoint or a Hugging Face T5/Switch directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: $SWITCHFORMER_API_KEY, else none)"
    )
    p.add_argument("--served-model-name", help="the model id of the API (default: the run's folder name)")
    p.add_argument(
        "--cors-origin", action="append", metavar="ORIGIN",
        help="a browser origin (https://app.example.com; '*' for any) whose pages may call the API (CORS); "
        "repeat for several (default: none)",
    )  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default: 16)")
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting beyond those; more get 429 (default: 256)"
    )
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt or source (default: what the model takes)")
    p.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default: the model's)")
    p.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request is ended with 408 (default: 600)"
    )
    p.add_argument(
        "--shutdown-timeout", type=float, default=10.0,
        help="on Ctrl-C or SIGTERM, seconds running requests get to finish (default: 10)",
    )  # fmt: skip
    p.add_argument(
        "--routing", choices=["eval", "dropless"], default="eval",
        help="how prompts are routed: the model's eval routing (default) or dropless; decoding steps never drop",
    )  # fmt: skip
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="(default: float32)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    p = command("upcycle", "turn a dense model into a Switch model whose experts copy its FFNs", cmd_upcycle)
    p.add_argument("source", help="a dense run or checkpoint (sparse_step=0), or a dense Hugging Face T5 directory")
    p.add_argument("out", help="the new run directory (new or empty); train --init-from OUT trains it further")
    p.add_argument("--num-experts", type=int, required=True, help="experts per Switch layer (>= 2)")
    p.add_argument("--sparse-step", type=int, default=2, help="a Switch layer every k layers (default: 2)")
    p.add_argument(
        "--top-k", type=int, default=2, choices=[1, 2],
        help="2 (default): gates renormalised over the two chosen experts, so the model starts as the dense one; "
        "1: Switch's routing, which scales each FFN by its router probability",
    )  # fmt: skip
    p.add_argument(
        "--expert-noise", type=float, default=0.0,
        help="relative Gaussian noise on each expert's copy, to break their symmetry (default: 0)",
    )  # fmt: skip
    p.add_argument("--capacity-factor", type=float, help="(default: dropless, so that no token is dropped)")
    p.add_argument("--seed", type=int, default=0, help="the routers' initialisation and the noise (default: 0)")

    p = command("distill", "distil a Switch run into a dense student (teacher probabilities and labels)", cmd_distill)
    p.add_argument("teacher", help="a Switch run or checkpoint: its data, tokenizer and settings are the student's")
    p.add_argument("out", help="the student's run directory")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--alpha", type=float, default=0.75, help="the teacher's weight in the loss (default: 0.75)")
    p.add_argument("--temperature", type=float, default=1.0, help="softens both distributions (default: 1)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a student setting (lr, batch_size, ...; d_model, num_layers, d_ff, num_heads for a smaller student; "
        "default: the teacher's FLOP-matched dense twin)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, help="(default: the teacher's)")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true")

    p = command("compare", "train a Switch model and its FLOP-matched dense twin; table and plot", cmd_compare)
    _add_config_args(p, COMPARE_PRESET)
    p.add_argument(
        "--seeds", type=int, default=1, help="repeat the pair with seeds seed, seed+1, ... and summarise the spread"
    )

    p = command("convert", "convert between Hugging Face and switchformer formats", cmd_convert)
    p.add_argument("source")
    p.add_argument("target")

    p = command("info", "layout, parameters, active parameters and FLOPs per token", cmd_info)
    p.add_argument("source", nargs="?", help="run directory or checkpoint")
    p.add_argument("--preset")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-ff", type=int, default=3072)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--activation", default="relu")
    p.add_argument(
        "--world-size",
        type=int,
        metavar="W",
        help="with a run or --preset: memory per rank (parameters, gradients, optimizer state) over W processes",
    )
    p.add_argument("--expert-parallel", type=int, metavar="P", help="with --world-size: experts split over P ranks")
    p.add_argument("--no-fsdp", action="store_true", help="with --world-size: weights replicated (fsdp=false)")

    p = command("report", "PNG plots of a run: losses, expert load, dropped tokens", cmd_report)
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="folder for the plots (default: ./<run name>-report; never the run itself)")
    p.add_argument(
        "--by-language",
        action="store_true",
        help="also the share of each source language's tokens per expert and Switch layer (a multilingual "
        "seq2seq run; loads the model): routing_by_language.png and .json, and a table",
    )
    p.add_argument("--data", nargs="+", help="with --by-language: these pairs instead of the validation split")
    p.add_argument("--device", help="with --by-language: cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("switchformer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours
        sys.stderr.close()
        return 0
    except Exception as err:  # one clear line; the traceback with --debug
        if args.debug:
            raise
        from switchformer.parallel.groups import failure_message
        from switchformer.train.trainer import TrainingError

        known = (ValueError, FileNotFoundError, FileExistsError, TrainingError, OSError)
        prefix = "" if isinstance(err, known) else f"{type(err).__name__}: "
        message = failure_message(err) or f"{prefix}{err}"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not message.startswith("rank "):
            message = f"rank {os.environ.get('RANK', '?')}: {message}"  # which of the processes says it
        print(f"switchformer: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
