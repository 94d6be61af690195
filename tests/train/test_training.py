"""Data, objectives, trainer, checkpoints and every `switchformer` subcommand on CI-sized runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import shared
import torch
from uneven_pairs import write_uneven_pairs

from switchformer.cli import main
from switchformer.data.files import DataError
from switchformer.data.loaders import load_text
from switchformer.data.objectives import pack_causal, random_spans, span_corruption
from switchformer.data.pairs import load_pairs
from switchformer.train import checkpoint as checkpoint_module
from switchformer.train.checkpoint import latest_checkpoint, list_checkpoints
from switchformer.train.optimizer import learning_rate
from switchformer.train.sources import build_config
from switchformer.train.trainer import Trainer

TEXT = shared.TEXT * 40  # the conftest corpus's documents


def quick(sets: list[str] | None = None, **overrides):
    values = dict(max_steps=8, checkpoint_every=4, eval_every=4, log_every=1, vocab_size=400, seq_len=32)
    values.update(overrides)
    return build_config("test", overrides=values, sets=sets)


# ----------------------------------------------------------------------------- data


def test_bad_data_files_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_text([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty\.txt: file is empty"):
        load_text([tmp_path / "empty.txt"])
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match=r"bin\.txt: looks binary"):
        load_text([tmp_path / "bin.txt"])
    (tmp_path / "latin.txt").write_bytes(b"line one\nline two \xe9t\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt:2: not valid UTF-8"):
        load_text([tmp_path / "latin.txt"])
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: missing field 'text'"):
        load_text([tmp_path / "rows.jsonl"])
    (tmp_path / "pairs.jsonl").write_text('{"source": "a", "target": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: invalid JSON"):
        load_pairs([tmp_path / "pairs.jsonl"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        load_text([tmp_path / "empty_dir"])


def test_packing_and_span_corruption():
    rows = pack_causal([[5, 6, 7], [8, 9]], 3, eos_id=1)
    assert rows.tolist() == [[5, 6, 7], [1, 8, 9]]
    g = torch.Generator().manual_seed(0)
    mask = random_spans(200, 0.15, 3.0, g)
    assert int(mask.sum()) == 30
    tokens = list(range(200, 400))
    source, target = span_corruption(tokens, sentinels=list(range(3, 103)), eos_id=1, generator=g)
    assert source[-1] == 1 and target[-1] == 1
    # undoing the corruption gives the original sequence back
    sentinels = {s: [] for s in range(3, 103)}
    current = None
    for t in target[:-1]:
        if t in sentinels:
            current = t
        else:
            sentinels[current].append(t)
    restored = [t for s in source[:-1] for t in (sentinels[s] if s in sentinels else [s])]
    assert restored == tokens
    assert len(target) - 1 - sum(1 for t in target if t in sentinels) == 30  # 15% of the tokens


def test_schedule_shapes():
    config = quick(warmup_steps=10, max_steps=100, lr=1.0)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 99) == pytest.approx(0.1, abs=0.01)
    config.schedule = "inverse_sqrt"
    assert learning_rate(config, 40) == pytest.approx(0.5)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="^preset"):
        build_config("huge")
    with pytest.raises(ValueError, match="^optimizer"):
        build_config("test", overrides={"optimizer": "sgd"})
    with pytest.raises(ValueError, match="^lrr: no such config field"):
        build_config("test", sets=["lrr=1"])
    with pytest.raises(ValueError, match="^num_experts"):
        build_config("test", overrides={"num_experts": 0, "model": "lm"})
    (tmp_path / "bad.toml").write_text("lr = [")
    with pytest.raises(ValueError, match=r"bad\.toml: invalid TOML"):
        build_config("test", config_file=str(tmp_path / "bad.toml"))
    (tmp_path / "ok.toml").write_text('lr = 0.01\nmodel = "t5"\n')
    config = build_config("test", config_file=str(tmp_path / "ok.toml"), sets=["lr=0.02"])
    assert config.model == "t5" and config.lr == 0.02


# ----------------------------------------------------------------------------- trainer


@pytest.mark.parametrize("model", ["lm", "t5"])
def test_training_runs_and_learns(tmp_path, corpus, model):
    config = quick(model=model, data=[str(corpus)], max_steps=30, lr=1e-2, eval_every=30)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    first = trainer.evaluate().loss
    summary = trainer.train()
    assert summary["eval_loss"] < first - 0.5
    assert summary["routing"] and isinstance(summary["sample"], str)
    assert latest_checkpoint(tmp_path / "run").name == "step_0000030"


def test_seq2seq_pairs(tmp_path):
    rows = [{"source": f"count {i}", "target": f"{i} {i + 1}"} for i in range(60)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = quick(model="t5", objective="seq2seq", data=[str(tmp_path / "pairs.jsonl")], max_steps=4)
    summary = Trainer(config, tmp_path / "run", progress=False).train()
    assert summary["step"] == 4


def test_non_finite_losses_are_skipped_then_stop(tmp_path, corpus, monkeypatch):
    config = quick(data=[str(corpus)], max_bad_steps=3)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    original = trainer.forward

    def poisoned(batch, label_smoothing=0.0):
        out = original(batch, label_smoothing)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer, "forward", poisoned)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.train_step() is None  # skipped, weights untouched
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(Exception, match="3 non-finite losses in a row"):
        trainer.train()


def test_checkpoint_writes_are_atomic(tmp_path, corpus, monkeypatch):
    trainer = Trainer(quick(data=[str(corpus)]), tmp_path / "run", progress=False)
    trainer.train_step()
    good = trainer.save()
    trainer.train_step()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert list_checkpoints(tmp_path / "run") == [good]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    resumed = Trainer(trainer.config, tmp_path / "run", resume=True, progress=False)
    assert resumed.step == 1


def test_resume_keeps_metrics_up_to_the_checkpoint_and_the_clock(tmp_path, corpus):
    """Records logged after the checkpoint (steps to be run again) and a line cut short by the
    kill are dropped; the kept records become the history; time goes on from the checkpoint's."""
    run = tmp_path / "run"
    trainer = Trainer(quick(data=[str(corpus)], log_every=1), run, progress=False)
    trainer.train_step()
    trainer.train_step()
    trainer.time_offset = 100.0  # as if two steps had taken 100 s
    trainer.save()
    with (run / "metrics.jsonl").open("a") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "loss": 1.0, "time": 50.0 * step}) + "\n")
        f.write('{"step": 4, "lo')  # SIGKILL mid-write
    resumed = Trainer(trainer.config, run, resume=True, progress=False)
    assert [r["step"] for r in resumed.history] == [1, 2]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert resumed.time_offset == pytest.approx(100.0, abs=1.0)
    resumed.train()
    times = [r["time"] for r in resumed.history]
    assert times == sorted(times) and times[-1] > 100.0


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "ce_loss" in r]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _train_records(run_dir)}


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path, corpus):
    """SIGKILL mid-run, then --resume: the losses equal those of an uninterrupted run."""
    args = [
        "train",
        "--preset",
        "test",
        "--data",
        str(corpus),
        "--no-progress",
        "--max-steps",
        "16",
        "--set",
        "checkpoint_every=4",
        "--set",
        "log_every=1",
        "--set",
        "vocab_size=400",
        "--set",
        "router_jitter_noise=0.05",
        "--set",
        "dropout=0.1",
        "--out-dir",
        str(tmp_path),
    ]
    assert main(args + ["--run-name", "straight"]) == 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "switchformer", *args, "--run-name", "killed"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_dir = tmp_path / "killed"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = list_checkpoints(killed_dir)
        if done and done[-1].name >= "step_0000008":
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert main(["train", "--resume", str(killed_dir), "--no-progress"]) == 0
    straight, resumed = _losses(tmp_path / "straight"), _losses(killed_dir)
    assert sorted(resumed) == sorted(straight) == list(range(1, 17))
    records = _train_records(killed_dir)  # each step once, in order, on one clock
    assert [r["step"] for r in records] == list(range(1, 17))
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)
    for step in straight:
        assert abs(straight[step] - resumed[step]) <= 1e-6, step


# ----------------------------------------------------------------------------- commands


@pytest.mark.slow
def test_every_subcommand(tmp_path, corpus, capsys):
    run = tmp_path / "runs" / "cli"
    base = [
        "--preset",
        "test",
        "--data",
        str(corpus),
        "--no-progress",
        "--out-dir",
        str(tmp_path / "runs"),
        "--set",
        "vocab_size=400",
    ]
    assert main(["train", *base, "--run-name", "cli", "--model", "t5"]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "run directory" in out
    assert "routing (validation, eval: capacity factor 2):" in out

    assert main(["eval", str(run), "--batches", "2", "--json"]) == 0
    assert "perplexity" in json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--batches", "2"]) == 0
    assert "validation loss" in capsys.readouterr().out  # the readable summary

    assert main(["generate", str(run), "--prompt", "The fox", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("The fox")

    assert main(["info", str(run)]) == 0
    assert "active per token" in capsys.readouterr().out
    assert main(["info", "--preset", "tiny"]) == 0
    assert "layers: d S d S" in capsys.readouterr().out
    assert main(["info", "--preset", "compare-long"]) == 0  # 64 experts in every other layer
    out = capsys.readouterr().out
    assert "layers: d S d S" in out and "experts per Switch layer: 64" in out

    assert main(["report", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000 and (tmp_path / "plots" / "expert_load.png").exists()
    assert not (run / "loss.png").exists()  # reading a run writes nothing into it

    assert main(["convert", str(run), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "switch_transformers"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "native"), "--prompt", "The fox", "--max-new-tokens", "5", "--greedy"]) == 0
    converted = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "The fox", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out == converted  # same model after two conversions

    assert main(["compare", *base, "--run-name", "cmp", "--max-steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "| switch |" in out and "| dense |" in out and (tmp_path / "runs" / "cmp" / "compare.png").exists()
    assert "Switch layers trained capacity factor 1.25, evaluated capacity factor 2" in out

    assert main(["compare", *base, "--run-name", "cmp2", "--max-steps", "4", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "## seed 0" in out and "## seed 1" in out and "over 2 seeds; Switch ends lower in" in out
    summary = [line for line in out.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(summary) == 2 and summary[0] != summary[1]  # different seeds, different runs
    assert (tmp_path / "runs" / "cmp2" / "seed-1" / "compare.png").exists()
    assert main(["compare", *base, "--run-name", "cmp3", "--seeds", "0"]) == 2
    assert "--seeds: must be >= 1" in capsys.readouterr().err


def test_eval_routing_dropless_processes_every_token(tmp_path, corpus, capsys):
    """With an eval capacity so small that tokens are dropped, `eval` reports the drops and
    `eval --routing dropless` processes every token (a different loss, no drops)."""
    run = tmp_path / "runs" / "small-capacity"
    base = ["--preset", "test", "--data", str(corpus), "--no-progress", "--out-dir", str(tmp_path / "runs")]
    sets = ["--set", "vocab_size=400", "--set", "eval_capacity_factor=0.25", "--set", "num_experts=4"]
    assert main(["train", *base, *sets, "--run-name", "small-capacity", "--max-steps", "4"]) == 0
    assert "routing (validation, eval: capacity factor 0.25):" in capsys.readouterr().out
    reports = {}
    for mode in ("eval", "dropless"):
        assert main(["eval", str(run), "--batches", "2", "--routing", mode, "--json"]) == 0
        reports[mode] = json.loads(capsys.readouterr().out)
        assert reports[mode]["routing_mode"] == mode
        assert reports[mode]["routing_used"] == (
            "eval: capacity factor 0.25" if mode == "eval" else "dropless (no token dropped)"
        )
    dropped = {mode: [layer["dropped_fraction"] for layer in r["routing"].values()] for mode, r in reports.items()}
    assert all(d > 0.3 for d in dropped["eval"])  # a quarter of the fair share per expert: most tokens dropped
    assert dropped["dropless"] == [0.0] * len(dropped["eval"])
    assert reports["eval"]["eval_loss"] != reports["dropless"]["eval_loss"]
    assert reports["eval"]["tokens"] == reports["dropless"]["tokens"]  # the same validation batches


def test_compare_runs_the_long_regime_by_default(tmp_path, monkeypatch, capsys):
    """`switchformer compare` with no preset trains compare-long (the issue asks that the regime
    where Switch wins be the default); `--preset compare` is the quick check."""
    from switchformer.analysis import compare
    from switchformer.commands import common as cli
    from switchformer.train.presets import PRESETS
    from switchformer.train.sources import build_config

    assert set(cli.PRESET_NAMES) == set(PRESETS)  # the help text lists every preset
    seen = []

    def record(config, out_dir, **kwargs):
        seen.append(config)
        raise ValueError("stop before training")

    monkeypatch.setattr(compare, "run_compare", record)
    for argv in ([], ["--preset", "compare"]):
        assert main(["compare", *argv, "--out-dir", str(tmp_path)]) == 2
        assert "stop before training" in capsys.readouterr().err
    long, quick = seen
    assert long == build_config("compare-long", None, {"out_dir": str(tmp_path)})
    assert (long.num_experts, long.max_steps, long.schedule) == (64, 6000, "inverse_sqrt")
    assert compare.describe_routing(long) == "Switch layers trained dropless, evaluated dropless"
    assert (quick.num_experts, quick.max_steps) == (16, 800)
    assert compare.describe_routing(quick) == "Switch layers trained capacity factor 1.25, evaluated capacity factor 2"


def test_command_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("switchformer: error:") and "nowhere: not found" in err and "Traceback" not in err
    assert main(["train", "--preset", "test", "--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path)]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    assert main(["train", "--set", "lr=fast", "--out-dir", str(tmp_path)]) == 2
    assert "lr: expected float" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_small_validation_split_is_used_whole(tmp_path, corpus):
    trainer = Trainer(quick(data=[str(corpus)], eval_batches=1000), tmp_path / "run", progress=False)
    result = trainer.evaluate()
    labels = trainer.data.valid.tensors["input_ids"][:, 1:]
    assert result.tokens == labels.numel()


@pytest.mark.parametrize("model", ["lm", "t5"])
def test_bf16_autocast_training_keeps_routers_float32(tmp_path, corpus, model):
    trainer = Trainer(
        quick(model=model, data=[str(corpus)], precision="bf16", max_steps=3), tmp_path / "run", progress=False
    )
    seen = []
    for layer in trainer.model.modules():
        if layer.__class__.__name__ == "TokenChoiceRouter":
            layer.register_forward_hook(lambda m, inp, out: seen.append(out.logits.dtype))
    summary = trainer.train()
    assert math.isfinite(summary["eval_loss"])
    assert seen and set(seen) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


def test_seed_summary_reports_mean_spread_and_wins():
    from switchformer.analysis.compare import format_seed_summary

    def result(seed, switch, dense, speedup):
        rows = [{"model": "switch", "final_eval_loss": switch}, {"model": "dense", "final_eval_loss": dense}]
        return {"seed": seed, "rows": rows, "speedup_steps": speedup}

    text = format_seed_summary([result(0, 4.5, 4.6, 1.3), result(1, 4.7, 4.6, None), result(2, 4.4, 4.6, 2.0)])
    assert "| 0 | 4.5000 | 4.6000 | -0.1000 | 1.30x |" in text
    assert "| 1 | 4.7000 | 4.6000 | +0.1000 | never |" in text
    # differences -0.1, +0.1, -0.2: mean -0.0667, sample standard deviation 0.1528
    assert "mean -0.0667, standard deviation 0.1528 over 3 seeds; Switch ends lower in 2 of 3" in text


def _first_step_gradient(tmp_path, name, **overrides) -> dict[str, torch.Tensor]:
    """The gradient the optimizer sees at step 0 (clipping disabled)."""
    # dropless (None can only be given as a setting): capacity would make routing depend on the split
    config = quick(
        sets=["capacity_factor=none", "eval_capacity_factor=none"],
        grad_clip=1e9,
        max_steps=1,
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
        **overrides,
    )
    assert config.capacity_factor is None
    trainer = Trainer(config, tmp_path / name, progress=False)
    seen = {}

    def record():
        seen.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = record
    assert trainer.train_step() is not None
    return seen


@pytest.mark.parametrize("objective", ["seq2seq", "span_corruption"])
def test_gradient_is_the_same_however_the_batch_is_split_into_micro_batches(tmp_path, objective):
    """The step's gradient is that of the mean over every label token of the global batch: a
    1-token target must not weigh as much as a 16-token one because it sits in its own micro-batch."""
    data = write_uneven_pairs(tmp_path)
    if objective == "span_corruption":  # uneven span-corruption targets from plain text
        data = tmp_path / "text.txt"
        data.write_text(TEXT[:3000])
    common = dict(
        model="t5",
        objective=objective,
        data=[str(data)],
        d_model=16,
        num_layers=1,
        num_heads=2,
        d_ff=16,
        num_experts=2,
        sparse_step=1,
        precision="fp32",
    )
    whole = _first_step_gradient(tmp_path, "whole", batch_size=4, grad_accum=1, **common)
    for batch_size, grad_accum in ((1, 4), (2, 2)):
        split = _first_step_gradient(
            tmp_path, f"split{grad_accum}", batch_size=batch_size, grad_accum=grad_accum, **common
        )
        assert split.keys() == whole.keys()
        for name, grad in whole.items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert ((split[name] - grad).abs().max() / scale).item() < 1e-4, (name, batch_size, grad_accum)


def test_batches_are_padded_only_to_their_own_longest_row(tmp_path):
    """A split is padded to its longest row; a batch keeps only its own longest source and target,
    and the loss does not change (padding is masked and takes no expert capacity)."""
    rows = [{"source": "a " * (1 + i % 3), "target": "b " * (1 + i % 2)} for i in range(30)]
    rows[-1] = {"source": "long " * 20, "target": "longer " * 25}  # a training row (the first are validation)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = quick(model="t5", objective="seq2seq", data=[str(tmp_path / "pairs.jsonl")], seq_len=64,
                   eval_capacity_factor=None)  # fmt: skip
    trainer = Trainer(config, tmp_path / "run", progress=False)
    split = trainer.data.train
    full_width = split.tensors["input_ids"].shape[1], split.tensors["labels"].shape[1]
    index = torch.tensor([3, 4, 5])
    batch = split.rows(index)
    real_source = int(split.tensors["attention_mask"][index].sum(1).max())
    real_target = int((split.tensors["labels"][index] != -100).sum(1).max())
    assert batch["input_ids"].shape[1] == real_source < full_width[0]
    assert batch["labels"].shape[1] == real_target < full_width[1]
    full = {k: v.index_select(0, index) for k, v in split.tensors.items()}
    model = trainer.model.eval()
    with torch.no_grad():
        trimmed_loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).ce_loss
        full_loss = model(full["input_ids"], full["attention_mask"], labels=full["labels"]).ce_loss
    torch.testing.assert_close(trimmed_loss, full_loss, rtol=1e-5, atol=1e-6)


def test_set_keeps_a_string_exactly_and_reads_numbers_around_spaces():
    config = build_config("test", sets=["model=t5", "objective=seq2seq", "source_prefix=translate German to English: ",
                                        "max_steps= 7 ", "capacity_factor= none"])  # fmt: skip
    assert config.source_prefix == "translate German to English: "
    assert config.max_steps == 7 and config.capacity_factor is None


def test_a_checkpoint_in_the_pre_dcp_shard_layout_is_refused_naming_the_version(tmp_path, corpus, capsys):
    """The hand-written shard layout of multi-process runs before DCP (optimizer-rank*.pt, no dcp/)
    is no longer read (CHANGELOG): --resume says so in one line instead of guessing."""
    args = ["train", "--preset", "test", "--data", str(corpus), "--no-progress", "--out-dir", str(tmp_path),
            "--run-name", "old", "--max-steps", "4", "--set", "checkpoint_every=4",
            "--set", "vocab_size=400"]  # fmt: skip
    assert main(args) == 0
    checkpoint = sorted((tmp_path / "old" / "checkpoints").iterdir())[-1]
    optimizer = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").unlink()
    for rank in range(2):
        (checkpoint / f"optimizer-rank{rank}.pt").write_bytes(optimizer)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "old"), "--max-steps", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "hand-written shard layout (optimizer-rank*.pt)" in err and "resume it with that version" in err
    assert err.count("\n") == 1


def test_the_configuration_reference_covers_every_field():
    """The docs' configuration reference is generated from TrainConfig: every field has its line of
    meaning, every bound and choice shows, and a bound shown is the one validation enforces."""
    import dataclasses

    from switchformer.train.config import FIELD_HELP, TRAIN_BOUNDS, TrainConfig, reference_rows

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(FIELD_HELP) == set(names)
    rows = {row["name"]: row for row in reference_rows()}
    assert list(rows) == names and all(row["meaning"] for row in rows.values())
    assert rows["capacity_factor"]["bound"] == "> 0 (or none: dropless)"
    assert rows["optimizer"]["bound"].startswith("one of")
    assert rows["seq_len"]["type"] == "int" and rows["data"]["default"] == "[]"
    for name, bound in TRAIN_BOUNDS.items():  # below the low end: refused with the bound's words
        if bound.low is not None and rows[name]["type"] in ("int", "float", "int | None", "float | None"):
            with pytest.raises(ValueError, match=f"^{name}: must be"):
                TrainConfig(**{name: bound.low - 1})
