"""Converted runs: any checkpoint `from_hf` loads can be converted, evaluated,
generated from, trained further and converted back, with the architecture of the checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from switchformer.cli import main  # noqa: E402
from switchformer.data.tokenizer import train_tokenizer  # noqa: E402
from switchformer.train.run import load_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.hf]

TEXT = ["Sparse experts route each token to one feed-forward network.", "A router sends tokens to experts."] * 40


def hf_t5_directory(tmp_path):
    """The issue's case: d_kv 4 with 4 heads and d_model 32 (d_kv is not d_model / heads), three
    decoder layers against two encoder layers, untied embeddings, gated-gelu."""
    tokenizer = train_tokenizer(TEXT, 400, "bpe")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=4, num_heads=4, d_ff=48, num_layers=2,
        num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    hf = transformers.T5ForConditionalGeneration(config).eval()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return hf, folder


def logits(model, ids):
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(ids, decoder_input_ids=ids[:, :4]).logits


def test_converted_run_keeps_the_architecture_through_eval_generate_and_back(tmp_path, capsys):
    hf, folder = hf_t5_directory(tmp_path)
    run = tmp_path / "run"
    assert main(["convert", str(folder), str(run)]) == 0
    capsys.readouterr()
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["d_kv"], saved["num_decoder_layers"], saved["tie_word_embeddings"]) == (4, 3, False)
    model, _, _ = load_run(run)
    ids = torch.randint(2, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, ids), logits(hf, ids), atol=1e-5, rtol=1e-5)

    assert main(["eval", str(run), "--json", "--batches", "1"]) == 0  # rebuilt from the model section
    assert json.loads(capsys.readouterr().out)["eval_loss"] > 0
    assert main(["generate", str(run), "--prompt", "A router", "--max-new-tokens", "3", "--greedy"]) == 0
    capsys.readouterr()

    back = tmp_path / "back"
    assert main(["convert", str(run), str(back)]) == 0
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(back).eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(hf, ids), atol=1e-5, rtol=1e-5)
    assert (back / "tokenizer.json").exists()


def test_converted_switch_checkpoint_keeps_its_absolute_expert_capacity(tmp_path):
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=3,
        router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    hf = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["expert_capacity"] == 3
    model, _, _ = load_run(tmp_path / "run", need_tokenizer=False)
    ids = torch.randint(2, 96, (2, 20), generator=torch.Generator().manual_seed(2))  # capacity 3 drops tokens
    torch.testing.assert_close(logits(model, ids), logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_convert_refuses_a_target_that_holds_files(tmp_path, capsys):
    _, folder = hf_t5_directory(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["convert", str(folder), str(tmp_path / "taken")]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_converted_run_trains_further_and_converts_back_with_equal_logits(tmp_path, capsys):
    hf, folder = hf_t5_directory(tmp_path)
    run = tmp_path / "run"
    assert main(["convert", str(folder), str(run)]) == 0
    before, _, _ = load_run(run)
    flags = ["--max-steps", "2", "--set", "eval_every=2", "--set", "checkpoint_every=2", "--set", "eval_batches=1"]
    assert main(["train", "--resume", str(run), "--no-progress", *flags]) == 0  # from the converted weights
    capsys.readouterr()
    after, _, _ = load_run(run)
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["d_kv"], saved["num_decoder_layers"], saved["tie_word_embeddings"]) == (4, 3, False)
    moved = [n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert moved  # the weights trained
    ids = torch.randint(2, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    assert main(["convert", str(run), str(tmp_path / "back")]) == 0
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(after, ids), atol=1e-5, rtol=1e-5)


def test_converted_files_get_the_users_umask(tmp_path, capsys):
    _, folder = hf_t5_directory(tmp_path)
    old = os.umask(0o022)
    try:
        assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
        assert main(["convert", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    for out in ("run", "back"):
        for file in (tmp_path / out).iterdir():
            assert file.stat().st_mode & 0o777 == 0o644, file  # not mkstemp's 0600


def test_a_hugging_face_tokenizer_that_appends_eos_is_converted_as_every_command_reads_it(tmp_path, capsys):
    """Hub T5 tokenizers append </s> themselves; switchformer appends it too, so a converted run keeps
    the tokenizer without that post-processor (one </s>, not two), and converting back restores it."""
    from tokenizers.processors import TemplateProcessing

    from switchformer.data.tokenizer import load_tokenizer

    _, folder = hf_t5_directory(tmp_path)
    tok = load_tokenizer(folder / "tokenizer.json")
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    assert tok.encode("A router").ids[-1] == 1
    run = tmp_path / "run"
    assert main(["convert", str(folder), str(run)]) == 0
    assert "without its post-processor" in capsys.readouterr().out
    converted = load_tokenizer(run / "tokenizer.json")
    assert converted.encode("A router").ids == tok.encode("A router", add_special_tokens=False).ids
    back = tmp_path / "back"
    assert main(["convert", str(run), str(back)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(back)
    assert hf_tok("A router").input_ids == tok.encode("A router").ids  # </s> once, by the tokenizer
    assert hf_tok.eos_token == "</s>" and hf_tok.pad_token == "<pad>"
