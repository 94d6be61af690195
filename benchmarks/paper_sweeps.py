"""The paper's sweeps at laptop scale: number of experts at equal FLOPs (its Figure 4) and the
capacity factor (its Table 1), each run against the same FLOP-matched dense twin.

Every run uses the `compare` preset (SwitchLM, embedded corpus, one shared tokenizer, the same
token budget) with one field changed; results go to ``<out>/<run>/`` (a finished run is reused,
so the sweep can be extended or resumed), and the tables, a JSON summary and a plot of validation
loss against steps are written to ``<out>``.

    python benchmarks/paper_sweeps.py                          # experts 1..16 and capacity 1.0/1.25/2.0
    python benchmarks/paper_sweeps.py --experts 8 64 --capacity-factors --set max_steps=400
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from switchformer.analysis.compare import steps_to_reach
from switchformer.analysis.plots import _pyplot, _save
from switchformer.train.sources import build_config
from switchformer.train.trainer import Trainer


def run(name: str, config, out: Path, tokenizer: Path | None) -> dict:
    run_dir = out / name
    done = run_dir / "sweep_result.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run starts over: its curve must be one piece
    run_dir.mkdir(parents=True)
    if tokenizer is not None:
        shutil.copy(tokenizer, run_dir / "tokenizer.json")
    start = time.perf_counter()
    trainer = Trainer(config, run_dir, progress=False)
    summary = trainer.train()
    result = {
        "name": name,
        "num_experts": config.num_experts if config.sparse_step else 0,
        "capacity_factor": config.capacity_factor,
        "eval_loss": summary["eval_loss"],
        "parameters": summary["parameters"],
        "wall_time": time.perf_counter() - start,
        "routing": summary["routing"],
        "evals": [{k: r[k] for k in ("step", "time", "eval_loss")} for r in trainer.history if "eval_loss" in r],
    }
    done.write_text(json.dumps(result, indent=1))
    print(f"{name}: validation loss {result['eval_loss']:.4f} in {result['wall_time']:.0f} s", flush=True)
    return result


def table(results: list[dict], dense: dict, title: str) -> str:
    target = dense["eval_loss"]
    lines = [
        f"{title} (dense twin: validation loss {target:.4f})",
        "",
        "| run | experts | capacity factor | params (total) | final val loss | steps to dense loss "
        "| speed-up (steps) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        step, _ = steps_to_reach(r["evals"], target)
        dense_steps = dense["evals"][-1]["step"]
        reached = "never" if step is None else f"{step:.0f}"
        speedup = "-" if step is None else f"{dense_steps / step:.2f}x"
        cf = "-" if not r["num_experts"] else r["capacity_factor"]
        lines.append(
            f"| {r['name']} | {r['num_experts'] or '-'} | {cf} | {r['parameters']['total']:,} | "
            f"{r['eval_loss']:.4f} | {reached} | {speedup} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        ax.plot([e["step"] for e in r["evals"]], [e["eval_loss"] for e in r["evals"]], label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(max(e["eval_loss"] for r in results for e in r["evals"][2:]), 8.0))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/sweeps"))
    parser.add_argument("--experts", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--capacity-factors", type=float, nargs="*", default=[1.0, 2.0])
    parser.add_argument("--base-experts", type=int, default=16, help="experts in the capacity-factor runs")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override the preset")
    args = parser.parse_args()
    base = build_config("compare", sets=args.set)
    args.out.mkdir(parents=True, exist_ok=True)

    dense = run("dense", replace(base, sparse_step=0), args.out, None)
    tokenizer = args.out / "dense" / "tokenizer.json"
    experts = [
        run(f"switch-{n}", replace(base, num_experts=n, capacity_factor=1.25), args.out, tokenizer)
        for n in args.experts
    ]
    capacity = [
        run(
            f"switch-{args.base_experts}" + ("" if cf == 1.25 else f"-cf{cf}"),
            replace(base, num_experts=args.base_experts, capacity_factor=cf),
            args.out,
            tokenizer,
        )
        for cf in sorted({*args.capacity_factors, 1.25})
    ]
    report = [
        table(experts, dense, "Experts at equal FLOPs per token (capacity factor 1.25)"),
        "",
        table(capacity, dense, f"Capacity factor ({args.base_experts} experts)"),
    ]
    text = "\n".join(report)
    print(text)
    (args.out / "sweeps.md").write_text(text + "\n")
    (args.out / "sweeps.json").write_text(json.dumps({"dense": dense, "experts": experts, "capacity": capacity}))
    print("plot:", plot([dense, *experts], args.out / "sweep_experts.png"))


if __name__ == "__main__":
    main()
