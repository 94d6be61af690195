"""Per-language routing report: shares against a naive per-pair count; specialisation in bits."""

from __future__ import annotations

import math

import pytest
import torch

from switchformer.analysis.routing_report import (
    expert_shares,
    format_shares,
    group_by_source_language,
    plot_shares,
    specialisation_bits,
)
from switchformer.data.formatting import Pair
from switchformer.data.tokenizer import special_ids, train_tokenizer
from switchformer.inference.routing import inference_routing
from switchformer.train.run import build_model
from switchformer.train.sources import build_config

pytestmark = [pytest.mark.slow]

WORDS = {"de": "hund katze haus baum", "fr": "chien chat maison arbre", "en": "dog cat house tree"}


def _pairs() -> list[Pair]:
    pairs = []
    for i in range(7):
        for lang in ("de", "fr"):
            words = WORDS[lang].split()
            source = " ".join(words[(i + j) % 4] for j in range(1 + i % 3))
            target = " ".join(WORDS["en"].split()[(i + j) % 4] for j in range(1 + i % 3))
            pairs.append(Pair(source, target, lang, "en"))
    return pairs


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = build_config(
        "test",
        overrides={"model": "t5", "objective": "seq2seq", "source_prefix": "<{source_lang}> ", "batch_size": 3},
    )
    pairs = _pairs()
    tok = train_tokenizer([t for p in pairs for t in p[:2]], 400)
    model = build_model(config, tok.get_vocab_size()).eval()
    return config, tok, model, pairs


def test_shares_equal_a_naive_count_pair_by_pair(setup):
    config, tok, model, pairs = setup
    groups = group_by_source_language(pairs)
    assert list(groups) == ["de", "fr"]
    shares = expert_shares(model, tok, config, groups, torch.device("cpu"))
    eos = special_ids(tok)["eos"]
    for lang, group in groups.items():
        counts: dict[str, torch.Tensor] = {}
        with torch.no_grad(), inference_routing(model, "dropless"):
            for pair in group:  # one pair at a time, formatted by hand as training formats it
                source = tok.encode(f"<{lang}> {pair.source}").ids + [eos]
                target = tok.encode(pair.target).ids + [eos]
                out = model(torch.tensor([source]), labels=torch.tensor([target]))
                for name, aux in out.router_stats.layers:
                    counts[name] = counts.get(name, 0) + aux.tokens_per_expert.double()
        assert set(shares[lang]) == set(counts)
        for name, count in counts.items():
            torch.testing.assert_close(torch.tensor(shares[lang][name], dtype=torch.float64), count / count.sum())


def test_specialisation_bits():
    own = {"de": {"l": [0.5, 0.5, 0, 0]}, "fr": {"l": [0, 0, 0.5, 0.5]}}
    assert specialisation_bits(own, "l") == pytest.approx(1.0)
    same = {"de": {"l": [0.25] * 4}, "fr": {"l": [0.25] * 4}, "cs": {"l": [0.25] * 4}}
    assert specialisation_bits(same, "l") == pytest.approx(0.0, abs=1e-12)
    three = {g: {"l": [float(i == k) for i in range(3)]} for k, g in enumerate(["a", "b", "c"])}
    assert specialisation_bits(three, "l") == pytest.approx(math.log2(3))
    assert "1.000 bits" in format_shares(own)


def test_pairs_without_language_are_refused():
    with pytest.raises(ValueError, match="source language"):
        group_by_source_language([Pair("a", "b")])


def test_plot_is_written(setup, tmp_path):
    config, tok, model, pairs = setup
    shares = expert_shares(model, tok, config, group_by_source_language(pairs), torch.device("cpu"))
    path = plot_shares(shares, tmp_path / "routing_by_language.png")
    assert path.stat().st_size > 1000


def _train(tmp_path, name: str, rows: list[dict], *extra: str):
    import json

    from switchformer.cli import main

    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = ["train", "--preset", "test", "--model", "t5", "--set", "objective=seq2seq", "--data", str(data)]
    args += ["--out-dir", str(tmp_path), "--run-name", name, "--max-steps", "2", "--no-progress", *extra]
    assert main(args) == 0
    return tmp_path / name


def test_report_by_language_through_the_cli(tmp_path, capsys):
    import hashlib
    import json

    from switchformer.cli import main

    rows = [{"source": p.source, "target": p.target, "source_lang": p.source_lang} for p in _pairs() * 3]
    run = _train(tmp_path, "multi", rows, "--set", "source_prefix=<{source_lang}> ")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", str(run), "--by-language", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "language-expert mutual information" in printed and "routing_by_language.png" in printed
    summary = json.loads((out / "routing_by_language.json").read_text())
    assert set(summary["shares"]) == {"de", "fr"} and sum(summary["pairs"].values()) > 0
    for lang in summary["shares"].values():
        for shares in lang.values():
            assert sum(shares) == pytest.approx(1.0)
    assert (out / "routing_by_language.png").stat().st_size > 1000 and (out / "loss.png").exists()
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert after == before  # reading a run never writes into it


def test_report_by_language_refuses_what_it_cannot_report(tmp_path, capsys):
    from switchformer.cli import main

    rows = [{"source": p.source, "target": p.target} for p in _pairs() * 3]  # no languages
    run = _train(tmp_path, "plain", rows)
    assert main(["report", str(run), "--by-language", "--out", str(tmp_path / "r1")]) == 2
    assert "carry no source language" in capsys.readouterr().err
    dense = _train(tmp_path, "dense", rows, "--set", "sparse_step=0")
    assert main(["report", str(dense), "--by-language", "--out", str(tmp_path / "r2")]) == 2
    assert "no Switch layer" in capsys.readouterr().err
    assert main(["report", str(run), "--data", "x.jsonl", "--out", str(tmp_path / "r3")]) == 2
    assert "only with --by-language" in capsys.readouterr().err


def test_report_by_language_needs_two_languages(tmp_path, capsys):
    from switchformer.cli import main

    rows = [{"source": p.source, "target": p.target, "source_lang": "de"} for p in _pairs() * 3]
    run = _train(tmp_path, "one", rows)
    assert main(["report", str(run), "--by-language", "--out", str(tmp_path / "r")]) == 2
    assert "--by-language: the pairs hold one source language (de)" in capsys.readouterr().err
