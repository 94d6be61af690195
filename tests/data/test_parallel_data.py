"""Parallel data as users have it: sentence pairs from JSONL, TSV and
line-aligned (gzipped) text files, the pairing rule for files named by language, errors that name
the file and line, counted truncation, and a user's own validation files (--valid)."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from shared import SHARED_DATA

from switchformer.cli import main
from switchformer.data.files import DataError
from switchformer.data.formatting import Pair, encoder_text
from switchformer.data.loaders import load_text
from switchformer.data.pairs import language_of, load_pairs
from switchformer.train.data import prepare_data, split_from_documents
from switchformer.train.sources import build_config

MULTI30K = SHARED_DATA / "multi30k"

# German-English pairs; one holds U+2028 and U+0085 (which str.splitlines would take for line ends)
PAIRS = [
    Pair("Ein Mann fährt Fahrrad.", "A man rides a bicycle.", "de", "en"),
    Pair("Zwei Hunde spielen im Schnee.", "Two dogs play in the snow.", "de", "en"),
    Pair("Eine Frau liest ein Buch.", "A woman reads a book.", "de", "en"),
    Pair("Kinder laufen\u2028am Strand.", "Children run\x85on the beach.", "de", "en"),
    Pair("Ein Koch schneidet Gemüse.", "A cook cuts vegetables.", "de", "en"),
    Pair("Drei Männer sitzen auf einer Bank.", "Three men sit on a bench.", "de", "en"),
    Pair("Ein Mädchen springt über eine Pfütze.", "A girl jumps over a puddle.", "de", "en"),
    Pair("Der Hund holt den Ball.", "The dog fetches the ball.", "de", "en"),
    Pair("Eine Gruppe wandert im Wald.", "A group hikes in the forest.", "de", "en"),
    Pair("Ein Junge isst ein Eis.", "A boy eats an ice cream.", "de", "en"),
    Pair("Zwei Frauen trinken Kaffee.", "Two women drink coffee.", "de", "en"),
    Pair("Ein Musiker spielt Gitarre.", "A musician plays the guitar.", "de", "en"),
]


def quick(**overrides):
    values = dict(model="t5", objective="seq2seq", max_steps=4, vocab_size=400, seq_len=32)
    values.update(overrides)
    return build_config("test", overrides=values)


def prepared(config, run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    return prepare_data(config, run_dir)


def write_lines(path: Path, lines: list[str]) -> Path:
    data = "".join(f"{line}\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def write_formats(folder: Path, pairs: list[Pair]) -> dict[str, list[Path]]:
    """The same pairs in every format users have them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in pairs)
    tsv = "".join(f"{p.source}\t{p.target}\n" for p in pairs)
    (folder / "pairs.jsonl").write_text(rows)
    (folder / "pairs.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    (folder / "pairs.tsv").write_text(tsv)
    (folder / "pairs.tsv.gz").write_bytes(gzip.compress(tsv.encode()))
    formats = {
        "jsonl": [folder / "pairs.jsonl"],
        "jsonl.gz": [folder / "pairs.jsonl.gz"],
        "tsv": [folder / "pairs.tsv"],
        "tsv.gz": [folder / "pairs.tsv.gz"],
    }
    for name, (src, tgt) in {
        "text": ("train.de", "train.en"),
        "text.gz": ("train.de.gz", "train.en.gz"),
        "unnamed": ("source.txt", "target.txt"),
    }.items():
        sub = folder / name
        sub.mkdir()
        formats[name] = [
            write_lines(sub / src, [p.source for p in pairs]),
            write_lines(sub / tgt, [p.target for p in pairs]),
        ]
    return formats


# ----------------------------------------------------------------------------- formats


def test_every_format_gives_the_same_pairs_and_the_same_training_tensors(tmp_path):
    formats = write_formats(tmp_path / "data", PAIRS)
    loaded = {name: load_pairs(paths, "de", "en") for name, paths in formats.items()}
    for name, pairs in loaded.items():
        assert pairs == PAIRS, name
    # the languages come from the file names when the settings do not give them
    assert load_pairs(formats["text.gz"]) == PAIRS
    assert load_pairs(formats["unnamed"]) == [Pair(p.source, p.target) for p in PAIRS]
    tensors = {}
    for name, paths in formats.items():
        config = quick(data=[str(p) for p in paths], source_lang="de", target_lang="en", validation_fraction=0.25)
        data = prepared(config, tmp_path / name)
        tensors[name] = (data.train.tensors, data.valid.tensors)
        assert (len(data.train), len(data.valid)) == (9, 3)
    reference = tensors.pop("jsonl")
    for name, (train, valid) in tensors.items():
        for split, expected in zip((train, valid), reference):
            assert split.keys() == expected.keys()
            for key in split:
                assert torch.equal(split[key], expected[key]), (name, key)


def test_jsonl_rows_may_carry_their_languages_and_the_settings_fill_the_rest(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"source": "Bonjour", "target": "Hello", "source_lang": "fr", "target_lang": "en"},
        {"source": "Hallo", "target": "Hello"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_pairs([path]) == [Pair("Bonjour", "Hello", "fr", "en"), Pair("Hallo", "Hello")]
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: the pair does not say its source language"):
        load_pairs([path], "fr,de", "en")
    assert load_pairs([path], None, "en")[1] == Pair("Hallo", "Hello", None, "en")


def test_a_folder_of_files_named_by_language_pairs_each_stem(tmp_path):
    write_lines(tmp_path / "a.de", ["eins", "zwei"])
    write_lines(tmp_path / "a.en", ["one", "two"])
    write_lines(tmp_path / "b.de.gz", ["drei"])
    write_lines(tmp_path / "b.en.gz", ["three"])
    pairs = load_pairs([tmp_path], "de", "en")
    assert [(p.source, p.target) for p in pairs] == [("eins", "one"), ("zwei", "two"), ("drei", "three")]
    # two files named by language and no languages given: source then target, by order
    assert load_pairs([tmp_path / "a.en", tmp_path / "a.de"])[0] == Pair("one", "eins", "en", "de")


def test_language_suffixes():
    assert language_of(Path("train.de.gz")) == "de"
    assert language_of(Path("train.pt-br")) == "pt-br"
    assert language_of(Path("notes.txt")) is None
    assert language_of(Path("notes.txt.gz")) is None
    assert language_of(Path("corpus")) is None
    assert language_of(Path("train.src"), known={"src"}) == "src"


# ----------------------------------------------------------------------------- multilingual


@pytest.fixture
def captions(tmp_path) -> Path:
    """The same three captions in four languages, one file each (some gzipped)."""
    texts = {
        "de": ["Ein Hund.", "Zwei Katzen.", "Ein Haus."],
        "fr": ["Un chien.", "Deux chats.", "Une maison."],
        "cs": ["Pes.", "Dvě kočky.", "Dům."],
        "en": ["A dog.", "Two cats.", "A house."],
    }
    for code, lines in texts.items():
        write_lines(tmp_path / (f"train.{code}.gz" if code in ("fr", "en") else f"train.{code}"), lines)
    return tmp_path


def test_several_source_languages_make_a_multilingual_set(captions):
    files = [captions / "train.de", captions / "train.fr.gz", captions / "train.cs", captions / "train.en.gz"]
    pairs = load_pairs(files, "de,fr,cs", "en")
    assert len(pairs) == 9
    # interleaved line by line: the first rows (validation) are whole captions in every language
    assert [(p.source_lang, p.target) for p in pairs[:3]] == [("de", "A dog."), ("fr", "A dog."), ("cs", "A dog.")]
    assert pairs[4] == Pair("Deux chats.", "Two cats.", "fr", "en")
    assert all(p.target_lang == "en" for p in pairs)
    # the order of --source-lang orders each line's pairs; unset: every other language present
    assert [p.source_lang for p in load_pairs(files, "cs,de,fr", "en")[:3]] == ["cs", "de", "fr"]
    assert sorted(load_pairs(files, None, "en")) == sorted(pairs)
    # the target alone may be left out when it is the one language not among the sources
    assert load_pairs(files, "de,fr,cs") == pairs
    # a source language tag in the encoder input comes from each pair's own language
    config = quick(source_lang="de,fr,cs", target_lang="en", source_prefix="<{source_lang}> ")
    assert encoder_text(pairs[2], config) == "<cs> Pes."


def test_multilingual_training_data_carries_each_pairs_language(captions, tmp_path):
    files = sorted(str(p) for p in captions.glob("train.*"))
    config = quick(data=files, target_lang="en", source_prefix="<{source_lang}> ", validation_fraction=0.34)
    data = prepared(config, tmp_path / "run")
    assert (len(data.train), len(data.valid)) == (6, 3)
    first = data.tokenizer.decode(data.valid.tensors["input_ids"][0].tolist())
    assert first.startswith("<cs>")  # files sorted: cs, de, en, fr; without --source-lang, by appearance


# ----------------------------------------------------------------------------- errors


def _mismatch(d):
    write_lines(d / "t.de", ["a", "b", "c"])
    write_lines(d / "t.en", ["x", "y"])
    return [d / "t.de", d / "t.en"], "de", "en"


def _empty_target(d):
    write_lines(d / "t.de", ["a", "b", "c"])
    write_lines(d / "t.en", ["x", "  ", "z"])
    return [d / "t.de", d / "t.en"], None, None


def _empty_source(d):
    write_lines(d / "s.txt", ["a", "", "c"])
    write_lines(d / "t.txt", ["x", "y", "z"])
    return [d / "s.txt", d / "t.txt"], None, None


def _target_without_source(d):
    write_lines(d / "t.de", ["a"])
    write_lines(d / "t.en", ["x"])
    write_lines(d / "u.en", ["y"])
    return [d / "t.de", d / "t.en", d / "u.en"], "de", "en"


def _source_without_target(d):
    write_lines(d / "t.de", ["a"])
    write_lines(d / "t.en", ["x"])
    write_lines(d / "u.de", ["y"])
    return [d / "t.de", d / "t.en", d / "u.de"], "de", "en"


def _unknown_source_code(d):
    write_lines(d / "t.de", ["a"])
    write_lines(d / "t.en", ["x"])
    return [d / "t.de", d / "t.en"], "de,xx", "en"


def _unwanted_language(d):
    for code in ("de", "fr", "en"):
        write_lines(d / f"t.{code}", ["a"])
    return [d / "t.de", d / "t.fr", d / "t.en"], "de", "en"


def _no_target_given(d):
    for code in ("de", "fr", "en"):
        write_lines(d / f"t.{code}", ["a"])
    return [d / "t.de", d / "t.fr", d / "t.en"], None, None


def _latin1(d):
    (d / "t.de").write_bytes(b"gut\nsch\xf6n\n")
    write_lines(d / "t.en", ["good", "nice"])
    return [d / "t.de", d / "t.en"], "de", "en"


def _latin1_gz(d):
    (d / "t.de.gz").write_bytes(gzip.compress(b"gut\nsch\xf6n\n"))
    write_lines(d / "t.en.gz", ["good", "nice"])
    return [d / "t.de.gz", d / "t.en.gz"], "de", "en"


def _not_gzip(d):
    (d / "t.de.gz").write_text("plain text\n")
    write_lines(d / "t.en.gz", ["x"])
    return [d / "t.de.gz", d / "t.en.gz"], "de", "en"


def _cut_gzip(d):
    whole = gzip.compress("".join(f"line {i}\n" for i in range(1000)).encode())
    (d / "t.de.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    write_lines(d / "t.en.gz", ["x"])
    return [d / "t.de.gz", d / "t.en.gz"], "de", "en"


def _tsv_columns(d):
    (d / "p.tsv").write_text("a\tb\nc\td\te\n")
    return [d / "p.tsv"], None, None


def _tsv_one_column(d):
    (d / "p.tsv").write_text("a\tb\nno tab here\n")
    return [d / "p.tsv"], None, None


def _tsv_empty_side(d):
    (d / "p.tsv").write_text("a\tb\n\td\n")
    return [d / "p.tsv"], None, None


def _jsonl_empty_target(d):
    (d / "p.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": "c", "target": " "}\n')
    return [d / "p.jsonl"], None, None


def _jsonl_bad_language(d):
    (d / "p.jsonl").write_text('{"source": "a", "target": "b", "source_lang": "d e"}\n')
    return [d / "p.jsonl"], None, None


def _jsonl_other_language(d):
    (d / "p.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": "c", "target": "d", "source_lang": "fr"}\n')
    return [d / "p.jsonl"], "de", None


def _several_sources_tsv(d):
    (d / "p.tsv").write_text("a\tb\n")
    return [d / "p.tsv"], "de,fr", "en"


def _one_text_file(d):
    write_lines(d / "corpus.txt", ["a", "b"])
    return [d / "corpus.txt"], None, None


def _named_and_unnamed(d):
    write_lines(d / "t.de", ["a"])
    write_lines(d / "t.txt", ["x"])
    return [d / "t.de", d / "t.txt"], None, None


def _same_language_twice(d):
    write_lines(d / "t.de", ["a"])
    write_lines(d / "t.de.gz", ["a"])
    write_lines(d / "t.en", ["x"])
    return [d / "t.de", d / "t.de.gz", d / "t.en"], "de", "en"


ERRORS = [
    (_mismatch, r"t\.de has 3 lines but \S*t\.en has 2"),
    (_empty_target, r"t\.en:2: empty line \(the target side"),
    (_empty_source, r"s\.txt:2: empty line \(the source side"),
    (_target_without_source, r"u\.en: a target-language \(en\) file without a source file"),
    (_source_without_target, r"u\.de: no target-language file of the same name \(u\.en or u\.en\.gz\)"),
    (_unknown_source_code, r"--source-lang: 'xx' matches no file or row of --data"),
    (_unwanted_language, r"t\.fr: language 'fr' is neither --source-lang \(de\) nor --target-lang \(en\)"),
    (_no_target_given, r"--data: line-aligned files in 3 languages \(de, fr, en\): say which is the target"),
    (_latin1, r"t\.de:2: not valid UTF-8"),
    (_latin1_gz, r"t\.de\.gz:2: not valid UTF-8"),
    (_not_gzip, r"t\.de\.gz: not a valid gzip file"),
    (_cut_gzip, r"t\.de\.gz: not a valid gzip file"),
    (_tsv_columns, r"p\.tsv:2: expected 2 tab-separated columns \(source<TAB>target\), found 3"),
    (_tsv_one_column, r"p\.tsv:2: expected 2 tab-separated columns \(source<TAB>target\), found 1"),
    (_tsv_empty_side, r"p\.tsv:2: empty source side"),
    (_jsonl_empty_target, r"p\.jsonl:2: field 'target' must be a non-empty string"),
    (_jsonl_bad_language, r"p\.jsonl:1: field 'source_lang' must be a language code"),
    (_jsonl_other_language, r"p\.jsonl:2: source language 'fr' is not in --source-lang \(de\)"),
    (_several_sources_tsv, r"p\.tsv:1: the pair does not say its source language"),
    (_one_text_file, r"--data: 1 line-aligned text file\(s\) \(corpus\.txt\) without a language"),
    (_named_and_unnamed, r"t\.txt: no language in its name"),
    (_same_language_twice, r"t\.de and \S*t\.de\.gz: two files of t in the language 'de'"),
]


@pytest.mark.parametrize("write, message", ERRORS, ids=[w.__name__.strip("_") for w, _ in ERRORS])
def test_bad_parallel_data_is_named_by_file_and_line(tmp_path, write, message):
    paths, source_lang, target_lang = write(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        load_pairs(paths, source_lang, target_lang)
    assert str(tmp_path) in str(caught.value) or message.startswith("--")


def test_a_bad_file_is_one_line_from_the_command_naming_it(tmp_path, capsys):
    paths, _, _ = _mismatch(tmp_path)
    args = ["train", "--preset", "test", "--model", "t5", "--set", "objective=seq2seq", "--no-progress"]
    args += ["--data", *map(str, paths), "--out-dir", str(tmp_path / "runs"), "--run-name", "run"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"t\.de has 3 lines but \S*t\.en has 2", err) and err.count("\n") == 1, err


def test_language_settings_are_checked_by_name():
    for settings, message in [
        (dict(source_lang="de,xx!"), r"^source_lang: 'xx!' is not a language code"),
        (dict(source_lang="de,de"), r"^source_lang: 'de,de' names a language twice"),
        (dict(source_lang="de,en", target_lang="en"), r"^source_lang: 'en' is both a source and the target"),
        (dict(target_lang="en,fr"), r"^target_lang: one language code"),
    ]:
        with pytest.raises(ValueError, match=message):
            quick(**settings)
    assert quick(source_lang="de,fr,cs", target_lang="en").source_lang == "de,fr,cs"


# ----------------------------------------------------------------------------- truncation


def test_over_long_sides_are_truncated_counted_and_reported(tmp_path, caplog):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    pairs = [(" ".join(words[: 1 + (3 * i) % 11]), " ".join(words[: 1 + (7 * i) % 11])) for i in range(20)]
    path = tmp_path / "p.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    config = quick(data=[str(path)], seq_len=8, validation_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="switchformer"):
        data = prepared(config, tmp_path / "run")
    tok = data.tokenizer
    for split, rows in ((data.train, pairs[4:]), (data.valid, pairs[:4])):

        def naive(texts):
            return sum(len(tok.encode(t).ids) + 1 > config.seq_len for t in texts)

        long_sources, long_targets = naive([s for s, _ in rows]), naive([t for _, t in rows])
        assert 0 < long_sources < len(rows) and 0 < long_targets < len(rows)
        assert (split.truncated_sources, split.truncated_targets) == (long_sources, long_targets)
        name = "training" if split is data.train else "validation"
        expected = (
            f"{name} data: {long_sources} of {len(rows)} source sides and {long_targets} of {len(rows)} target "
            f"sides longer than seq_len=8 tokens were truncated"
        )
        assert expected in caplog.text
        # each cut side keeps seq_len tokens, the last of them EOS
        assert split.tensors["attention_mask"].sum(1).max() == config.seq_len
        assert (split.tensors["labels"] != -100).sum(1).max() == config.seq_len
    long_rows = (data.train.tensors["labels"] != -100).sum(1) == config.seq_len
    assert (data.train.tensors["labels"][long_rows, -1] == 1).all()


# ----------------------------------------------------------------------------- --valid


def test_valid_files_are_the_validation_split_and_all_of_data_trains(tmp_path):
    train = write_formats(tmp_path / "train", PAIRS)["text.gz"]
    valid = write_formats(tmp_path / "valid", PAIRS[:5])["tsv"]
    config = quick(data=[str(p) for p in train], valid_data=[str(p) for p in valid], source_lang="de")
    data = prepared(config, tmp_path / "run")
    assert (len(data.train), len(data.valid)) == (len(PAIRS), 5)
    expected = split_from_documents(data.tokenizer, PAIRS[:5], config, config.seed + 1)
    for key, value in expected.tensors.items():
        assert torch.equal(data.valid.tensors[key], value)
    everything = split_from_documents(data.tokenizer, PAIRS, config, config.seed)
    assert torch.equal(data.train.tensors["labels"], everything.tensors["labels"])
    # a validation set may hold fewer source languages than --source-lang; training data may not
    config = quick(data=[str(p) for p in train], valid_data=[str(p) for p in valid], source_lang="de,fr")
    with pytest.raises(DataError, match="'fr' matches no file or row of --data"):
        prepared(config, tmp_path / "run2")


@pytest.mark.parametrize("model", ["lm", "t5"])
def test_valid_files_for_text_objectives(tmp_path, model):
    sentence = "Sparse experts route each token to one network. A router sends tokens to experts.\n"
    (tmp_path / "train.txt").write_text(sentence * 40)
    write_lines(tmp_path / "dev.txt.gz", ["Held-out text the model never trains on, gzipped."] * 12)
    config = build_config(
        "test",
        overrides=dict(
            model=model, data=[str(tmp_path / "train.txt")], valid_data=[str(tmp_path / "dev.txt.gz")], vocab_size=400
        ),
    )
    data = prepared(config, tmp_path / "run")
    expected = split_from_documents(data.tokenizer, load_text([tmp_path / "dev.txt.gz"]), config, config.seed + 1)
    for key, value in expected.tensors.items():
        assert torch.equal(data.valid.tensors[key], value)
    whole = split_from_documents(data.tokenizer, [(sentence * 40).strip()], config, config.seed)
    assert torch.equal(data.train.tensors["input_ids"], whole.tensors["input_ids"])  # nothing carved out


def test_train_with_valid_then_eval_scores_that_set(tmp_path, capsys):
    train = write_formats(tmp_path / "train", PAIRS)["text"]
    valid = write_formats(tmp_path / "valid", PAIRS[:6])["text.gz"]
    args = ["train", "--preset", "test", "--model", "t5", "--set", "objective=seq2seq", "--set", "vocab_size=400"]
    args += ["--data", *map(str, train), "--valid", *map(str, valid), "--source-lang", "de", "--target-lang", "en"]
    args += ["--out-dir", str(tmp_path / "runs"), "--run-name", "run", "--max-steps", "4", "--no-progress"]
    assert main(args) == 0
    run = tmp_path / "runs" / "run"
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["valid_data"] == [str(p.resolve()) for p in valid]
    assert (saved["source_lang"], saved["target_lang"]) == ("de", "en")
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == "validation split"
    assert report["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    # the same files given to eval --data: the same rows, the same loss
    assert main(["eval", str(run), "--json", "--data", *map(str, valid)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["eval_loss"] == pytest.approx(report["eval_loss"], rel=1e-6)
    assert again["tokens"] == report["tokens"] > 0
    # --resume may not point the run at other validation files
    assert main(["train", "--resume", str(run), "--no-progress", "--valid", str(train[0]), str(train[1])]) == 2
    assert "valid_data: --resume cannot change it" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Multi30k


@pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"the Multi30k data is not at {MULTI30K}")
def test_multi30k_files_load_as_line_aligned_pairs(tmp_path, capsys):
    de, en = MULTI30K / "train.de.gz", MULTI30K / "train.en.gz"
    pairs = load_pairs([de, en], "de", "en")
    assert len(pairs) == 29000
    first_de = gzip.decompress(de.read_bytes()).decode().split("\n")[0]
    first_en = gzip.decompress(en.read_bytes()).decode().split("\n")[0]
    assert pairs[0] == Pair(first_de, first_en, "de", "en")
    # {de, fr, cs} -> en on the validation split: every caption three times, each with its language
    val = [MULTI30K / f"val.{code}.gz" for code in ("de", "fr", "cs", "en")]
    multi = load_pairs(val, "de,fr,cs", "en")
    assert len(multi) == 3 * 1014
    assert [p.source_lang for p in multi[:3]] == ["de", "fr", "cs"]
    assert len({p.target for p in multi[:3]}) == 1
    # a slice through the command line: train on 64 captions, validate on 8 of val, eval
    folder = tmp_path / "slice"
    folder.mkdir()
    for split, path_de, path_en, n in (("train", de, en, 64), ("val", val[0], val[3], 8)):
        for code, path in (("de", path_de), ("en", path_en)):
            write_lines(folder / f"{split}.{code}.gz", gzip.decompress(path.read_bytes()).decode().split("\n")[:n])
    args = ["train", "--preset", "test", "--model", "t5", "--set", "objective=seq2seq", "--set", "vocab_size=400"]
    args += ["--data", str(folder / "train.de.gz"), str(folder / "train.en.gz"), "--source-lang", "de"]
    args += ["--valid", str(folder / "val.de.gz"), str(folder / "val.en.gz"), "--target-lang", "en"]
    args += ["--out-dir", str(tmp_path / "runs"), "--run-name", "run", "--max-steps", "3", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs" / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] > 0 and report["eval_loss"] is not None


def test_truncation_counts_reach_the_runs_summary(tmp_path):
    from switchformer.train.trainer import Trainer

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    pairs = [(" ".join(words[: 1 + (3 * i) % 11]), " ".join(words[: 1 + (7 * i) % 11])) for i in range(20)]
    path = tmp_path / "p.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    config = quick(data=[str(path)], seq_len=8, validation_fraction=0.2, max_steps=1)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    summary = trainer.train()
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    for split, part in (("training", trainer.data.train), ("validation", trainer.data.valid)):
        want = {"sources": part.truncated_sources, "targets": part.truncated_targets, "rows": len(part)}
        assert summary["truncated"][split] == saved["truncated"][split] == want
    assert saved["truncated"]["training"]["sources"] > 0


def test_one_language_only_and_languages_on_other_objectives_are_named(tmp_path):
    (tmp_path / "train.de").write_text("Ein Hund.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"files in one language only \(de\): sentence pairs need the target"):
        load_pairs([tmp_path / "train.de"])
    with pytest.raises(ValueError, match="source_lang: languages are read only by the seq2seq objective"):
        build_config("test", overrides={"source_lang": "de"})
