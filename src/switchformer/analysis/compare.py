"""``switchformer compare``: a Switch model against its FLOP-matched dense twin, same data and tokens."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from switchformer.analysis.evaluate_run import translation_scores
from switchformer.analysis.metrics import METRICS, require_sacrebleu
from switchformer.analysis.plots import plot_compare
from switchformer.inference.translation import decoding_settings
from switchformer.runs.files import write_file_atomic
from switchformer.train.config import TrainConfig
from switchformer.train.data import evaluation_documents
from switchformer.train.trainer import Trainer


def steps_to_reach(records: list[dict], target: float) -> tuple[float | None, float | None]:
    """First (step, time) at which validation loss reaches ``target``, linearly interpolated
    between evaluations; ``(None, None)`` if it never does."""
    evals = [r for r in records if "eval_loss" in r]
    previous = None
    for record in evals:
        if record["eval_loss"] <= target:
            if previous is None or previous["eval_loss"] == record["eval_loss"]:
                return float(record["step"]), float(record["time"])
            frac = (previous["eval_loss"] - target) / (previous["eval_loss"] - record["eval_loss"])
            step = previous["step"] + frac * (record["step"] - previous["step"])
            time = previous["time"] + frac * (record["time"] - previous["time"])
            return step, time
        previous = record
    return None, None


def translation_quality(trainer: Trainer, config: TrainConfig, progress: bool) -> dict:
    """BLEU and chrF (sacrebleu) of a seq2seq run's model on its validation pairs, decoded with the
    run's settings (``num_beams``, ``length_penalty``), per source language too when there are
    several: what a translation user compares, beside the validation loss."""
    pairs = evaluation_documents(config)
    return translation_scores(
        trainer.model, trainer.data.tokenizer, config, pairs, list(METRICS), decoding_settings(config), "eval", None,
        progress,
    )  # fmt: skip


def run_compare(config: TrainConfig, out_dir: Path, progress: bool = True, device: str | None = None) -> dict:
    """Train ``config`` (Switch) and its FLOP-matched dense twin (``sparse_step=0``) on the same
    data and tokenizer, in ``out_dir/switch`` and ``out_dir/dense``; a seq2seq task is also scored
    with BLEU and chrF on the validation pairs (needs ``sacrebleu``: checked before training).
    Returns the table's rows, the speed-up in steps to the dense model's final loss and the plot."""
    seq2seq = config.resolved_objective == "seq2seq"
    if seq2seq:
        require_sacrebleu()  # said before an hour of training, not after
    if config.sparse_step == 0:
        raise ValueError("sparse_step: compare needs a sparse model (sparse_step >= 1)")
    if config.top_k != 1:
        raise ValueError("top_k: compare builds a FLOP-matched dense twin for top-1 routing")
    out_dir = Path(out_dir)
    runs = {"switch": config, "dense": replace(config, sparse_step=0)}
    results = {}
    data = None
    for name, run_config in runs.items():
        run_dir = out_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        if name == "dense":  # the same tokens for both: the tokenizer and data the first run prepared
            write_file_atomic(run_dir / "tokenizer.json", (out_dir / "switch" / "tokenizer.json").read_bytes())
        trainer = Trainer(run_config, run_dir, progress=progress, device=device, data=data)
        summary = trainer.train()
        records = trainer.history
        results[name] = {"summary": summary, "records": records, "time": max(r.get("time", 0.0) for r in records)}
        if seq2seq:
            results[name]["translation"] = translation_quality(trainer, run_config, progress)
        data = trainer.data
        del trainer  # free the Switch model's memory before the dense twin is built
    target = results["dense"]["summary"]["eval_loss"]
    rows = []
    for name, result in results.items():
        step, time = steps_to_reach(result["records"], target)
        params = result["summary"]["parameters"]
        rows.append(
            {
                "model": name,
                "total_params": params["total"],
                "active_params": params["active"],
                "flops_per_token": params["flops_per_token"],
                "final_eval_loss": result["summary"]["eval_loss"],
                "steps_to_dense_loss": step,
                "time_to_dense_loss": time,
                "wall_time": result["time"],
                **_translation_columns(result.get("translation")),
            }
        )
    dense_row, switch_row = rows[1], rows[0]
    speedup = None
    if switch_row["steps_to_dense_loss"]:
        speedup = dense_row["steps_to_dense_loss"] / switch_row["steps_to_dense_loss"]
    plot = plot_compare({name: r["records"] for name, r in results.items()}, out_dir / "compare.png")
    return {
        "rows": rows,
        "speedup_steps": speedup,
        "target_loss": target,
        "plot": str(plot),
        "switch_routing": describe_routing(config),
    }


def _translation_columns(scores: dict | None) -> dict:
    if scores is None:
        return {}
    columns = {"bleu": scores["bleu"], "chrf": scores["chrf"], "bleu_signature": scores["bleu_signature"]}
    if "by_source_lang" in scores:
        columns["by_source_lang"] = scores["by_source_lang"]
    return columns


def capacity_label(factor: float | None) -> str:
    """``"dropless"`` or ``"capacity factor 1.25"``: how a capacity setting routes."""
    return "dropless" if factor is None else f"capacity factor {factor:g}"


def describe_routing(config: TrainConfig) -> str:
    """How the Switch layers ran: a validation loss measured with tokens dropped is not the same
    number as one measured dropless, so the table says which."""
    trained, evaluated = capacity_label(config.capacity_factor), capacity_label(config.eval_capacity_factor)
    return f"Switch layers trained {trained}, evaluated {evaluated}"


def format_table(result: dict) -> str:
    """The markdown table ``compare`` prints and writes to ``compare.md``; with BLEU and chrF
    columns for a translation task, and a table per source language for a multilingual one."""
    scored = all("bleu" in r for r in result["rows"])
    lines = [
        "| model | params (total) | params (active) | FLOPs/token | final val loss | steps to dense loss "
        "| time to dense loss | wall time |" + (" val BLEU | val chrF |" if scored else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if scored else ""),
    ]
    for r in result["rows"]:
        steps = "never" if r["steps_to_dense_loss"] is None else f"{r['steps_to_dense_loss']:.0f}"
        time = "never" if r["time_to_dense_loss"] is None else f"{r['time_to_dense_loss']:.0f} s"
        lines.append(
            f"| {r['model']} | {r['total_params']:,} | {r['active_params']:,} | {r['flops_per_token']:,} | "
            f"{r['final_eval_loss']:.4f} | {steps} | {time} | {r['wall_time']:.0f} s |"
            + (f" {r['bleu']:.2f} | {r['chrf']:.2f} |" if scored else "")
        )
    languages = [r["by_source_lang"] for r in result["rows"] if "by_source_lang" in r]
    if scored and len(languages) == len(result["rows"]):
        names = [r["model"] for r in result["rows"]]
        lines += ["", "| source language | pairs | " + " | ".join(f"{n} BLEU" for n in names) + " |",
                  "|---|---:|" + "---:|" * len(names)]  # fmt: skip
        for lang, group in languages[0].items():
            bleus = " | ".join(f"{by[lang]['bleu']:.2f}" for by in languages)
            lines.append(f"| {lang} | {group['pairs']} | {bleus} |")
    if scored:
        lines += ["", f"BLEU: sacrebleu {result['rows'][0]['bleu_signature']}"]
    speed = result["speedup_steps"]
    lines.append("")
    lines.append(
        "speed-up in steps to the dense model's final validation loss: "
        + ("Switch never reached it" if speed is None else f"{speed:.2f}x")
    )
    lines.append(result["switch_routing"])
    return "\n".join(lines)


def run_compare_seeds(
    config: TrainConfig, out_dir: Path, seeds: int, progress: bool = True, device: str | None = None
) -> list[dict]:
    """``run_compare`` once per seed (``config.seed``, ``config.seed + 1``, ...), each pair in
    ``out_dir/seed-<n>``: at laptop scale the gap between Switch and dense can be smaller than the
    spread between seeds, and only several seeds tell the two apart."""
    if seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {seeds}")
    results = []
    for offset in range(seeds):
        seed = config.seed + offset
        result = run_compare(replace(config, seed=seed), Path(out_dir) / f"seed-{seed}", progress, device)
        results.append({"seed": seed, **result})
    return results


def format_seed_summary(results: list[dict]) -> str:
    """One line per seed (final losses, their difference, speed-up) and the mean and spread."""
    lines = [
        "| seed | switch final val loss | dense final val loss | switch - dense | speed-up (steps) |",
        "|---:|---:|---:|---:|---:|",
    ]
    differences = []
    for r in results:
        switch, dense = (next(row for row in r["rows"] if row["model"] == m) for m in ("switch", "dense"))
        difference = switch["final_eval_loss"] - dense["final_eval_loss"]
        differences.append(difference)
        speed = "never" if r["speedup_steps"] is None else f"{r['speedup_steps']:.2f}x"
        lines.append(
            f"| {r['seed']} | {switch['final_eval_loss']:.4f} | {dense['final_eval_loss']:.4f} | "
            f"{difference:+.4f} | {speed} |"
        )
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    wins = sum(d < 0 for d in differences)
    lines.append("")
    lines.append(
        f"switch - dense final validation loss: mean {statistics.fmean(differences):+.4f}, standard deviation "
        f"{spread:.4f} over {len(differences)} seeds; Switch ends lower in {wins} of {len(differences)}"
    )
    return "\n".join(lines)
