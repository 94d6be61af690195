"""train --init-from (issue 15, item 1): a new run from a Hugging Face checkpoint or a run takes its
architecture, weights and tokenizer; optimizer and schedule start fresh; contradicting sizes are refused."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from switchformer.cli import load_run, main  # noqa: E402
from switchformer.data.tokenizer import train_tokenizer  # noqa: E402

TEXT = "Sparse experts route each token to one feed-forward network. A router sends tokens to experts.\n" * 60


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


def run_args(tmp_path, corpus, name, *extra):
    return ["train", "--preset", "test", "--data", str(corpus), "--out-dir", str(tmp_path / "runs"),
            "--run-name", name, "--no-progress", "--max-steps", "3", "--set", "eval_every=3", *extra]  # fmt: skip


def test_init_from_a_hugging_face_checkpoint_takes_its_architecture_weights_and_tokenizer(hf_switch_dir, tmp_path):
    folder, corpus = hf_switch_dir
    source = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(folder)
    tiny_lr = ["--set", "lr=1e-7"]  # the weights barely move: the run's model is the pretrained one
    assert main(run_args(tmp_path, corpus, "ft", "--init-from", str(folder), "--model", "t5", *tiny_lr)) == 0
    run = tmp_path / "runs" / "ft"
    saved = json.loads((run / "config.json").read_text())
    assert (saved["model"]["d_kv"], saved["model"]["num_decoder_layers"]) == (4, 3)
    assert saved["train"]["d_model"] == 32 and saved["train"]["init_from"] == str(folder.resolve())
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


def test_init_from_a_run_and_contradicting_sizes(hf_switch_dir, tmp_path, capsys):
    folder, corpus = hf_switch_dir
    assert main(run_args(tmp_path, corpus, "base", "--init-from", str(folder))) == 0
    assert main(run_args(tmp_path, corpus, "again", "--init-from", str(tmp_path / "runs" / "base"))) == 0
    capsys.readouterr()
    assert main(run_args(tmp_path, corpus, "bad", "--init-from", str(folder), "--set", "d_model=64")) == 2
    err = capsys.readouterr().err
    assert "d_model: the --init-from model has 32, --set d_model=64 gives 64" in err and err.count("\n") == 1
    assert main(run_args(tmp_path, corpus, "bad2", "--init-from", str(folder), "--model", "lm")) == 2
    assert "model: --init-from gives a t5 model" in capsys.readouterr().err


def test_init_from_without_a_tokenizer_says_what_is_missing(hf_switch_dir, tmp_path, capsys):
    folder, corpus = hf_switch_dir
    (folder / "tokenizer.json").unlink()
    assert main(run_args(tmp_path, corpus, "nt", "--init-from", str(folder))) == 2
    assert "tokenizer.json: not found; --init-from needs the checkpoint's tokenizer.json" in capsys.readouterr().err
