"""The optimiser's groups: the embedding tables' own learning rate (``embedding_lr_scale``), checked
against Adam's first step (each element with a gradient moves by the learning rate, whatever its
scale), and a run with it resumes exactly."""

from __future__ import annotations

import pytest
import shared
import torch

from switchformer.train.optimizer import learning_rate
from switchformer.train.sources import build_config
from switchformer.train.trainer import Trainer


def pairs_config(tmp_path, **overrides):
    rows = [{"source": f"count {i} and {i + 2}", "target": f"{i} {i + 1} {i + 2}"} for i in range(80)]
    data = shared.write_jsonl(tmp_path / "pairs.jsonl", rows)
    values = dict(model="t5", objective="seq2seq", data=[str(data)], max_steps=6, checkpoint_every=3, eval_every=100,
                  log_every=1, vocab_size=400, seq_len=24, warmup_steps=0, weight_decay=0.0, lr=1e-3,
                  schedule="constant")  # fmt: skip
    values.update(overrides)
    return build_config("test", overrides=values)


def first_step_moves(tmp_path, scale: float) -> dict[str, float]:
    """The largest change of each kind of weight in the first step: Adam's first update is
    ``lr * g / (|g| + eps)``, so an element with a gradient moves by its group's learning rate."""
    trainer = Trainer(pairs_config(tmp_path, embedding_lr_scale=scale), tmp_path / f"run-{scale}", progress=False)
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train_step()
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    trainer.close()
    return {
        "token embeddings": moved["shared.weight"],
        "position biases": moved["encoder.blocks.0.attn.relative_attention_bias.weight"],
        "attention": moved["encoder.blocks.0.attn.q.weight"],
        "norms": moved["encoder.final_norm.weight"],
    }


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_embedding_tables_move_by_their_scaled_learning_rate(tmp_path, scale):
    moves = first_step_moves(tmp_path, scale)
    for kind, expected in (("token embeddings", 1e-3 * scale), ("position biases", 1e-3 * scale),
                           ("attention", 1e-3), ("norms", 1e-3)):  # fmt: skip
        assert moves[kind] == pytest.approx(expected, rel=1e-3), (kind, moves)


def test_the_scale_holds_through_the_schedule(tmp_path):
    trainer = Trainer(pairs_config(tmp_path, embedding_lr_scale=4.0, schedule="cosine", warmup_steps=2),
                      tmp_path / "run", progress=False)  # fmt: skip
    for step in range(4):
        trainer.train_step()
        rates = sorted({group["lr"] for group in trainer.optimizer.param_groups})
        assert rates == pytest.approx([learning_rate(trainer.config, step), 4.0 * learning_rate(trainer.config, step)])
    trainer.close()


def test_a_run_with_scaled_embeddings_resumes_exactly(tmp_path):
    config = pairs_config(tmp_path, embedding_lr_scale=10.0)
    straight = Trainer(config, tmp_path / "straight", progress=False)
    straight.train()
    interrupted = Trainer(config.__class__(**{**config.to_dict(), "max_steps": 3}), tmp_path / "cut", progress=False)
    interrupted.train()
    resumed = Trainer(config, tmp_path / "cut", progress=False, resume=True)
    assert resumed.step == 3
    resumed.train()
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
