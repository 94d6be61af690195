"""bucket_by_length against the plain shuffle: seconds per training step and padded tokens per step
of the `mt-small` preset on Multi30k de->en, in one process, interleaved rounds of 10 steps, medians
(the first round warms up).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bucketing.py            # ../shared/data/multi30k
    python benchmarks/bucketing.py --data DIR --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent.parent
    parser.add_argument("--data", default=str(here.parent / "shared" / "data" / "multi30k"))
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    from switchformer.train.data import prepare_data
    from switchformer.train.sources import build_config
    from switchformer.train.trainer import Trainer

    d = Path(args.data)
    base = build_config(
        "mt-small",
        overrides=dict(
            data=[str(d / "train.de.gz"), str(d / "train.en.gz")],
            valid_data=[str(d / "val.de.gz"), str(d / "val.en.gz")],
            eval_every=10**6,
            checkpoint_every=10**6,
            max_steps=10**6,
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "plain").mkdir()
        (root / "bucketed").mkdir()
        data = prepare_data(base, root / "plain")
        (root / "bucketed" / "tokenizer.json").write_bytes((root / "plain" / "tokenizer.json").read_bytes())
        trainers = {
            "plain": Trainer(base, root / "plain", progress=False, data=data),
            "bucketed": Trainer(replace(base, bucket_by_length=True), root / "bucketed", progress=False, data=data),
        }
        seconds = {name: [] for name in trainers}
        tokens = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                for _ in range(10):
                    tokens[name].append(trainer.train_step()["tokens"])
                seconds[name].append((time.perf_counter() - start) / 10)
        for trainer in trainers.values():
            trainer.close()
    print("| batching | s/step | padded tokens/step |")
    print("|---|---:|---:|")
    for name in trainers:
        print(f"| {name} | {statistics.median(seconds[name][1:]):.3f} | {statistics.mean(tokens[name]):,.0f} |")


if __name__ == "__main__":
    main()
