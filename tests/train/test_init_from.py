"""train --init-from: a new run from a Hugging Face checkpoint or a run takes its
architecture, weights and tokenizer (T5's spiece.model converted); optimizer and schedule start fresh
with the paper's fine-tuning defaults; contradicting sizes are refused; the source is never written."""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from switchformer.cli import main  # noqa: E402
from switchformer.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from switchformer.interop.hf import from_hf  # noqa: E402
from switchformer.interop.tokenizers import source_tokenizer  # noqa: E402
from switchformer.train.init_from import FINE_TUNING_DEFAULTS  # noqa: E402
from switchformer.train.run import load_run  # noqa: E402

pytestmark = [pytest.mark.hf]

TEXT = "Sparse experts route each token to one feed-forward network. A router sends tokens to experts.\n" * 60

# a translation task a tiny model starts to learn in a few steps: word-by-word between two vocabularies
SOURCE_WORDS = "ka lo mi nu pe ra si tu vo we".split()
TARGET_WORDS = "blue green red tall small fast slow old new good".split()
SENTENCES = ["ka lo mi", "we vo tu si", "blue green red tall", "nu pe ra, small fast!", "ka ka ka good old new"]


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path, monkeypatch):
    """Converted tokenizers go to a folder of the test, not the user's cache."""
    monkeypatch.setenv("SWITCHFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def pairs_file(tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        idx = [rng.randrange(len(SOURCE_WORDS)) for _ in range(rng.randint(3, 6))]
        source, target = (" ".join(words[i] for i in idx) for words in (SOURCE_WORDS, TARGET_WORDS))
        rows.append(json.dumps({"source": source, "target": target}) + "\n")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(rows))
    return path


def pair_texts(path) -> list[str]:
    return [" ".join(json.loads(line).values()) for line in path.read_text().splitlines()]


@pytest.fixture()
def hf_switch_dir(tmp_path):
    tokenizer = train_tokenizer([TEXT], 400, "bpe")
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=4, d_ff=48, num_heads=4, num_layers=2,
        num_decoder_layers=3, num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        expert_capacity=8, router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    folder = tmp_path / "hf"
    transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return folder, corpus


def train_spiece(texts: list[str], vocab_size: int = 64) -> bytes:
    """A tiny SentencePiece unigram model with T5's special ids (<pad> 0, </s> 1, <unk> 2, no <s>)."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


@pytest.fixture()
def hf_t5_spiece_dir(tmp_path, pairs_file):
    """A tiny T5 v1.1-style checkpoint (gated GELU, untied head) with only T5's spiece.model."""
    spiece = train_spiece(pair_texts(pairs_file) + SENTENCES)
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    folder = tmp_path / "hf-t5"
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    (folder / "spiece.model").write_bytes(spiece)
    return folder


@pytest.fixture()
def hf_switch_pairs_dir(tmp_path, pairs_file):
    """A tiny SwitchTransformers checkpoint with a tokenizer.json trained on the pairs' text."""
    tokenizer = train_tokenizer(pair_texts(pairs_file), 400, "bpe")
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        expert_capacity=16, router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    folder = tmp_path / "hf-switch"
    transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


def run_args(tmp_path, corpus, name, *extra):
    return ["train", "--preset", "test", "--data", str(corpus), "--out-dir", str(tmp_path / "runs"),
            "--run-name", name, "--no-progress", "--max-steps", "3", "--set", "eval_every=3", *extra]  # fmt: skip


def fine_tune_args(tmp_path, source, data, name, *extra):
    # no --model: the source decides the family (a Hugging Face directory can only hold a T5-family model)
    return ["train", "--init-from", str(source), "--set", "objective=seq2seq", "--data", str(data),
            "--preset", "test", "--out-dir", str(tmp_path / "runs"), "--run-name", name, "--no-progress",
            "--max-steps", "20", "--set", "eval_every=20", "--set", "checkpoint_every=20", *extra]  # fmt: skip


def test_init_from_a_hugging_face_checkpoint_takes_its_architecture_weights_and_tokenizer(hf_switch_dir, tmp_path):
    folder, corpus = hf_switch_dir
    source = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(folder)
    tiny_lr = ["--set", "lr=1e-7"]  # the weights barely move: the run's model is the pretrained one
    assert main(run_args(tmp_path, corpus, "ft", "--init-from", str(folder), "--model", "t5", *tiny_lr)) == 0
    run = tmp_path / "runs" / "ft"
    saved = json.loads((run / "config.json").read_text())
    settings = run_settings(run)
    assert (saved["model"]["d_kv"], saved["model"]["num_decoder_layers"]) == (4, 3)
    assert settings["d_model"] == 32 and settings["init_from"] == str(folder.resolve())
    assert "d_model" not in saved["train"] and saved["model"]["d_model"] == 32  # the architecture, stored once
    assert (run / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    model, _, _ = load_run(run)
    ids = torch.randint(2, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = source(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        ours = model(ids, decoder_input_ids=ids[:, :4]).logits
    # three steps at lr 1e-7 moved the weights a little: the run began from the pretrained ones
    difference = (ours - theirs).abs().max() / theirs.abs().max()
    assert 0 < difference < 1e-3, difference
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1  # a fresh schedule from step 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["switch", "t5-spiece"])
def test_fine_tuning_through_the_cli(kind, request, tmp_path, pairs_file, capsys):
    """A Switch checkpoint with tokenizer.json and a T5 v1.1 one with only spiece.model, fine-tuned on
    pairs: the loss falls, every weight matrix moves, the architecture and tokenizer are the source's,
    the fine-tuning defaults apply, and the source folder is byte for byte what it was."""
    folder = request.getfixturevalue("hf_switch_pairs_dir" if kind == "switch" else "hf_t5_spiece_dir")
    before = digest(folder)
    # Adafactor, as the defaults say, at a learning rate that moves tiny random weights in 20 steps
    assert main(fine_tune_args(tmp_path, folder, pairs_file, "ft", "--set", "lr=0.03")) == 0
    out = capsys.readouterr().out
    assert digest(folder) == before
    run = tmp_path / "runs" / "ft"
    losses = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses

    saved = json.loads((run / "config.json").read_text())
    settings = run_settings(run)
    source_config = json.loads((folder / "config.json").read_text())
    for field in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers", "vocab_size"):
        assert saved["model"][field] == source_config[field], field
    if kind == "switch":
        assert saved["model"]["num_experts"] == source_config["num_experts"] == settings["num_experts"]
        assert saved["model"]["expert_capacity"] == 16  # the source's capacity
        assert "capacity: the source's, 16 tokens per expert and sequence" in out
    else:
        assert saved["model"]["activation"] == "gated-gelu" and not saved["model"]["tie_word_embeddings"]
    # the fine-tuning defaults, except lr, which the user set
    train = settings
    assert (train["optimizer"], train["schedule"], train["lr"]) == ("adafactor", "constant", 0.03)
    if kind == "switch":
        assert (train["dropout"], train["expert_dropout"]) == (0.1, 0.4)
        assert (saved["model"]["dropout_rate"], saved["model"]["expert_dropout"]) == (0.1, 0.4)
    else:  # a dense T5 has no expert to drop out in: no expert default, no capacity talk
        assert saved["model"]["dropout_rate"] == 0.1 and "expert_dropout=" not in out
        assert "dense model: no Switch layer" in out and "capacity factors:" not in out
        assert "training t5 (dense)" in out
    assert "fine-tuning defaults" in out and "lr=" not in out.split("fine-tuning defaults")[1].splitlines()[0]

    source_model, tuned = from_hf(folder), load_run(run)[0]
    tuned_state = tuned.state_dict()
    for name, weight in source_model.state_dict().items():
        if weight.dim() >= 2:
            assert not torch.equal(weight, tuned_state[name]), f"{name} did not move"

    if kind == "switch":
        assert (run / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    else:
        assert not (folder / "tokenizer.json").exists()
        assert "spiece.model converted to tokenizer.json" in out
        run_tok, theirs = load_tokenizer(run / "tokenizer.json"), transformers.T5TokenizerFast.from_pretrained(folder)
        for sentence in SENTENCES:
            assert run_tok.encode(sentence).ids + [1] == theirs(sentence).input_ids, sentence


def test_a_spiece_model_converts_to_t5_ids(tmp_path, pairs_file):
    """The converted tokenizer keeps T5's ids: SentencePiece's own for the pieces, <pad> 0, </s> 1,
    <unk> 2, <extra_id_0> the last id; it encodes as transformers' T5 tokenizer (minus the </s> that
    switchformer appends itself) and as SentencePiece does; decoding gives the text back."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(train_spiece(pair_texts(pairs_file) + SENTENCES))
    path, note = source_tokenizer(folder)
    assert path.parent.parent == tmp_path / "cache" and "converted" in note
    assert sorted(p.name for p in folder.iterdir()) == ["spiece.model"]  # nothing written into the source
    tok = load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    assert tok.get_vocab_size() == sp.get_piece_size() + 100
    assert tok.token_to_id("<extra_id_0>") == tok.get_vocab_size() - 1
    assert tok.token_to_id("<extra_id_99>") == sp.get_piece_size()
    theirs = transformers.T5TokenizerFast.from_pretrained(folder)
    for sentence in SENTENCES + ["ka <extra_id_0> mi"]:
        ids = tok.encode(sentence).ids
        assert ids + [1] == theirs(sentence).input_ids, sentence
        assert tok.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    for sentence in SENTENCES[:3]:  # known words only: SentencePiece itself gives the same ids
        assert tok.encode(sentence).ids == sp.encode(sentence), sentence
        assert tok.decode(tok.encode(sentence).ids) == sentence
    assert source_tokenizer(folder)[0] == path  # the same conversion is found again


def test_a_tokenizer_json_that_appends_eos_is_used_without_it(tmp_path, pairs_file):
    """A hub T5 tokenizer.json appends </s> itself (its post-processor); switchformer appends it where
    a text ends, so the run gets the same tokenizer without that post-processor (a copy in the cache)."""
    pytest.importorskip("sentencepiece")
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "spiece.model").write_bytes(train_spiece(pair_texts(pairs_file)))
    hub = tmp_path / "hub"
    transformers.T5TokenizerFast.from_pretrained(t5).save_pretrained(hub)
    hub_tok = load_tokenizer(hub / "tokenizer.json")
    assert hub_tok.encode("ka lo").ids[-1] == 1  # as on the hub: </s> appended
    path, note = source_tokenizer(hub)
    assert path != hub / "tokenizer.json" and "without its post-processor" in note
    ours = load_tokenizer(path)
    assert ours.encode("ka lo").ids + [1] == hub_tok.encode("ka lo").ids
    assert ours.get_vocab() == hub_tok.get_vocab()


def test_user_settings_beat_the_fine_tuning_defaults(hf_switch_dir, tmp_path, capsys):
    """--set and config files count as the user's; the preset's values do not."""
    folder, corpus = hf_switch_dir
    settings = tmp_path / "ft.toml"
    settings.write_text('optimizer = "adamw"\nlr = 0.002\n')
    args = run_args(
        tmp_path, corpus, "mine", "--init-from", str(folder), "--set", "dropout=0.2", "--config", str(settings)
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "runs" / "mine" / "config.json").read_text())
    settings = run_settings(tmp_path / "runs" / "mine")
    train = settings
    assert (train["dropout"], train["optimizer"], train["lr"]) == (0.2, "adamw", 0.002)
    assert (train["expert_dropout"], train["schedule"]) == (0.4, "constant")  # defaults for the rest
    assert (saved["model"]["dropout_rate"], saved["model"]["expert_dropout"]) == (0.2, 0.4)
    line = next(line for line in out.splitlines() if line.startswith("fine-tuning defaults"))
    assert "expert_dropout=0.4" in line and "schedule=constant" in line
    assert not any(f" {field}=" in line for field in ("dropout", "optimizer", "lr"))
    # a capacity factor given replaces the source's absolute capacity, which would override it
    assert main(run_args(tmp_path, corpus, "cf", "--init-from", str(folder), "--set", "capacity_factor=1.5")) == 0
    saved = json.loads((tmp_path / "runs" / "cf" / "config.json").read_text())
    assert saved["model"]["expert_capacity"] is None and saved["model"]["capacity_factor"] == 1.5
    assert set(FINE_TUNING_DEFAULTS) == {"dropout", "expert_dropout", "optimizer", "lr", "schedule"}


@pytest.mark.slow
def test_init_from_a_run_and_contradicting_sizes(hf_switch_dir, tmp_path, capsys):
    folder, corpus = hf_switch_dir
    assert main(run_args(tmp_path, corpus, "base", "--init-from", str(folder))) == 0
    assert main(run_args(tmp_path, corpus, "again", "--init-from", str(tmp_path / "runs" / "base"))) == 0
    capsys.readouterr()
    assert main(run_args(tmp_path, corpus, "bad", "--init-from", str(folder), "--set", "d_model=64")) == 2
    err = capsys.readouterr().err
    assert "d_model: the --init-from model has 32, --set d_model=64 gives 64" in err and err.count("\n") == 1
    # the family comes from the source: a contradicting one is refused by name, wherever it was given
    config = tmp_path / "lm.toml"
    config.write_text('model = "lm"\n')
    for given, where in ((["--model", "lm"], "--model"), (["--set", "model=lm"], "--set model=lm"),
                         (["--config", str(config)], str(config))):  # fmt: skip
        assert main(run_args(tmp_path, corpus, "bad2", "--init-from", str(folder), *given)) == 2
        err = capsys.readouterr().err
        assert f"model: --init-from {folder} holds a t5 model, {where} asks for 'lm'" in err, err
        assert err.count("\n") == 1
    assert main(run_args(tmp_path, corpus, "same", "--init-from", str(folder), "--model", "t5")) == 0  # agreeing
    capsys.readouterr()
    # an LM run as the source: an LM run follows, without --model, whatever the preset's family, and the
    # source's positions bound the preset's sequence length (compare-gpu's 512 against the source's 128)
    text = tmp_path / "text.txt"
    text.write_text(corpus.read_text() * 40)
    assert main(run_args(tmp_path, text, "lm", "--model", "lm")) == 0
    assert main(["train", "--preset", "compare-gpu", "--init-from", str(tmp_path / "runs" / "lm"), "--data", str(text),
                 "--out-dir", str(tmp_path / "runs"), "--run-name", "lm2", "--no-progress", "--max-steps", "1",
                 "--set", "eval_every=1", "--set", "batch_size=2", "--set", "eval_batches=1",
                 "--device", "cpu"]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "runs" / "lm2" / "config.json").read_text())
    settings = run_settings(tmp_path / "runs" / "lm2")
    assert settings["model"] == "lm" and settings["seq_len"] == saved["model"]["max_seq_len"] == 128
    assert "seq_len: 128, the source's max_seq_len (the preset's was longer)" in capsys.readouterr().out
    # the source's positions bound a length the user gives: refused by name before anything is written
    assert main(run_args(tmp_path, corpus, "long", "--init-from", str(tmp_path / "runs" / "lm"),
                         "--set", "seq_len=256")) == 2  # fmt: skip
    assert "seq_len: the --init-from model has 128 positions (max_seq_len), --set seq_len=256 gives 256" in (
        capsys.readouterr().err)
    assert not (tmp_path / "runs" / "long").exists()
    # a Hugging Face directory of another family is named
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(run_args(tmp_path, corpus, "bad3", "--init-from", str(other))) == 2
    err = capsys.readouterr().err
    assert f"{other}/config.json: model_type 'gpt2'; --init-from takes T5 and SwitchTransformers" in err


def test_init_from_without_a_tokenizer_says_what_is_missing(hf_switch_dir, tmp_path, capsys):
    folder, corpus = hf_switch_dir
    (folder / "tokenizer.json").unlink()
    assert main(run_args(tmp_path, corpus, "nt", "--init-from", str(folder))) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json: not found, and no spiece.model beside it" in err and "--set tokenizer=FILE" in err


@pytest.mark.parametrize("module, package", [("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")])
def test_converting_spiece_without_its_packages_says_what_to_install(
    module, package, hf_t5_spiece_dir, tmp_path, pairs_file, monkeypatch, capsys
):
    before = digest(hf_t5_spiece_dir)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    assert main(fine_tune_args(tmp_path, hf_t5_spiece_dir, pairs_file, "nodeps")) == 2
    err = capsys.readouterr().err
    assert "spiece.model: converting T5's SentencePiece model to tokenizer.json needs" in err
    assert f"(missing: {package}): pip install {package}" in err and err.count("\n") == 1
    assert digest(hf_t5_spiece_dir) == before and not (tmp_path / "runs" / "nodeps").exists()


def test_a_given_tokenizer_too_large_for_the_model_is_named_before_anything_is_copied(hf_switch_dir, tmp_path, capsys):
    folder, corpus = hf_switch_dir
    big = tmp_path / "big-tokenizer.json"
    train_tokenizer([TEXT * 3 + " ".join(f"word{i}" for i in range(600))], 900, "bpe").save(str(big))
    args = run_args(tmp_path, corpus, "ft", "--init-from", str(folder), "--model", "t5", "--set", f"tokenizer={big}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{big}: " in err and "more than the model's vocab_size" in err
    assert not (tmp_path / "runs" / "ft" / "tokenizer.json").exists()


def run_settings(run) -> dict:
    """Every training setting of a run as its reader gives them: config.json's train section with the
    settings the model section holds (the architecture is stored once, there)."""
    from switchformer.train.run import read_run_config

    return read_run_config(run).train_values
