"""The sparse life cycle measured on the embedded corpus (docs/lifecycle.md):

1. Upcycling (Komatsuzaki et al. 2022): a dense run (the preset's FLOP-matched dense twin,
   ``--base-steps``) is continued for ``--continue-steps`` more steps (a) as the dense model and
   (b) upcycled into a Switch model (``--num-experts``, top-2, every other layer), with the same
   data, tokens, optimizer and schedule, once per seed; validation loss against steps and wall
   time, in a plot.
2. Distillation (Switch paper, section 5.2): a Switch teacher (``--base-steps``) is distilled into
   its dense twin for ``--distill-steps`` (alpha 0.75, the student initialised from the teacher's
   non-expert weights), against the same student trained without the teacher (alpha 0) and the dense
   baseline trained from scratch as long as the teacher. Reported: the share of the teacher's loss
   gain over the dense baseline that each student keeps.

Every run goes through the ``switchformer`` command line, one after another (never two at once).

    python benchmarks/lifecycle.py                        # tiny preset, seeds 0 and 1 (about 40 minutes)
    python benchmarks/lifecycle.py --base-steps 60 --continue-steps 30 --distill-steps 30 --preset test  # a check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "switchformer", *args]
    print("$ switchformer " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def curve(run: Path) -> list[dict]:
    """The run's evaluations: step, training seconds, validation loss."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "time": r["time"], "loss": r["eval_loss"]} for r in rows if "eval_loss" in r]


def final_loss(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["eval_loss"]


def train_time(run: Path) -> float:
    return curve(run)[-1]["time"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--continue-steps", type=int, default=500)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="continued training and distillation (peak)")
    parser.add_argument("--out", default="lifecycle-runs", help="where the runs go")
    parser.add_argument("--plot", default="docs/upcycling.png")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    preset, base = ["--preset", args.preset, "--no-progress", "--out-dir", str(root)], str(args.base_steps)
    # after pre-training, every continuation: AdamW, no dropout, a fresh warmup and cosine decay
    later = ["--set", "optimizer=adamw", "--set", f"lr={args.lr}", "--set", "schedule=cosine", "--set", "dropout=0",
             "--set", "expert_dropout=0", "--set", "warmup_steps=50"]  # fmt: skip
    start = time.time()

    for seed in args.seeds:  # the dense baselines (the upcycling's starting points too)
        if not (root / f"dense-{seed}" / "summary.json").exists():
            cli("train", *preset, "--model", "lm", "--set", "sparse_step=0", "--set", f"seed={seed}",
                "--max-steps", base, "--run-name", f"dense-{seed}")  # fmt: skip
    if not (root / "switch-0" / "summary.json").exists():
        cli("train", *preset, "--model", "lm", "--set", "seed=0", "--max-steps", base, "--run-name", "switch-0")

    upcycled = root / "upcycled"
    if not (upcycled / "config.json").exists():
        cli("upcycle", str(root / "dense-0"), str(upcycled), "--num-experts", str(args.num_experts))
    steps = str(args.continue_steps)
    for seed in args.seeds:
        for name, source in ((f"continue-dense-{seed}", root / "dense-0"), (f"continue-upcycled-{seed}", upcycled)):
            if not (root / name / "summary.json").exists():
                cli("train", "--init-from", str(source), *preset, "--max-steps", steps, "--set", f"seed={seed}",
                    *later, "--run-name", name)  # fmt: skip

    steps = str(args.distill_steps)
    for seed in args.seeds:
        for name, alpha in ((f"student-{seed}", "0.75"), (f"student-alpha0-{seed}", "0")):
            if not (root / name / "summary.json").exists():
                cli("distill", str(root / "switch-0"), str(root / name), "--max-steps", steps, "--seed", str(seed),
                    "--alpha", alpha, "--no-progress", "--set", f"lr={args.lr}", "--set", "warmup_steps=50",
                    "--set", "dropout=0")  # fmt: skip

    report(root, args)
    print(f"\n(all runs: {(time.time() - start) / 60:.1f} minutes)", file=sys.stderr)


def report(root: Path, args) -> None:
    seeds = args.seeds
    start_loss = final_loss(root / "dense-0")
    print(f"\n### Upcycling: dense-0 ({args.base_steps} steps, validation loss {start_loss:.4f}) continued "
          f"{args.continue_steps} steps\n")  # fmt: skip
    print(f"| seed | dense continued | upcycled (top-2, {args.num_experts} experts) | difference | dense time (s) "
          "| upcycled time (s) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    diffs = []
    for seed in seeds:
        d, u = root / f"continue-dense-{seed}", root / f"continue-upcycled-{seed}"
        diffs.append(final_loss(d) - final_loss(u))
        print(f"| {seed} | {final_loss(d):.4f} | {final_loss(u):.4f} | {diffs[-1]:+.4f} | {train_time(d):.0f} | "
              f"{train_time(u):.0f} |")  # fmt: skip
    print(f"\nmean gain of the upcycled model: {statistics.mean(diffs):+.4f}")

    teacher = final_loss(root / "switch-0")
    dense = statistics.mean(final_loss(root / f"dense-{s}") for s in seeds)
    gain = dense - teacher
    print(f"\n### Distillation: teacher switch-0 ({args.base_steps} steps) {teacher:.4f}, dense baseline "
          f"(mean of seeds {seeds}) {dense:.4f}, teacher's gain {gain:.4f}\n")  # fmt: skip
    print("| seed | dense baseline | student, alpha 0.75 | share kept | student, alpha 0 (no teacher) | share kept |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seed in seeds:
        base = final_loss(root / f"dense-{seed}")
        s, s0 = final_loss(root / f"student-{seed}"), final_loss(root / f"student-alpha0-{seed}")
        print(f"| {seed} | {base:.4f} | {s:.4f} | {(dense - s) / gain:.0%} | {s0:.4f} | {(dense - s0) / gain:.0%} |")
    plot(root, args)


def plot(root: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    start = {"step": 0, "time": 0.0, "loss": final_loss(root / "dense-0")}  # both start from the dense run
    for seed in args.seeds:
        for name, colour in (("continue-dense", "tab:blue"), ("continue-upcycled", "tab:red")):
            points = [start, *curve(root / f"{name}-{seed}")]
            label = f"{name.split('-')[1]} (seed {seed})"
            style = "-" if seed == args.seeds[0] else "--"
            axes[0].plot([p["step"] for p in points], [p["loss"] for p in points], style, color=colour, label=label)
            axes[1].plot([p["time"] for p in points], [p["loss"] for p in points], style, color=colour, label=label)
    axes[0].set_xlabel("continued training steps")
    axes[1].set_xlabel("continued training time (s)")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Upcycling a dense {args.preset} LM after {args.base_steps} steps: dense vs {args.num_experts} "
                 "experts (top-2) continued")  # fmt: skip
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
