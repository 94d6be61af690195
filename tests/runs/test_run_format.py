"""The run format stores a run's architecture once, in config.json's model section: the train section
holds the other settings, and the reader puts the model's back (the one settings map), so a run
written before (with both) reads the same, the model section winning."""

from __future__ import annotations

import json

import pytest

from switchformer.cli import main
from switchformer.train.config import TrainConfig
from switchformer.train.model_settings import MODEL_SETTINGS, model_values, train_values
from switchformer.train.run import read_run_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("format")
    corpus = root / "corpus.txt"
    corpus.write_text("Experts share the work of every token routed to them.\n" * 300)
    assert main(["train", "--preset", "test", "--data", str(corpus), "--no-progress", "--out-dir", str(root),
                 "--run-name", "run", "--max-steps", "2", "--set", "vocab_size=400", "--set", "dropout=0.05",
                 "--set", "capacity_factor=1.5"]) == 0  # fmt: skip
    return root / "run"


def test_the_architecture_is_stored_once_and_read_back(run):
    saved = json.loads((run / "config.json").read_text())
    mapped = {setting.train for setting in MODEL_SETTINGS}
    assert not mapped & set(saved["train"]), "a setting the model section holds is in the train section too"
    config = read_run_config(run).train
    assert (config.d_model, config.dropout, config.capacity_factor) == (32, 0.05, 1.5)
    assert saved["model"]["dropout_rate"] == 0.05 and saved["model"]["capacity_factor"] == 1.5


def test_a_run_that_stored_both_sections_reads_the_same_the_model_winning(run, tmp_path):
    saved = json.loads((run / "config.json").read_text())
    config = read_run_config(run).train
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"train": {**config.to_dict(), "d_ff": 9999}, "model": saved["model"]}))
    assert read_run_config(old).train == config  # the model section's d_ff, not the train section's


@pytest.mark.parametrize("family", ["lm", "t5"])
def test_the_map_both_ways_is_the_identity_on_the_settings(family):
    """TrainConfig -> model config -> TrainConfig gives every mapped setting back (the map is one)."""
    config = TrainConfig(model=family, d_model=48, num_layers=3, num_heads=4, d_ff=96, num_experts=4, sparse_step=1,
                         top_k=2, normalize_gates=True, activation="gelu", capacity_factor=1.5,
                         eval_capacity_factor=None, router_jitter_noise=0.02, dropout=0.1, expert_dropout=0.3,
                         aux_loss_coef=0.02, z_loss_coef=0.0005, init_scale=0.2, tie_embeddings=False)  # fmt: skip
    model = config.model_config().to_dict()
    back = train_values(model, family)
    for setting in MODEL_SETTINGS:
        if setting.fields(family):
            assert back[setting.train] == getattr(config, setting.train), setting.train
    assert model_values(config, family).items() <= model.items()
