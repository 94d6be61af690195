"""Runs loaded for inference with ``--dtype`` and ``--max-memory``: both families, memory-mapped into a
meta model, give the fully resident model's outputs; the commands take the flags, report the expert
cache, and refuse bad sizes by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from switchformer.cli import main
from switchformer.models.accounting import parameter_counts
from switchformer.models.placement import parse_size, plan_placement, reserve_bytes
from switchformer.train.checkpoint import latest_checkpoint
from switchformer.train.run import load_run, read_run_config

TEXT = "\n\n".join(f"Document {i}: the river runs past the mill, and the miller counts {i} sacks." for i in range(60))


@pytest.fixture(scope="module", params=["t5", "lm"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"runs-{request.param}")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    args = ["train", "--preset", "test", "--model", request.param, "--data", str(corpus), "--no-progress"]
    args += ["--out-dir", str(root), "--run-name", "run", "--max-steps", "3", "--set", "vocab_size=400"]
    args += ["--set", "num_experts=6"]
    assert main(args) == 0
    return root / "run"


def budget_for(run, dtype: str, experts: int) -> int:
    with torch.device("meta"):
        model = read_run_config(run).build_model()
    plan = plan_placement(model, dtype)
    return math.ceil((plan.dense_bytes + (experts + 0.5) * plan.expert_bytes) * 8 / 7)


def outputs(model):
    ids = torch.randint(3, 400, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if model.is_encoder_decoder:
            logits = model(input_ids=ids, labels=ids[:, :5]).logits
        else:
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    return logits, tokens


def test_float32_placed_is_the_run_as_trained(run):
    trained, _, _ = load_run(run)
    placed, _, _ = load_run(run, dtype="float32")
    for want, got in zip(outputs(trained), outputs(placed)):
        assert torch.equal(got, want)
    assert parameter_counts(placed) == parameter_counts(trained)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_offloaded_is_resident(run, dtype):
    resident, _, _ = load_run(run, dtype=dtype)
    budget = budget_for(run, dtype, experts=2)
    offloaded, _, _ = load_run(run, dtype=dtype, max_memory=budget)
    cache = offloaded.expert_cache
    assert cache is not None and cache.budget_bytes < 3 * plan_placement(resident, dtype).expert_bytes
    for want, got in zip(outputs(resident), outputs(offloaded)):
        assert torch.equal(got, want)
    assert cache.evictions > 0 and cache.peak_bytes <= cache.budget_bytes
    assert parameter_counts(offloaded) == parameter_counts(load_run(run)[0])
    assert budget - reserve_bytes(budget) >= plan_placement(resident, dtype).dense_bytes + cache.budget_bytes


def test_a_nan_in_an_offloaded_expert_is_named_when_it_is_read(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    file = latest_checkpoint(copy) / "model.safetensors"
    state = load_file(str(file))
    name = next(k for k in state if k.endswith(".experts.w_out"))
    state[name][1, 0, 0] = float("nan")
    save_file(state, str(file))
    with pytest.raises(ValueError, match=rf"model.safetensors: .*{name}\[1\] holds non-finite values"):
        model, _, _ = load_run(copy, dtype="float32")  # resident: every expert is read now


def test_parse_size():
    assert parse_size("20GiB") == 20 * 2**30
    assert parse_size("1.5 MiB") == 3 * 2**19
    assert parse_size("4096") == 4096
    for bad in ("20GB", "-1MiB", "MiB", "0", "1e9"):
        with pytest.raises(ValueError, match=r"^--max-memory: "):
            parse_size(bad)


def test_the_commands_take_dtype_and_max_memory(run, capsys):
    budget = str(budget_for(run, "int8", experts=2))
    args = ["generate", str(run), "--prompt", "The river", "--greedy", "--max-new-tokens", "6"]
    assert main([*args, "--dtype", "int8"]) == 0
    resident = capsys.readouterr().out
    assert main([*args, "--dtype", "int8", "--max-memory", budget]) == 0
    out = capsys.readouterr()
    assert out.out == resident
    assert "expert cache:" in out.err and "hit rate" in out.err
    assert main(["eval", str(run), "--json", "--dtype", "int8", "--max-memory", budget]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expert_cache"]["misses"] > 0 and report["expert_cache"]["peak_bytes"] <= int(budget)
    assert main(["info", str(run), "--dtype", "int8", "--max-memory", budget]) == 0
    assert "experts offloaded, a cache of" in capsys.readouterr().out
    assert main([*args, "--max-memory", "12XB"]) == 2
    assert "--max-memory: '12XB' is not a size" in capsys.readouterr().err
    assert main([*args, "--max-memory", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert "--max-memory: 1.00 KiB cannot hold this model" in err and "at least" in err
