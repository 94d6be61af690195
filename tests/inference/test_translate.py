"""Translation: ``translate`` (library and command), ``generate`` on a
seq2seq run, ``eval --metric bleu chrf``, the sacrebleu wrapper, and every bad input named in one
line. A synthetic task that a small model learns in seconds: a word-by-word mapping between two
invented vocabularies."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from switchformer.cli import main
from switchformer.data.formatting import Pair
from switchformer.inference.translation import decode_output, encode_sources, one_line, translate
from switchformer.models import SwitchT5, SwitchT5Config
from switchformer.train.run import load_run

sacrebleu = pytest.importorskip("sacrebleu")

from shared import TRAIN_FLAGS, mapping_pairs, write_jsonl  # noqa: E402

pytestmark = [pytest.mark.slow]


def stderr_lines(captured) -> list[str]:
    """Error lines: without the informational ``routing:`` line that ``generate`` prints first."""
    return [line for line in captured.err.splitlines() if line and not line.startswith("routing:")]


@pytest.fixture(scope="module")
def mapping_run(tmp_path_factory) -> Path:
    """A seq2seq run trained through the CLI on 2,000 word-mapping pairs (about 10 s on one thread);
    its validation split is the first 200 pairs."""
    root = tmp_path_factory.mktemp("mapping")
    data = write_jsonl(root / "pairs.jsonl", mapping_pairs(2000, seed=0))
    args = ["train", *TRAIN_FLAGS, "--data", str(data), "--out-dir", str(root), "--run-name", "run"]
    args += ["--max-steps", "400", "--set", "warmup_steps=20", "--set", "batch_size=32", "--set", "d_model=64"]
    args += ["--set", "d_ff=128", "--set", "num_heads=4", "--set", "vocab_size=600"]
    assert main(args) == 0
    return root / "run"


@pytest.fixture(scope="module")
def validation(mapping_run) -> list[dict]:
    return mapping_pairs(2000, seed=0)[:200]


@pytest.fixture(scope="module")
def loaded(mapping_run):
    return load_run(mapping_run)


@pytest.fixture(scope="module")
def span_run(tmp_path_factory) -> Path:
    """A span-corruption T5 run of two steps: translate and --metric refuse it."""
    root = tmp_path_factory.mktemp("span")
    corpus = root / "corpus.txt"
    corpus.write_text("A router sends each token to one expert. Capacity limits the load.\n" * 40)
    args = ["train", "--preset", "test", "--model", "t5", "--data", str(corpus), "--no-progress"]
    assert main([*args, "--out-dir", str(root), "--run-name", "run", "--max-steps", "2"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def multilingual_run(tmp_path_factory) -> Path:
    """A seq2seq run of two steps whose prefix names the source language (``<xa>ka lu``)."""
    root = tmp_path_factory.mktemp("multi")
    rows = [dict(row, source_lang=lang) for row, lang in zip(mapping_pairs(80, 1), ["xa", "xb"] * 40)]
    data = write_jsonl(root / "pairs.jsonl", rows)
    args = ["train", *TRAIN_FLAGS, "--data", str(data), "--out-dir", str(root), "--run-name", "run"]
    assert main([*args, "--max-steps", "2", "--set", "source_prefix=<{source_lang}>"]) == 0
    return root / "run"


# ----------------------------------------------------------------------------- it learns, end to end


def test_translate_command_reaches_a_high_bleu(mapping_run, validation, tmp_path, capsys):
    source = tmp_path / "valid.src"
    source.write_text("".join(row["source"] + "\n" for row in validation), encoding="utf-8")
    hyp = tmp_path / "hyp.txt"
    assert main(["translate", str(mapping_run), "--input", str(source), "--output", str(hyp), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "translated 200 lines" in err and "sentences/s" in err
    hypotheses = hyp.read_text(encoding="utf-8").split("\n")
    assert hypotheses[-1] == "" and len(hypotheses) == 201  # one line per input line, each ended
    bleu = sacrebleu.corpus_bleu(hypotheses[:-1], [[row["target"] for row in validation]]).score
    assert bleu >= 60, bleu

    # eval --metric translates the same pairs the same way and scores them with sacrebleu
    assert main(["eval", str(mapping_run), "--metric", "bleu", "chrf", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["translated_pairs"] == 200
    assert report["bleu"] == pytest.approx(bleu, abs=1e-9)
    chrf = sacrebleu.corpus_chrf(hypotheses[:-1], [[row["target"] for row in validation]]).score
    assert report["chrf"] == pytest.approx(chrf, abs=1e-9)
    assert report["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert "nc:6" in report["chrf_signature"]
    assert report["eval_loss"] is not None and report["perplexity"] is not None
    decoding = {"num_beams": 1, "length_penalty": 1.0, "max_new_tokens": 32, "no_repeat_ngram_size": 0}
    assert report["decoding"] == decoding
    assert "by_source_lang" not in report  # one source language

    # the readable summary: sacrebleu's lines with their signatures beside loss and perplexity
    assert main(["eval", str(mapping_run), "--metric", "bleu", "--no-progress", "--num-beams", "2"]) == 0
    text = capsys.readouterr().out
    assert "validation loss" in text and "BLEU = " in text and "tok:13a" in text and "2 beams" in text


def test_eval_metric_on_a_test_file_scores_each_source_language(mapping_run, tmp_path, capsys):
    rows = [dict(row, source_lang=lang) for row, lang in zip(mapping_pairs(30, 7), ["xa", "xb", "xb"] * 10)]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    assert main(["eval", str(mapping_run), "--data", str(data), "--metric", "bleu", "chrf", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, tokenizer, config = load_run(mapping_run)
    hypotheses = list(translate(model, tokenizer, config, [row["source"] for row in rows]))
    assert report["translated_pairs"] == 30
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [[r["target"] for r in rows]]).score)
    for lang, count in (("xa", 10), ("xb", 20)):
        index = [i for i, row in enumerate(rows) if row["source_lang"] == lang]
        refs = [[rows[i]["target"] for i in index]]
        group = report["by_source_lang"][lang]
        assert group["pairs"] == count
        assert group["bleu"] == pytest.approx(sacrebleu.corpus_bleu([hypotheses[i] for i in index], refs).score)
        assert group["chrf"] == pytest.approx(sacrebleu.corpus_chrf([hypotheses[i] for i in index], refs).score)


# ----------------------------------------------------------------------------- batching changes nothing


def row_by_row(model, tokenizer, config, sources, **settings) -> list[str]:
    """Each source alone through ``model.generate``: what batched translation must reproduce."""
    out = []
    for source in sources:
        if not source.strip():
            out.append("")
            continue
        ids = torch.tensor(encode_sources(tokenizer, config, [source]))
        row = model.generate(ids, do_sample=False, **settings)[0, 1:].tolist()
        out.append(decode_output(tokenizer, row, 1))
    return out


def mixed_sources() -> list[str]:
    rows = mapping_pairs(17, seed=3)
    sources = [row["source"] for row in rows]
    sources[2] = "ka"  # a one-word source among longer ones
    sources[5] = " ".join(["lu", "mi"] * 9)  # longer than anything trained on
    sources.insert(4, "")  # empty lines keep their place
    sources.insert(9, "   ")
    return sources


@pytest.mark.parametrize("num_beams", [1, 3])
def test_translate_equals_generate_row_by_row_in_input_order(loaded, num_beams):
    model, tokenizer, config = loaded
    sources = mixed_sources()
    settings = dict(num_beams=num_beams, length_penalty=0.8, max_new_tokens=12, routing="dropless")
    want = row_by_row(model, tokenizer, config, sources, **settings)
    got = list(translate(model, tokenizer, config, sources, batch_size=3, buffer_size=7, **settings))
    assert got == want
    assert got[4] == got[9] == "" and all(got[i] for i in range(len(got)) if i not in (4, 9))
    assert len(set(got)) > 10  # real, different translations


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batches_equal_rows_under_per_sequence_capacity_on_a_random_model(loaded, num_beams):
    """A random model routing as Hugging Face imports do (an absolute ``expert_capacity`` per
    sequence, small enough to drop tokens): its own eval routing gives the same tokens batched."""
    _, tokenizer, config = loaded
    torch.manual_seed(0)
    model_config = SwitchT5Config(
        vocab_size=tokenizer.get_vocab_size(),
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        num_experts=4,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        expert_capacity=2,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
    )
    model = SwitchT5(model_config).eval()
    sources = mixed_sources()
    settings = dict(num_beams=num_beams, length_penalty=1.0, max_new_tokens=6, routing="eval")
    want = row_by_row(model, tokenizer, config, sources, **settings)
    assert list(translate(model, tokenizer, config, sources, batch_size=4, buffer_size=100, **settings)) == want


def test_sources_are_formatted_as_the_training_rows(loaded):
    """Prefix with the languages, truncation to seq_len - 1 tokens, EOS: the rows training built."""
    from dataclasses import replace

    from switchformer.train.data import split_from_documents

    _, tokenizer, config = loaded
    config = replace(config, source_prefix="translate {source_language} to {target_language}: ")
    pairs = [Pair("ka lu", "zap wol", "de", "en"), Pair(" ".join(["mi"] * 60), "kin", "fr", "en"), Pair("po", "x")]
    pairs[2] = Pair("po", "dret", "cs", "en")
    rows = split_from_documents(tokenizer, pairs, config, 0)
    for i, pair in enumerate(pairs):
        want = [t for t, m in zip(rows.tensors["input_ids"][i].tolist(), rows.tensors["attention_mask"][i]) if m]
        assert encode_sources(tokenizer, config, [pair]) == [want]
        assert encode_sources(tokenizer, config, [pair.source], pair.source_lang, pair.target_lang) == [want]
    assert len(encode_sources(tokenizer, config, [pairs[1]])[0]) == config.seq_len
    assert tokenizer.decode(encode_sources(tokenizer, config, [pairs[0]])[0]).startswith("translate German to English")


def test_a_translation_is_always_one_line():
    assert one_line("a\nb\r\nc\u2028d") == "a b  c d"

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "two\nlines"

    assert decode_output(Tok(), [5, 6, 1, 7], eos=1) == "two lines"


# ----------------------------------------------------------------------------- the command


def test_translate_reads_stdin_writes_stdout_and_keeps_line_alignment(mapping_run, loaded, monkeypatch, capsys):
    model, tokenizer, config = loaded
    sources = ["ka lu mi", "", "po re su ti", "vo"]
    data = "\r\n".join(sources).encode("utf-8")  # CRLF line ends, no newline after the last line
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    # batches of 2 against translate's default 32: equal where no token is dropped (dropless), as promised
    args = ["translate", str(mapping_run), "--no-progress", "--batch-size", "2", "--buffer-size", "3"]
    assert main([*args, "--routing", "dropless"]) == 0
    out = capsys.readouterr().out
    assert out.split("\n") == [*translate(model, tokenizer, config, sources, routing="dropless"), ""]
    assert out.split("\n")[1] == "" and out.split("\n")[0] == "zap wol kin"


def test_translate_decoding_flags(mapping_run, loaded, tmp_path, capsys):
    model, tokenizer, config = loaded
    source = tmp_path / "in.txt"
    sources = ["ka lu mi po", "re su", "ti vo ze bo da"]
    source.write_text("\n".join(sources) + "\n", encoding="utf-8")
    args = ["translate", str(mapping_run), "-i", str(source), "--no-progress", "--num-beams", "3"]
    assert main([*args, "--length-penalty", "0.5", "--max-new-tokens", "3", "--routing", "dropless"]) == 0
    captured = capsys.readouterr()
    want = row_by_row(model, tokenizer, config, sources, num_beams=3, length_penalty=0.5, max_new_tokens=3,
                      routing="dropless")  # fmt: skip
    assert captured.out.splitlines() == want
    assert all(len(line.split()) <= 3 for line in want)
    assert "beam search (3 beams, length penalty 0.5), at most 3 new tokens" in captured.err
    repeating = ["ka ka ka ka ka ka", "lu mi lu mi lu mi lu mi"]  # their translations repeat n-grams
    source.write_text("\n".join(repeating) + "\n", encoding="utf-8")
    # a batch against each row alone: equal where no token is dropped by capacity (dropless), as promised
    for beams in ("1", "3"):
        args = ["translate", str(mapping_run), "-i", str(source), "--no-progress", "--num-beams", beams,
                "--routing", "dropless"]  # fmt: skip
        assert main(args) == 0
        free = capsys.readouterr().out.splitlines()
        assert main([*args, "--no-repeat-ngram-size", "2"]) == 0
        captured = capsys.readouterr()
        want = row_by_row(model, tokenizer, config, repeating, num_beams=int(beams), no_repeat_ngram_size=2,
                          routing="dropless")  # fmt: skip
        assert captured.out.splitlines() == want != free
        assert "no repeated 2-gram" in captured.err


def test_a_multilingual_run_takes_the_source_language(multilingual_run, tmp_path, capsys):
    model, tokenizer, config = load_run(multilingual_run)
    assert config.source_prefix == "<{source_lang}>"
    source = tmp_path / "in.txt"
    source.write_text("ka lu\nmi\n", encoding="utf-8")
    args = ["translate", str(multilingual_run), "-i", str(source), "--no-progress", "--max-new-tokens", "3"]
    assert main([*args, "--source-lang", "xb"]) == 0
    out = capsys.readouterr().out.splitlines()
    sources = [Pair("ka lu", "", "xb"), Pair("mi", "", "xb")]
    assert out == list(translate(model, tokenizer, config, sources, max_new_tokens=3))
    assert tokenizer.decode(encode_sources(tokenizer, config, ["mi"], "xb")[0]) == "<xb>mi"


def test_translate_eval_and_generate_leave_the_run_byte_identical(mapping_run, tmp_path, capsys):
    import hashlib

    def snapshot() -> dict[str, str]:
        files = sorted(p for p in mapping_run.rglob("*") if p.is_file())
        return {str(p): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(p.stat().st_mode)}" for p in files}

    source = tmp_path / "in.txt"
    source.write_text("ka lu\nmi po\n", encoding="utf-8")
    before = snapshot()
    for command in (
        ["translate", str(mapping_run), "-i", str(source), "-o", str(tmp_path / "out.txt"), "--no-progress"],
        ["eval", str(mapping_run), "--metric", "bleu", "chrf", "--batches", "1", "--no-progress"],
        ["generate", str(mapping_run), "--prompt", "ka lu", "--num-beams", "2"],
    ):
        assert main(command) == 0, command
        assert snapshot() == before, f"{command[0]} wrote into the run"
    capsys.readouterr()


# ----------------------------------------------------------------------------- generate on a seq2seq run


def test_generate_on_a_seq2seq_run_translates_deterministically(mapping_run, loaded, capsys):
    model, tokenizer, config = loaded
    want = next(translate(model, tokenizer, config, ["ka lu mi po"]))
    for _ in range(2):  # greedy: the same every time, the source formatted as in training (no sentinel)
        assert main(["generate", str(mapping_run), "--prompt", "ka lu mi po"]) == 0
        assert capsys.readouterr().out == want + "\n"
    assert main(["generate", str(mapping_run), "--prompt", "ka lu mi po", "--num-beams", "3"]) == 0
    assert capsys.readouterr().out == next(translate(model, tokenizer, config, ["ka lu mi po"], num_beams=3)) + "\n"
    # an explicit sampling setting samples (seeded), without the span-corruption defaults
    assert main(["generate", str(mapping_run), "--prompt", "ka lu", "--temperature", "5.0", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(mapping_run), "--prompt", "ka lu", "--temperature", "5.0", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_generate_text_defaults_follow_the_objective(loaded, monkeypatch):
    """Seq2seq: greedy, no repetition penalty, the run's beams; span corruption keeps sampling."""
    from dataclasses import replace

    from switchformer.inference.text import generate_text

    model, tokenizer, config = loaded
    calls = []
    original = SwitchT5.generate

    def spy(self, input_ids, attention_mask=None, **kwargs):
        calls.append((input_ids[0].tolist(), kwargs))
        return original(self, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(SwitchT5, "generate", spy)
    run_decoding = replace(config, num_beams=2, length_penalty=0.7, no_repeat_ngram_size=3)
    generate_text(model, tokenizer, "ka lu", config=run_decoding)
    ids, kwargs = calls.pop()
    assert ids == encode_sources(tokenizer, config, ["ka lu"])[0]  # no <extra_id_0>
    assert kwargs["do_sample"] is False and kwargs["repetition_penalty"] == 1.0
    assert (kwargs["num_beams"], kwargs["length_penalty"], kwargs["max_new_tokens"]) == (2, 0.7, config.seq_len)
    assert kwargs["no_repeat_ngram_size"] == 3
    generate_text(model, tokenizer, "ka lu", config=run_decoding, no_repeat_ngram_size=0)
    assert calls.pop()[1]["no_repeat_ngram_size"] == 0  # a given value wins over the run's
    generate_text(model, tokenizer, "ka lu", 4, config=replace(run_decoding, objective="span_corruption"))
    ids, kwargs = calls.pop()
    assert ids[-2:] == [tokenizer.token_to_id("<extra_id_0>"), 1]
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.8 and kwargs["repetition_penalty"] == 1.1
    assert kwargs["no_repeat_ngram_size"] == 3  # the run's, whatever its objective
    generate_text(model, tokenizer, "ka lu", 4)
    assert calls.pop()[1]["no_repeat_ngram_size"] == 0  # no run: off


# ----------------------------------------------------------------------------- metrics


def test_metrics_equal_sacrebleu_on_known_strings():
    from switchformer.analysis.metrics import corpus_scores, scores_by_group

    hyps = ["the cat sat on the mat", "a dog runs in the park today", "hello world", "completely different words"]
    refs = ["the cat sat on a mat", "the dog runs in the park", "hello there world", "nothing in common"]
    scores = corpus_scores(hyps, refs, ["bleu", "chrf"])
    assert scores["bleu"]["score"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert scores["chrf"]["score"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert scores["bleu"]["text"] == str(sacrebleu.corpus_bleu(hyps, [refs]))
    for name, metric in (("bleu", sacrebleu.metrics.BLEU()), ("chrf", sacrebleu.metrics.CHRF())):
        metric.corpus_score(hyps, [refs])
        assert scores[name]["signature"] == str(metric.get_signature())
    assert corpus_scores(refs, refs, ["bleu"])["bleu"]["score"] == pytest.approx(100.0)
    groups = scores_by_group(hyps, refs, ["de", "fr", "de", "fr"], ["bleu"])
    assert list(groups) == ["de", "fr"] and groups["fr"]["pairs"] == 2
    assert groups["de"]["bleu"]["score"] == sacrebleu.corpus_bleu([hyps[0], hyps[2]], [[refs[0], refs[2]]]).score


# ----------------------------------------------------------------------------- bad input, one line each


BAD_TRANSLATE = [
    (lambda run, tmp: ["--input", str(tmp / "missing.txt")], "--input: {tmp}/missing.txt: no such file"),
    (lambda run, tmp: ["--input", str(tmp / "bad.txt")], "{tmp}/bad.txt:2: not valid UTF-8"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--output", str(tmp / "in.txt")], "is the input file"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--output", str(run / "hyp.txt")], "inside the run"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--output", str(tmp / "no" / "h.txt")], "not an existing"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--num-beams", "0"], "num_beams: must be an integer >= 1"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--length-penalty", "nan"], "length_penalty: must be"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--batch-size", "0"], "batch_size: must be an integer >= 1"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--max-new-tokens", "0"], "max_new_tokens: must be"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size: must"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--device", "foo"], "--device: unknown device"),
    (lambda run, tmp: ["--input", str(tmp / "in.txt"), "--source-lang", "d e"], "--source-lang: 'd e' is not"),
]


@pytest.mark.parametrize("flags, message", BAD_TRANSLATE)
def test_translate_refuses_bad_input_in_one_line(mapping_run, tmp_path, capsys, flags, message):
    (tmp_path / "in.txt").write_text("ka lu\n", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"ka lu\nmi \xff po\n")
    assert main(["translate", str(mapping_run), "--no-progress", *flags(mapping_run, tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = stderr_lines(captured)
    assert len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert err[0].startswith("switchformer: error: ")
    assert not (mapping_run / "hyp.txt").exists() and (tmp_path / "in.txt").read_text() == "ka lu\n"


def test_translate_and_metrics_refuse_runs_that_are_not_seq2seq(span_run, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("A router\n", encoding="utf-8")
    for command in (
        ["translate", str(span_run), "--input", str(tmp_path / "in.txt"), "--no-progress"],
        ["eval", str(span_run), "--metric", "bleu"],
    ):
        assert main(command) == 2
        err = stderr_lines(capsys.readouterr())
        assert len(err) == 1 and "the run was trained with 'span_corruption'" in err[0] and "seq2seq run" in err[0]
    model, tokenizer, config = load_run(span_run)
    with pytest.raises(ValueError, match="objective: the run was trained with 'span_corruption'"):
        translate(model, tokenizer, config, iter(()))  # at the call, before any source is read


def test_a_multilingual_prefix_without_a_source_language_is_named(multilingual_run, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("ka lu\n", encoding="utf-8")
    assert main(["translate", str(multilingual_run), "--input", str(tmp_path / "in.txt"), "--no-progress"]) == 2
    err = stderr_lines(capsys.readouterr())
    assert len(err) == 1 and "source_prefix:" in err[0] and "--source-lang" in err[0], err
    assert main(["generate", str(multilingual_run), "--prompt", "ka lu"]) == 2
    err = stderr_lines(capsys.readouterr())
    assert len(err) == 1 and "--source-lang" in err[0], err


def test_eval_and_generate_misuse_is_named(mapping_run, capsys):
    cases = [
        (["eval", str(mapping_run), "--num-beams", "2"], "--num-beams: used only to translate for --metric"),
        (["eval", str(mapping_run), "--no-repeat-ngram-size", "2"], "--no-repeat-ngram-size: used only to"),
        (["eval", str(mapping_run), "--metric", "bleu", "--no-repeat-ngram-size", "-2"], "no_repeat_ngram_size:"),
        (["eval", str(mapping_run), "--metric", "bleu", "--num-beams", "0"], "num_beams: must be an integer >= 1"),
        (["generate", str(mapping_run), "--prompt", "ka", "--greedy", "--temperature", "0.5"], "temperature:"),
        (["generate", str(mapping_run), "--prompt", "ka", "--temperature", "0.5", "--num-beams", "2"], "num_beams:"),
    ]
    for command, message in cases:
        assert main(command) == 2, command
        captured = capsys.readouterr()
        err = stderr_lines(captured)
        assert len(err) == 1 and message in err[0], (command, err)
        assert captured.out == ""


def test_metrics_without_sacrebleu_say_what_to_install(mapping_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import sacrebleu now raises ImportError
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)
    assert main(["eval", str(mapping_run), "--metric", "bleu"]) == 2
    err = stderr_lines(capsys.readouterr())
    assert len(err) == 1 and "pip install 'switchformer[metrics]'" in err[0] and "--metric" in err[0], err


# ----------------------------------------------------------------------------- a new user's trial


def test_a_bad_byte_on_stdin_leaves_an_existing_output_untouched(mapping_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "keep.txt"
    out.write_text("keep me\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ka lu\nmi \xe9\n"), encoding="utf-8"))
    assert main(["translate", str(mapping_run), "--output", str(out), "--no-progress"]) == 2
    assert "<stdin>:2: not valid UTF-8" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "keep me\n"


def test_translate_reads_gzipped_input_as_training_does(mapping_run, tmp_path, capsys):
    import gzip

    text = "".join(row["source"] + "\n" for row in mapping_pairs(9, 5))
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    (tmp_path / "in.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(text.encode())[:-9])
    for name in ("in.txt", "in.txt.gz"):
        assert main(["translate", str(mapping_run), "-i", str(tmp_path / name), "-o", str(tmp_path / f"{name}.out"),
                     "--no-progress"]) == 0  # fmt: skip
    assert (tmp_path / "in.txt.gz.out").read_text() == (tmp_path / "in.txt.out").read_text() != ""
    assert main(["translate", str(mapping_run), "-i", str(tmp_path / "cut.gz"), "--no-progress"]) == 2
    assert "cut.gz: not a valid gzip file" in capsys.readouterr().err


def test_the_run_records_its_languages_and_refuses_others(multilingual_run, tmp_path, capsys):
    from dataclasses import replace

    from switchformer.inference.translation import check_languages

    _, _, config = load_run(multilingual_run)
    assert (config.source_lang, config.target_lang) == ("xa,xb", None)  # from the JSONL rows
    (tmp_path / "in.txt").write_text("ka lu\n", encoding="utf-8")
    assert main(["translate", str(multilingual_run), "-i", str(tmp_path / "in.txt"), "--source-lang", "xc"]) == 2
    err = stderr_lines(capsys.readouterr())
    assert err == ["switchformer: error: --source-lang: the run was trained on source language(s) xa,xb, not 'xc'"]
    with pytest.raises(ValueError, match="--target-lang: the run translates into 'en'; it cannot translate into 'de'"):
        check_languages(replace(config, target_lang="en"), "xa", "de")


def test_eval_source_lang_names_the_language_of_unlabelled_pairs(multilingual_run, tmp_path, capsys):
    rows = mapping_pairs(12, 9)
    (tmp_path / "t.tsv").write_text("".join(f"{r['source']}\t{r['target']}\n" for r in rows), encoding="utf-8")
    args = ["eval", str(multilingual_run), "--data", str(tmp_path / "t.tsv"), "--json", "--no-progress"]
    assert main([*args, "--source-lang", "xb", "--metric", "bleu"]) == 0
    with_metric = json.loads(capsys.readouterr().out)
    model, tokenizer, config = load_run(multilingual_run)
    pairs = [Pair(r["source"], r["target"], "xb") for r in rows]
    hypotheses = list(translate(model, tokenizer, config, pairs))
    assert with_metric["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [[r["target"] for r in rows]]).score)
    assert main([*args, "--source-lang", "xb"]) == 0  # the loss alone needs the language too
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(with_metric["eval_loss"])
    assert main([*args[:2], "--source-lang", "xb"]) == 2
    assert "--source-lang: names the language of --data's pairs; give --data too" in capsys.readouterr().err


def test_generate_on_a_seq2seq_run_refuses_what_translate_is_for(mapping_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("ka lu\nmi po\n"))
    assert main(["generate", str(mapping_run)]) == 2
    assert "prompt: 2 lines on standard input; generate translates one source" in capsys.readouterr().err
    cases = [
        (["--prompt", "  "], "prompt: empty"),
        (["--prompt", "ka", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        (["--prompt", "ka", "--num-beams", "3", "--temperature", "0.5"], "it cannot be combined with sampling"),
    ]
    for flags, message in cases:
        assert main(["generate", str(mapping_run), *flags]) == 2
        assert message in capsys.readouterr().err, flags


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_a_failed_write_names_the_output(mapping_run, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("ka lu\n", encoding="utf-8")
    args = ["translate", str(mapping_run), "-i", str(tmp_path / "in.txt"), "-o", "/dev/full", "--no-progress"]
    assert main(args) == 2
    assert "--output: /dev/full: cannot write" in capsys.readouterr().err


def test_compare_takes_the_translation_data_flags():
    from switchformer.cli import build_parser

    flags = ["--valid", "v.de", "v.en", "--source-lang", "de", "--target-lang", "en"]
    args = build_parser().parse_args(["compare", *flags])
    assert (args.valid, args.source_lang, args.target_lang) == (["v.de", "v.en"], "de", "en")


def test_translate_counts_the_sources_it_cuts(mapping_run, loaded, tmp_path, capsys):
    _, _, config = loaded
    long = " ".join(["ka", "lu"] * config.seq_len)  # longer than seq_len - 1 tokens whatever the tokenizer
    (tmp_path / "in.txt").write_text(f"ka lu\n{long}\nmi\n", encoding="utf-8")
    assert main(["translate", str(mapping_run), "-i", str(tmp_path / "in.txt"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"1 of 3 sources were longer than the run's seq_len - 1 = {config.seq_len - 1} tokens" in err
    (tmp_path / "short.txt").write_text("ka lu\nmi\n", encoding="utf-8")
    assert main(["translate", str(mapping_run), "-i", str(tmp_path / "short.txt"), "--no-progress"]) == 0
    assert "were cut" not in capsys.readouterr().err


def test_beams_on_a_span_corruption_run_decode_with_beams(span_run, monkeypatch, capsys):
    """``--num-beams`` on a run whose objective samples by default: beam search, deterministic (not
    an error about a ``do_sample`` the command line has no flag for); with a sampling flag too, the
    conflict is named."""
    calls = []
    original = SwitchT5.generate

    def spy(self, input_ids, attention_mask=None, **kwargs):
        calls.append(kwargs)
        return original(self, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(SwitchT5, "generate", spy)
    args = ["generate", str(span_run), "--prompt", "A router sends", "--max-new-tokens", "4", "--num-beams", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert calls[-1]["num_beams"] == 2 and calls[-1]["do_sample"] is False
    assert main(args) == 0 and capsys.readouterr().out == first
    assert main([*args, "--temperature", "0.7"]) == 2
    err = stderr_lines(capsys.readouterr())
    assert len(err) == 1 and "num_beams: beam search is deterministic" in err[0] and "temperature" in err[0]


# ----------------------------------------------------------------------------- convert: a Hugging Face model end to end


@pytest.fixture(scope="module")
def prefixed_run(tmp_path_factory) -> Path:
    """A seq2seq run of a few steps whose sources carry a language prefix."""
    root = tmp_path_factory.mktemp("prefixed")
    data = write_jsonl(root / "pairs.jsonl", mapping_pairs(200, 2))
    args = ["train", *TRAIN_FLAGS, "--data", str(data), "--out-dir", str(root), "--run-name", "run", "--max-steps", "3"]
    args += ["--set", "source_prefix=translate {source_language} to {target_language}: ", "--set", "source_lang=de"]
    assert main([*args, "--set", "target_lang=en", "--set", "num_beams=2"]) == 0
    return root / "run"


@pytest.mark.parametrize("which", ["mapping_run", "prefixed_run"])
def test_a_converted_run_translates_through_transformers_own_loaders_as_translate_does(which, request, tmp_path,
                                                                                       capsys):  # fmt: skip
    """``convert RUN HF_DIR``, then transformers' AutoTokenizer and AutoModelForSeq2SeqLM with their
    defaults (the directory's generation config, its prefix as the text-to-text pipelines prepend it):
    the same translations as ``switchformer translate`` (dropless: HF routes with a per-sequence
    capacity that these short sentences never fill)."""
    transformers = pytest.importorskip("transformers")
    run = request.getfixturevalue(which)
    hf_dir = tmp_path / "hf"
    assert main(["convert", str(run), str(hf_dir)]) == 0
    sources = [row["source"] for row in mapping_pairs(40, seed=5)]
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["translate", str(run), "-i", str(tmp_path / "src.txt"), "--no-progress", "--routing", "dropless"]) == 0
    want = capsys.readouterr().out.splitlines()

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
    prefix = getattr(model.config, "prefix", None) or ""
    if which == "prefixed_run":
        assert prefix == "translate German to English: "
        assert model.config.task_specific_params == {"translation_de_to_en": {"prefix": prefix}}
    _, sf_tokenizer, config = load_run(run)
    for source in sources[:5]:  # the ids switchformer feeds its model: prefix, text cut to seq_len - 1, </s>
        want_ids = encode_sources(sf_tokenizer, config, [source])[0]
        assert tokenizer(prefix + source, truncation=True).input_ids == want_ids
    got = []
    for start in range(0, len(sources), 8):
        batch = tokenizer([prefix + s for s in sources[start : start + 8]], return_tensors="pt", padding=True,
                          truncation=True)  # fmt: skip
        with torch.no_grad():
            out = model.generate(**batch)  # every setting from generation_config.json
        got += tokenizer.batch_decode(out, skip_special_tokens=True)
    assert got == want
    assert model.generation_config.num_beams == config.num_beams
    assert len(set(want)) > (5 if which == "mapping_run" else 1)  # different translations (3 steps: barely)
