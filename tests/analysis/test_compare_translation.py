"""``compare`` on a translation task: both models scored with BLEU and chrF on
the validation pairs, per source language for a multilingual task, the same figures ``eval
--metric`` gives for each run."""

from __future__ import annotations

import json
import random

import pytest

from switchformer.cli import main

pytestmark = [pytest.mark.slow]

pytest.importorskip("sacrebleu")

WORDS = {
    "xa": "ka lu mi po re su ti vo".split(),
    "xb": "da fe gi ho ju ne sa wu".split(),
}
TARGET = "zap wol kin dret flum grop hask jilt".split()


def multilingual_rows(n: int, seed: int) -> list[dict]:
    """Two invented source languages mapped word by word onto one target language."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lang = ("xa", "xb")[i % 2]
        index = [rng.randrange(8) for _ in range(rng.randint(2, 4))]
        rows.append(
            {
                "source": " ".join(WORDS[lang][j] for j in index),
                "target": " ".join(TARGET[j] for j in index),
                "source_lang": lang,
            }
        )
    return rows


def test_compare_scores_both_models_per_language_as_eval_does(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in multilingual_rows(300, 0)), encoding="utf-8")
    args = ["compare", "--preset", "test", "--model", "t5", "--data", str(data), "--no-progress"]
    args += ["--set", "objective=seq2seq", "--set", "source_prefix=<{source_lang}> ", "--max-steps", "6"]
    args += ["--out-dir", str(tmp_path), "--run-name", "cmp", "--set", "validation_fraction=0.1"]
    assert main(args) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "val BLEU | val chrF |" in table
    assert "| source language | pairs | switch BLEU | dense BLEU |" in table
    assert "| xa | 15 |" in table and "| xb | 15 |" in table
    assert "BLEU: sacrebleu nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in table
    capsys.readouterr()
    for name in ("switch", "dense"):
        assert main(["eval", str(tmp_path / "cmp" / name), "--metric", "bleu", "chrf", "--json", "--no-progress"]) == 0
        report = json.loads(capsys.readouterr().out)
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[-2]) == pytest.approx(report["bleu"], abs=0.005)
        assert float(cells[-1]) == pytest.approx(report["chrf"], abs=0.005)
        assert set(report["by_source_lang"]) == {"xa", "xb"}


def test_compare_on_a_translation_task_needs_sacrebleu_before_training(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_sacrebleu(name, *args, **kwargs):
        if name == "sacrebleu" or name.startswith("sacrebleu."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sacrebleu)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in multilingual_rows(40, 1)), encoding="utf-8")
    args = ["compare", "--preset", "test", "--model", "t5", "--data", str(data), "--no-progress"]
    args += ["--set", "objective=seq2seq", "--out-dir", str(tmp_path), "--run-name", "cmp"]
    assert main(args) == 2
    assert "pip install 'switchformer[metrics]'" in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "switch" / "metrics.jsonl").exists()  # refused before any training


def test_the_mt_small_preset_is_a_translation_setup(capsys):
    from switchformer.train.presets import PRESETS
    from switchformer.train.sources import build_config

    config = build_config("mt-small", overrides={"data": ["train.de", "train.en"]})
    assert (config.model, config.resolved_objective, config.num_beams) == ("t5", "seq2seq", 4)
    assert config.capacity_factor is None and config.label_smoothing > 0 and config.sparse_step > 0
    assert set(PRESETS["mt-small"]) <= set(config.to_dict())
    assert main(["info", "--preset", "mt-small"]) == 0
    out = capsys.readouterr().out
    assert "preset mt-small: t5" in out and "experts per Switch layer: 8" in out
