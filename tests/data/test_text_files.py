"""One reading of text files everywhere: every reader of a user's text (training data of each format,
validation files, translate's input on a file and on standard input, eval's data, prompts on standard
input, config files, tokenizer and model JSON) follows the same rules, checked metamorphically: a
UTF-8 byte-order mark at the start changes nothing, CRLF line ends read as LF, and bytes that are not
UTF-8 are named with the file and line."""

from __future__ import annotations

import gzip
import io
import json
import sys

import pytest

from switchformer.data.files import BOM, DataError, read_json, read_text
from switchformer.data.loaders import load_conversations, load_text
from switchformer.data.pairs import load_pairs

BOM_BYTES = BOM.encode("utf-8")
PAIRS = [("der hund läuft", "the dog runs"), ("café am see", "café by the lake"), ("ein kind", "a child")]


def _write(path, text: str, bom: bool = False, crlf: bool = False, gz: bool = False):
    data = (text.replace("\n", "\r\n") if crlf else text).encode("utf-8")
    data = (BOM_BYTES if bom else b"") + data
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


READERS = {
    "text": (lambda d, **kw: [_write(d / "doc.txt", "first line\nsecond line\n", **kw)], load_text),
    "text jsonl": (lambda d, **kw: [_write(d / "docs.jsonl", '{"text": "a doc"}\n{"text": "another"}\n', **kw)],
                   load_text),  # fmt: skip
    "pairs jsonl": (
        lambda d, **kw: [_write(d / "p.jsonl", "".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS),
                                **kw)],
        load_pairs,
    ),  # fmt: skip
    "pairs tsv": (lambda d, **kw: [_write(d / "p.tsv", "".join(f"{s}\t{t}\n" for s, t in PAIRS), **kw)], load_pairs),
    "line-aligned": (
        lambda d, **kw: [_write(d / "train.de", "".join(s + "\n" for s, _ in PAIRS), **kw),
                         _write(d / "train.en", "".join(t + "\n" for _, t in PAIRS), **kw)],
        lambda paths: load_pairs(paths, "de", "en"),
    ),  # fmt: skip
    "line-aligned gz": (
        lambda d, **kw: [_write(d / "train.de.gz", "".join(s + "\n" for s, _ in PAIRS), gz=True, **kw),
                         _write(d / "train.en.gz", "".join(t + "\n" for _, t in PAIRS), gz=True, **kw)],
        lambda paths: load_pairs(paths, "de", "en"),
    ),  # fmt: skip
    "chat jsonl": (
        lambda d, **kw: [_write(d / "c.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "hé"}]}) + "\n",
                                **kw)],
        lambda paths: [c.messages for c in load_conversations(paths)],
    ),  # fmt: skip
}


def _values(result):
    return [tuple(vars(r).values()) if hasattr(r, "__dict__") else r for r in result]


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_a_byte_order_mark_and_crlf_change_nothing(kind, crlf, tmp_path):
    write, read = READERS[kind]
    (tmp_path / "plain").mkdir()
    (tmp_path / "marked").mkdir()
    plain = read(write(tmp_path / "plain"))
    marked = read(write(tmp_path / "marked", bom=True, crlf=crlf))
    assert _values(marked) == _values(plain)
    assert BOM not in repr(_values(marked))


def test_not_utf8_is_named_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff broken\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: not valid UTF-8"):
        read_text(bad)
    (tmp_path / "c.json").write_bytes(BOM_BYTES + b'{"model_type": "t5"}')
    assert read_json(tmp_path / "c.json") == {"model_type": "t5"}
    (tmp_path / "d.json").write_bytes(b'{"a": 1,\n "b": }')
    with pytest.raises(DataError, match=r"d\.json: invalid JSON at line 2, column 7"):
        read_json(tmp_path / "d.json")


def test_config_and_tokenizer_files_with_a_byte_order_mark(tmp_path):
    from switchformer.data.tokenizer import load_tokenizer, train_tokenizer
    from switchformer.train.sources import read_config_file

    _write(tmp_path / "a.toml", 'lr = 0.002\nmodel = "t5"\n', bom=True, crlf=True)
    assert read_config_file(tmp_path / "a.toml") == {"lr": 0.002, "model": "t5"}
    _write(tmp_path / "a.json", '{"lr": 0.002}', bom=True)
    assert read_config_file(tmp_path / "a.json") == {"lr": 0.002}
    tok = train_tokenizer(["some text for a tokenizer"] * 20, 400, "bpe")
    _write(tmp_path / "tokenizer.json", tok.to_str(), bom=True)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("some text").ids == tok.encode("some text").ids


# ----------------------------------------------------------------------------- the commands, on a seq2seq run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from shared import TRAIN_FLAGS, mapping_pairs, write_jsonl

    from switchformer.cli import main

    root = tmp_path_factory.mktemp("bom")
    data = write_jsonl(root / "pairs.jsonl", mapping_pairs(300, 4))
    assert main(["train", *TRAIN_FLAGS, "--data", str(data), "--out-dir", str(root), "--run-name", "run",
                 "--max-steps", "30"]) == 0  # fmt: skip
    return root / "run"


SOURCES = "ka lu mi\npo re\nsu ti vo\n"


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_translate_reads_a_marked_file_and_stdin_as_the_plain_one(run, tmp_path, capsys, monkeypatch, crlf):
    from switchformer.cli import main

    plain, marked = _write(tmp_path / "plain.txt", SOURCES, False), _write(tmp_path / "m.txt", SOURCES, True, crlf)
    capsys.readouterr()
    assert main(["translate", str(run), "-i", str(plain), "--no-progress"]) == 0
    want = capsys.readouterr().out
    assert main(["translate", str(run), "-i", str(marked), "--no-progress"]) == 0
    assert capsys.readouterr().out == want
    stdin = io.TextIOWrapper(io.BytesIO(marked.read_bytes()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["translate", str(run), "--no-progress"]) == 0
    assert capsys.readouterr().out == want
    assert len(want.splitlines()) == 3


def test_generate_reads_a_marked_prompt_on_stdin_as_the_plain_one(run, capsys, monkeypatch):
    from switchformer.cli import main

    outputs = []
    for data in (b"ka lu mi\n", BOM_BYTES + b"ka lu mi\r\n"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        assert main(["generate", str(run)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_training_and_eval_on_marked_files_equal_the_plain_ones(run, tmp_path, capsys):
    """--valid and eval --data with a byte-order mark: the same validation loss as without."""
    from switchformer.cli import main

    pairs = [("ka lu", "zap wol"), ("mi po", "kin rast")]
    rows = "".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs)
    scores = []
    for bom in (False, True):
        data = _write(tmp_path / f"valid{bom}.jsonl", rows, bom)
        tsv = _write(tmp_path / f"valid{bom}.tsv", "ka lu\tzap wol\nmi po\tkin rast\n", bom, crlf=bom)
        for file in (data, tsv):
            assert main(["eval", str(run), "--data", str(file), "--json", "--no-progress"]) == 0
            scores.append(json.loads(capsys.readouterr().out)["eval_loss"])
    assert scores[0] == scores[2] and scores[1] == scores[3] and scores[0] == scores[1]
