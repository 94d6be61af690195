"""PNG plots of runs: loss curves, expert load over training, dropped fraction, sparse-vs-dense."""

from __future__ import annotations

import logging
from pathlib import Path

from switchformer.runs.directory import run_dir_of
from switchformer.runs.metrics_log import read_json_lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of ``metrics.jsonl``; for steps logged twice (a resumed run), the last one wins."""
    path = run_dir_of(run_dir) / "metrics.jsonl"  # names a missing run or a file given as one
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is this a run directory?)")

    records, damaged = read_json_lines(path)  # lines cut by a kill or a full disk are skipped
    if damaged:
        if not records:
            raise ValueError(f"{path}: no readable record (lines {damaged[:5]} are damaged)")
        shown = ", ".join(map(str, damaged[:5])) + (" ..." if len(damaged) > 5 else "")
        logging.getLogger("switchformer").warning("%s: skipped %d damaged line(s): %s", path, len(damaged), shown)
    by_key = {(record["step"], "eval_loss" in record): record for record in records}
    return [by_key[k] for k in sorted(by_key)]


def _column_edges(steps: list[int]) -> list[float]:
    """Edges of one heatmap column per evaluation, centred on its step (halfway to each
    neighbour; a lone evaluation gets a column as wide as its step)."""
    if len(steps) == 1:
        half = max(steps[0], 1) / 2
        return [steps[0] - half, steps[0] + half]
    mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:])]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    """Loss curves, expert load and dropped fraction of a run, written to ``out_dir`` (never into
    the run: commands that read a run do not write into it)."""
    plt = _pyplot()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    records = read_metrics(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if "ce_loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["ce_loss"] for r in train], label="training cross-entropy", alpha=0.7)
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "loss.png"))

    layers = sorted({name for r in evals for name in r.get("routing", {})})
    if layers:
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.5), squeeze=False)
        for ax, name in zip(axes[0], layers):
            rows = [r for r in evals if name in r["routing"]]
            loads = [r["routing"][name]["tokens_per_expert"] for r in rows]
            shares = [[c / max(sum(load), 1) for c in load] for load in loads]
            x_edges = _column_edges([r["step"] for r in rows])
            y_edges = [e - 0.5 for e in range(len(shares[0]) + 1)]
            image = ax.pcolormesh(x_edges, y_edges, list(map(list, zip(*shares))), cmap="viridis")
            ax.set_title(f"{name}: share of tokens")
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
            fig.colorbar(image, ax=ax)
        written.append(_save(fig, out_dir / "expert_load.png"))

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in layers:
            rows = [r for r in evals if name in r["routing"]]
            ax.plot([r["step"] for r in rows], [r["routing"][name]["dropped_fraction"] for r in rows], "o-", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("dropped fraction (eval capacity)")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "dropped_fraction.png"))
    return written


def plot_compare(histories: dict[str, list[dict]], out: Path) -> Path:
    """Validation loss against steps and against wall time for each named run."""
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in histories.items():
        evals = [r for r in records if "eval_loss" in r]
        by_step.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label=name)
        by_time.plot([r["time"] for r in evals], [r["eval_loss"] for r in evals], "o-", label=name)
    for ax, label in ((by_step, "step"), (by_time, "wall time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
