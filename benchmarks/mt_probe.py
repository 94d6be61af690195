"""Short recipe probes for translation: the first N steps of a preset's full schedule (the learning
rate follows the preset's `max_steps`, not N), with the validation loss at fixed steps as the signal.
Each probe is one `--set` list; probes run one after another in this process on the same pairs and
tokenizer, so their losses compare. Run it on a tuning split (`mt_tuning_split.py`), never on the
split that is reported.

    python benchmarks/mt_tuning_split.py ../shared/data/multi30k /tmp/mt
    OMP_WAIT_POLICY=PASSIVE python benchmarks/mt_probe.py --data /tmp/mt/rest.de.gz /tmp/mt/rest.en.gz \\
        --valid /tmp/mt/tune.de.gz /tmp/mt/tune.en.gz --steps 500 --at 250 500 \\
        --probe "" --probe "init_scale=1.0" --probe "lr=1.5e-3,warmup_steps=500" --out probes.jsonl

A probe's settings are comma-separated `key=value` pairs (as `train --set`); "" is the preset itself.
Each probe appends one JSON line to `--out`: its settings, the loss at each `--at` step, seconds a step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def run_probe(preset: str, sets: list[str], data, valid, steps: int, at: list[int], tokenizer: Path | None, work: Path):
    from switchformer.train.sources import build_config
    from switchformer.train.trainer import Trainer

    overrides = dict(data=list(data), valid_data=list(valid), eval_every=10**6, checkpoint_every=10**6)
    config = build_config(preset, overrides=overrides, sets=sets)
    run_dir = work / f"probe-{time.time_ns()}"
    run_dir.mkdir()
    if tokenizer is not None:
        shutil.copy(tokenizer, run_dir / "tokenizer.json")
    trainer = Trainer(config, run_dir, progress=False)
    losses, seconds = {}, 0.0
    try:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            trainer.train_step()
            seconds += time.perf_counter() - start
            if step in at:
                losses[step] = round(trainer.evaluate().loss, 4)
                print(f"  {','.join(sets) or '(preset)'}: step {step} validation loss {losses[step]}", flush=True)
    finally:
        trainer.close()
    return {"losses": losses, "seconds_per_step": round(seconds / steps, 3)}, run_dir / "tokenizer.json"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mt-small")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--valid", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--at", type=int, nargs="+", default=None, help="steps at which to evaluate")
    parser.add_argument("--probe", action="append", default=None, help="comma-separated key=value settings")
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer.json for every probe; when missing, the first probe trains it there"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    at = sorted(set(args.at or [args.steps]) | {args.steps})
    tokenizer = args.tokenizer if args.tokenizer and args.tokenizer.exists() else None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for probe in args.probe or [""]:
            sets = [s.strip() for s in probe.split(",") if s.strip()]
            result, trained = run_probe(args.preset, sets, args.data, args.valid, args.steps, at, tokenizer, Path(tmp))
            if tokenizer is None and not any(s.split("=")[0] in ("vocab_size", "tokenizer_kind") for s in sets):
                tokenizer = args.tokenizer or Path(tmp) / "shared-tokenizer.json"
                shutil.copy(trained, tokenizer)
            row = {"preset": args.preset, "settings": sets, "steps": args.steps, **result}
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return results


if __name__ == "__main__":
    main()
