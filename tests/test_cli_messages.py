"""What the command line says when it cannot do what it is asked: one line that names the flag,
the file or the setting at fault; nothing printed as if the work had started; nothing left behind."""

from __future__ import annotations

import errno
import io
import os

import pytest

from switchformer.cli import main, os_error_message


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus.txt"
    corpus.write_text("Experts share the work of every token routed to them.\n" * 300)
    args = ["train", "--preset", "test", "--data", str(corpus), "--no-progress", "--out-dir", str(root)]
    assert main([*args, "--run-name", "run", "--max-steps", "2", "--set", "vocab_size=400"]) == 0
    return root / "run"


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("switchformer: error: "), captured.err
    assert "[Errno" not in lines[0] and "Traceback" not in captured.err
    return lines[0]


def _pairs(tmp_path, source_lines: int, target_lines: int):
    (tmp_path / "m.de").write_text("ein Hund läuft\n" * source_lines)
    (tmp_path / "m.en").write_text("a dog runs\n" * target_lines)
    return [str(tmp_path / "m.de"), str(tmp_path / "m.en")]


@pytest.mark.parametrize(
    "case", ["mismatched pairs", "missing data file", "empty data file", "unknown device", "unknown source language"]
)
def test_a_train_that_cannot_start_leaves_no_folder_and_claims_no_start(tmp_path, capsys, case):
    out_dir = tmp_path / "out"
    argv = ["train", "--preset", "test", "--max-steps", "1", "--out-dir", str(out_dir), "--no-progress"]
    t5 = ["--model", "t5", "--set", "objective=seq2seq"]
    if case == "mismatched pairs":
        argv += [*t5, "--data", *_pairs(tmp_path, 10, 9)]
    elif case == "missing data file":
        argv += ["--data", str(tmp_path / "nothing.txt")]
    elif case == "empty data file":
        (tmp_path / "empty.txt").write_text("")
        argv += ["--data", str(tmp_path / "empty.txt")]
    elif case == "unknown device":
        argv += ["--device", "tpu"]
    else:
        argv += [*t5, "--data", *_pairs(tmp_path, 10, 10), "--source-lang", "xx"]
    error_of(capsys, argv)
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.rglob("*"))
    assert "training " not in capsys.readouterr().out


def test_a_resume_refused_says_nothing_of_training(run, capsys):
    message = error_of(capsys, ["train", "--resume", str(run), "--max-steps", "1", "--no-progress"])
    assert "max_steps" in message


def test_os_errors_name_the_path_in_words(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("x")
    raised = []
    for action in (lambda: open(folder), lambda: os.mkdir(folder), lambda: open(file / "inner", "w")):
        try:
            action()
        except OSError as err:
            raised.append(err)
    assert [err.errno for err in raised] == [errno.EISDIR, errno.EEXIST, errno.ENOTDIR]
    for err in raised:
        message = os_error_message(err)
        assert message.startswith(str(err.filename) + ": ") and "[Errno" not in message
    assert os_error_message(ValueError("x")) is None
    assert os_error_message(FileNotFoundError("data: x: no such file")) is None  # our own words are kept


def test_setting_errors_name_the_setting_the_user_gave(capsys):
    assert "(from --set lr=abc)" in error_of(capsys, ["train", "--preset", "test", "--set", "lr=abc"])
    message = error_of(capsys, ["train", "--preset", "test", "--set", "d_model=7"])
    assert "d_model from --set d_model=7" in message


def test_a_folder_given_as_config_file(tmp_path, capsys):
    assert "--config:" in error_of(capsys, ["train", "--config", str(tmp_path)])


@pytest.mark.parametrize(
    "command",
    [
        ["info", "{}"],
        ["eval", "{}"],
        ["generate", "{}", "--prompt", "hi"],
        ["translate", "{}", "--input", "{in}"],
        ["convert", "{}", "{out}"],
        ["report", "{}"],
        ["serve", "{}", "--port", "1"],
    ],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_a_run_path_that_is_missing_or_a_file_is_named(tmp_path, capsys, command, kind):
    given = tmp_path / ("nothing" if kind == "missing" else "notes.txt")
    if kind == "a file":
        given.write_text("not a run\n")
    (tmp_path / "in.txt").write_text("hallo\n")
    argv = [a.format(given, **{"in": tmp_path / "in.txt", "out": tmp_path / "hf"}) for a in command]
    message = error_of(capsys, argv)
    assert f"{given}:" in message and "config.json" not in message and "metrics.jsonl" not in message
    assert ("not found" if kind == "missing" else ": a file") in message


def test_generate_refuses_bad_sampling_before_loading_anything(run, capsys):
    flag_sets = (["--temperature", "-1"], ["--top-p", "2"], ["--max-new-tokens", "0"], ["--num-beams", "0"],
                 ["--seed", str(2**64)], ["--seed", str(-(2**63) - 1)])  # fmt: skip
    for flags in flag_sets:
        assert main(["generate", str(run), "--prompt", "hi", *flags]) == 2
        err = capsys.readouterr().err
        assert "routing" not in err and err.count("\n") == 1, err
        assert flags[0].removeprefix("--").replace("-", "_") in err.replace("-", "_"), err  # the flag named


def test_generate_refuses_empty_standard_input_before_loading(run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"  \n")))
    line = error_of(capsys, ["generate", str(run)])
    assert "prompt: give --prompt or text on standard input" in line


def test_info_refuses_a_layout_before_printing_it(run, capsys):
    assert main(["info", "--preset", "compare", "--world-size", "3", "--expert-parallel", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "expert_parallel" in captured.err
    assert "--preset" in error_of(capsys, ["info", str(run), "--preset", "tiny"])
