"""Integration on real data: a slice of Multi30k (../shared/data/multi30k, gzipped
line-aligned captions) through the CLI: a multilingual {de, fr} -> en run trained a few hundred
steps, ``translate``, ``eval --metric bleu chrf`` with per-language scores, ``report --by-language``.
Skipped, saying why, when the data folder is absent."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from shared import SHARED_DATA

from switchformer.cli import main

sacrebleu = pytest.importorskip("sacrebleu")

DATA = SHARED_DATA / "multi30k"
pytestmark = [
    pytest.mark.skipif(
        not (DATA / "train.de.gz").exists(), reason=f"Multi30k is not at {DATA} (see the issue's shared data)"
    ),
    pytest.mark.slow,
]

TRAIN_LINES, VALID_LINES = 3000, 60


def _slice(name: str, lines: int, out: Path) -> Path:
    """The first ``lines`` lines of ``DATA/name``, gzipped again under ``out`` (same file name)."""
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        head = [next(f) for _ in range(lines)]
    target = out / name
    with gzip.open(target, "wt", encoding="utf-8") as f:
        f.writelines(head)
    return target


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multi30k")
    train = [_slice(f"train.{lang}.gz", TRAIN_LINES, root) for lang in ("de", "fr", "en")]
    valid = [_slice(f"val.{lang}.gz", VALID_LINES, root) for lang in ("de", "fr", "en")]
    args = ["train", "--preset", "test", "--model", "t5", "--set", "objective=seq2seq", "--no-progress"]
    args += ["--data", *map(str, train), "--valid", *map(str, valid), "--target-lang", "en"]
    args += ["--set", "source_prefix=<{source_lang}> ", "--set", "d_model=64", "--set", "d_ff=128"]
    args += [
        "--set",
        "num_heads=4",
        "--set",
        "vocab_size=2000",
        "--set",
        "seq_len=64",
        "--set",
        "batch_size=32",
        "--max-steps",
        "300",
    ]
    args += ["--set", "warmup_steps=30", "--set", "eval_every=100", "--set", "checkpoint_every=300"]
    args += ["--set", "label_smoothing=0.1", "--out-dir", str(root), "--run-name", "run"]
    assert main(args) == 0
    return root / "run", root


def test_it_learns_and_every_command_reads_the_run(run, tmp_path, capsys):
    run_dir, root = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    # the validation loss falls at every evaluation, far below a uniform guess (log 2000 = 7.6)
    assert evals == sorted(evals, reverse=True) and evals[-1] < math.log(2000) - 2.5, evals

    # translate the German validation captions; eval --metric scores the same sentences identically
    # (dropless: under a capacity factor, which tokens overflow depends on a batch's other sentences,
    # and eval batches German with French)
    german = [line.rstrip("\n") for line in gzip.open(root / "val.de.gz", "rt", encoding="utf-8")]
    english = [line.rstrip("\n") for line in gzip.open(root / "val.en.gz", "rt", encoding="utf-8")]
    source = tmp_path / "val.de"
    source.write_text("\n".join(german) + "\n", encoding="utf-8")
    hyp = tmp_path / "hyp.en"
    capsys.readouterr()
    args = ["translate", str(run_dir), "--input", str(source), "--output", str(hyp), "--source-lang", "de"]
    assert main([*args, "--no-progress", "--routing", "dropless"]) == 0
    hypotheses = hyp.read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == VALID_LINES and all(h.strip() for h in hypotheses)
    assert (
        main(["eval", str(run_dir), "--metric", "bleu", "chrf", "--json", "--no-progress", "--routing", "dropless"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["translated_pairs"] == 2 * VALID_LINES
    assert set(report["by_source_lang"]) == {"de", "fr"}
    german_bleu = sacrebleu.corpus_bleu(hypotheses, [english]).score
    assert report["by_source_lang"]["de"]["bleu"] == pytest.approx(german_bleu, abs=1e-6)
    assert 0 < report["chrf"] < 100 and report["chrf_signature"].startswith("nrefs:1|case:mixed")

    assert main(["report", str(run_dir), "--by-language", "--out", str(tmp_path / "report")]) == 0
    shares = json.loads((tmp_path / "report" / "routing_by_language.json").read_text())["shares"]
    assert set(shares) == {"de", "fr"}
