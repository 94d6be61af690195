"""Commands that read a run never write into it; every setting is validated once, from any source,
with the field and the source named; --resume changes only what it may."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import shared
from shared import snapshot

from switchformer.cli import main

TEXT = shared.TEXT * 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished T5 run of four steps (kept read-only in spirit: tests copy it before damaging)."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    args = ["train", "--preset", "test", "--model", "t5", "--data", str(corpus), "--no-progress"]
    args += ["--out-dir", str(root), "--run-name", "run", "--max-steps", "4", "--set", "vocab_size=400"]
    assert main(args) == 0
    return root / "run"


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def test_the_model_section_is_the_architecture(trained, tmp_path, capsys):
    """Training settings describe how a fresh run was asked for; the model is rebuilt from the
    saved model config, so a train section without (or with other) size fields changes nothing."""
    run = copy_run(trained, tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert main(["eval", str(run), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["eval_loss"]
    assert "d_model" not in config["train"]  # the architecture is stored once, in the model section
    config["train"]["d_model"] = 96  # an older config whose train section said another size: the model's wins
    (run / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(want, rel=1e-6)


def test_every_read_command_leaves_the_run_byte_identical(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    other = tmp_path / "other.txt"
    other.write_text(TEXT[:2000])
    before = snapshot(run)
    commands = [
        ["eval", str(run), "--batches", "1"],
        ["eval", str(run), "--batches", "1", "--json", "--routing", "dropless"],
        ["eval", str(run), "--data", str(other), "--json"],
        ["generate", str(run), "--prompt", "The fox", "--max-new-tokens", "3", "--greedy"],
        ["info", str(run)],
        ["report", str(run), "--out", str(tmp_path / "plots")],
        ["convert", str(run), str(tmp_path / "hf")],
    ]
    for command in commands:
        assert main(command) == 0, command
        assert snapshot(run) == before, f"{command[0]} wrote into the run"
    capsys.readouterr()
    # eval --data did not become the run's training data
    assert json.loads((run / "config.json").read_text())["train"]["data"] != [str(other)]


@pytest.mark.parametrize("flags", [["--greedy"], ["--seed", "3"]], ids=["greedy", "sampled"])
def test_generate_with_the_static_cache_prints_what_the_growing_cache_prints(trained, capsys, flags):
    command = ["generate", str(trained), "--prompt", "The fox", "--max-new-tokens", "12", *flags]
    assert main(command) == 0
    growing = capsys.readouterr().out
    assert main([*command, "--cache", "static"]) == 0
    assert capsys.readouterr().out == growing and growing.startswith("The fox")


def test_eval_reports_the_loss_training_reported(trained, capsys):
    summary = json.loads((trained / "summary.json").read_text())
    assert main(["eval", str(trained), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: c.pop("train"), "'train' section is missing"),
        (lambda c: c["train"].update(d_model="abc"), "d_model: expected an integer"),
        (lambda c: c["train"].update(bogus=1), "bogus: no such config field"),
        (lambda c: c["model"].update(d_model="abc"), "model:"),
    ],
)
def test_failing_commands_on_a_damaged_config_name_it_and_write_nothing(trained, tmp_path, capsys, damage, message):
    run = copy_run(trained, tmp_path)
    config = json.loads((run / "config.json").read_text())
    damage(config)
    (run / "config.json").write_text(json.dumps(config))
    before = snapshot(run)
    for command in (["eval", str(run)], ["train", "--resume", str(run), "--no-progress"], ["generate", str(run)]):
        code = main([*command, "--prompt", "x"] if command[0] == "generate" else command)
        err = capsys.readouterr().err
        assert code == 2, command
        assert err.count("\n") == 1 and "config.json" in err and message in err, err
        assert snapshot(run) == before, f"{command[0]} wrote into a run it failed on"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "lr=0.5"], "lr: --resume cannot change it"),
        (["--set", "bogus=1"], "bogus: no such config field"),
        (["--data", "/nonexistent/file.txt"], "data: --resume cannot change it"),
        (["--max-steps", "65", "--set", "lr=0.5"], "lr: --resume cannot change it"),
        (["--set", "eval_every=0"], "eval_every: must be >= 1, got 0 (from --set eval_every=0)"),
        (["--run-name", "other"], "--run-name: not used with --resume"),
        (["--preset", "tiny"], "--preset: not used with --resume"),
        (["--init-from", "/elsewhere"], "--init-from: not used with --resume"),
    ],
)
def test_resume_refuses_what_it_may_not_change_and_writes_nothing(trained, tmp_path, capsys, flags, message):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert snapshot(run) == before


def test_resume_may_extend_the_run_and_change_bookkeeping(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    same_lr = json.loads((run / "config.json").read_text())["train"]["lr"]
    flags = ["--max-steps", "6", "--set", "eval_every=3", "--set", f"lr={same_lr}"]  # the same lr is fine
    assert main(["train", "--resume", str(run), "--no-progress", *flags]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["max_steps"] == 6 and saved["eval_every"] == 3
    capsys.readouterr()


# ----------------------------------------------------------------------------- settings from every source


BAD_SETTINGS = [
    ("lr", "inf", float("inf"), "lr: must be a finite number"),
    ("init_scale", "-1", -1.0, "init_scale: must be > 0"),
    ("validation_fraction", "0", 0.0, "validation_fraction: must be in (0, 1)"),
    ("weight_decay", "-1", -1.0, "weight_decay: must be >= 0"),
    ("aux_loss_coef", "-5", -5.0, "aux_loss_coef: must be >= 0"),
    ("d_model", "abc", "abc", "d_model: expected an integer"),
    ("d_model", "32.5", 32.5, "d_model: expected an integer"),
    ("dropout", "1.5", 1.5, "dropout: must be < 1"),
    ("capacity_factor", "0", 0.0, "capacity_factor: must be > 0"),
]


def write_config(path: Path, name: str, value) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps({name: value}))
    elif path.suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump({name: value}))
    else:
        text = (
            json.dumps(value)
            if not isinstance(value, float) or value == value and abs(value) != float("inf")
            else ("inf" if value > 0 else "-inf")
        )
        path.write_text(f"{name} = {text}\n")
    return path


@pytest.mark.parametrize("name, text, value, message", BAD_SETTINGS)
@pytest.mark.parametrize("source", ["--set", ".toml", ".yaml", ".json"])
def test_bad_settings_are_refused_with_field_and_source(tmp_path, capsys, name, text, value, message, source):
    if source == ".yaml":
        pytest.importorskip("yaml")
    if source == "--set":
        flags, where = ["--set", f"{name}={text}"], f"--set {name}={text}"
        if name == "d_model":  # --set parses by type: the parser itself names the field
            message, where = "d_model: expected int", ""
    else:
        file = write_config(tmp_path / f"settings{source}", name, value)
        flags, where = ["--config", str(file)], str(file)
    code = main(["train", "--preset", "test", "--out-dir", str(tmp_path / "runs"), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and where in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing was started


@pytest.mark.parametrize(
    "suffix, text, where",
    [(".yaml", "lr: 0.1\nd_model: [1,\n", "line"), (".json", '{"lr": 0.1,,}', "line 1"), (".toml", "lr = = 1", "")],
)
def test_syntax_errors_name_the_file_in_one_line(tmp_path, capsys, suffix, text, where):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    file = tmp_path / f"bad{suffix}"
    file.write_text(text)
    assert main(["train", "--preset", "test", "--config", str(file), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and where in err and err.count("\n") == 1, err


def test_a_single_data_path_string_is_one_path_and_relative_paths_are_stored_resolved(tmp_path, monkeypatch):
    from switchformer.train.sources import build_config

    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "settings.toml").write_text('data = "corpus.txt"\n')
    monkeypatch.chdir(tmp_path)
    config = build_config("test", config_file="settings.toml")
    assert config.data == [str(tmp_path / "corpus.txt")]  # not a scan of "c", "o", "r", ...
    config = build_config("test", overrides={"data": ["corpus.txt"]})
    assert config.data == [str(tmp_path / "corpus.txt")]


def test_eval_and_generate_refuse_bad_numbers_before_any_output(trained, capsys):
    assert main(["eval", str(trained), "--batches", "-1"]) == 2
    assert "--batches: must be >= 1" in capsys.readouterr().err
    assert main(["generate", str(trained), "--prompt", "The", "--max-new-tokens", "1000000000000"]) == 2
    captured = capsys.readouterr()
    assert "max_new_tokens:" in captured.err and captured.out == ""  # nothing streamed before the error


def test_run_json_files_hold_strict_json(tmp_path):
    """NaN is not JSON: a run's JSON files write non-finite numbers as null."""
    from switchformer.runs.files import write_json_atomic
    from switchformer.runs.metrics_log import MetricsLog

    write_json_atomic(tmp_path / "summary.json", {"eval_loss": float("nan"), "x": [float("inf"), 1.0]})
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text) == {"eval_loss": None, "x": [None, 1.0]}
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": float("nan")})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None}


# ----------------------------------------------------------------------------- found by a new user's trial


def test_a_fresh_train_never_deletes_files_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "proj"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text('{"mine": 1}')
    (folder / "checkpoints" / "weights.bin").write_text("mine")
    before = snapshot(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    args = ["train", "--preset", "test", "--data", str(corpus), "--out-dir", str(tmp_path), "--run-name", "proj"]
    assert main([*args, "--no-progress", "--max-steps", "2"]) == 2
    assert "not a switchformer run" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(folder).items() if k != ".lock"} == before


def test_eval_on_a_users_file_scores_all_of_it(trained, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(TEXT * 3)
    assert main(["eval", str(trained), "--data", str(other), "--json"]) == 0
    every = json.loads(capsys.readouterr().out)["tokens"]
    assert main(["eval", str(trained), "--data", str(other), "--json", "--batches", "1"]) == 0
    one_batch = json.loads(capsys.readouterr().out)["tokens"]
    assert every > 2 * one_batch  # not the run's eval_batches (2) batches


@pytest.mark.parametrize(
    "command, message",
    [
        (lambda run, tmp: ["report", str(run), "--out", str(run / "plots")], "--out:"),
        (lambda run, tmp: ["convert", str(run), str(run / "hf")], "convert writes nothing into what it reads"),
        (lambda run, tmp: ["train", "--resume", str(next((run / "checkpoints").iterdir()))], "is a checkpoint"),
        (lambda run, tmp: ["train", "--resume", str(run), "--max-steps", "2"], "max_steps: 2 is below the step 4"),
        (lambda run, tmp: ["eval", str(run), "--device", "foo"], "--device: unknown device"),
        (lambda run, tmp: ["generate", str(run), "--prompt", "x", "--temperature", "nan"], "temperature:"),
        (lambda run, tmp: ["generate", str(run), "--prompt", "x", "--compile"], "--compile: only the static"),
    ],
)
def test_misuse_is_refused_in_one_line_and_writes_nothing(trained, tmp_path, capsys, command, message):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert main([*command(run, tmp_path), "--no-progress"] if command(run, tmp_path)[0] == "train" else
                command(run, tmp_path)) == 2  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("routing:")]
    assert len(err) == 1 and message in err[0], err
    assert snapshot(run) == before


def test_resume_without_the_runs_tokenizer_is_refused(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / "tokenizer.json").unlink()
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--no-progress", "--max-steps", "6"]) == 2
    assert "tokenizer.json: missing" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == before


@pytest.mark.parametrize("name", ["..", "a/b", "."])
def test_run_names_are_folder_names(name):
    from switchformer.train.sources import build_config

    with pytest.raises(ValueError, match="^run_name: .* must be a folder name"):
        build_config("test", sets=[f"run_name={name}"])


def test_a_tokenizer_larger_than_the_model_is_named(trained, tmp_path, capsys):
    from switchformer.data.tokenizer import train_tokenizer

    run = copy_run(trained, tmp_path)
    train_tokenizer([TEXT], 600, "bpe").save(str(run / "tokenizer.json"))  # the run's model has 400
    before = snapshot(run)
    for command in (["eval", str(run)], ["generate", str(run), "--prompt", "x"], ["train", "--resume", str(run)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.splitlines()[-1]
        assert "tokenizer.json" in err and "more than the model's vocab_size 400" in err, err
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["translate", "run", "--num-beams", "1.5"], "argument --num-beams: invalid int value: '1.5'"),
        (["translate", "run", "--no-repeat-ngram-size", "abc"], "argument --no-repeat-ngram-size: invalid int"),
        (["eval", "run", "--metric", "rouge"], "argument --metric: invalid choice: 'rouge'"),
        (["generate", "run", "--temperature", "hot"], "argument --temperature: invalid float value"),
        (["serve", "run", "--port", "http"], "argument --port: invalid int value"),
        (["translate"], "the following arguments are required: run"),
        (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["fly"], "argument command: invalid choice: 'fly'"),
    ],
)
def test_argument_errors_are_one_line_pointing_to_help(capsys, argv, message):
    """A flag's bad value, an unknown flag or a missing argument: one line, as every other error,
    naming the flag and where to read about it (argparse would print the whole usage first)."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, lines
    assert message in lines[0] and lines[0].startswith("switchformer") and lines[0].endswith("--help)")


@pytest.mark.parametrize("command", [["translate", "{d}", "-i", "{d}/in.txt"], ["eval", "{d}"]])
def test_a_hugging_face_directory_where_a_run_is_needed_says_how_to_make_one(tmp_path, capsys, command):
    hf = tmp_path / "switch-base-8"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "switch_transformers", "d_model": 8}))
    (hf / "in.txt").write_text("hallo\n")
    assert main([part.format(d=hf) for part in command]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line]
    assert len(err) == 1 and "a Hugging Face model directory, not a switchformer run" in err[0], err
    assert f"switchformer convert {hf} RUN" in err[0]
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "in.txt"]


def test_generate_reads_a_hugging_face_directory_and_names_its_missing_weights(tmp_path, capsys):
    # generate (like serve) takes a Hugging Face directory as it is: one without weights is one
    # line naming what is missing, and the directory is left as it was
    hf = tmp_path / "switch-base-8"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "switch_transformers", "d_model": 8}))
    assert main(["generate", str(hf), "--prompt", "hi"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and str(hf) in err[0] and "model.safetensors" in err[0] and "pytorch_model.bin" in err[0], err
    assert sorted(p.name for p in hf.iterdir()) == ["config.json"]
