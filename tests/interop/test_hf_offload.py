"""Hugging Face directories loaded memory-mapped, with int8 and offloaded experts: a tiny Switch model
saved as bfloat16 ``.bin`` shards (as Google's checkpoints are) and as safetensors, loaded under a
budget that forces eviction, gives the resident model's logits and tokens exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_parity import hf_switch, inputs  # noqa: E402

from switchformer.interop.hf import from_hf  # noqa: E402
from switchformer.interop.hf_config import config_from_hf  # noqa: E402
from switchformer.models.placement import minimum_budget, plan_placement, reserve_bytes  # noqa: E402
from switchformer.models.t5 import SwitchT5  # noqa: E402

pytestmark = [pytest.mark.hf]


def write_bin_shards(hf, out, dtype=torch.bfloat16, shards=3):
    """``pytorch_model-0000k-of-0000n.bin`` shards and their index, as Google's checkpoints come."""
    out.mkdir()
    hf.config.save_pretrained(out)
    state = {k: v.to(dtype).clone() for k, v in hf.state_dict().items()}
    keys = sorted(state)
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = keys[k::shards]
        torch.save({key: state[key] for key in part}, out / name)
        weight_map.update(dict.fromkeys(part, name))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    hf = hf_switch(experts=8)  # 2 Switch layers a stack, 8 experts each: 32 experts
    root = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(root / "safetensors")
    write_bin_shards(hf, root / "bin")
    return hf, root


def budget_for(directory, dtype: str, experts: int) -> int:
    """A budget whose expert cache holds ``experts`` experts (and a half)."""
    with torch.device("meta"):
        model = SwitchT5(config_from_hf(json.loads((directory / "config.json").read_text())))
    plan = plan_placement(model, dtype)
    return math.ceil((plan.dense_bytes + (experts + 0.5) * plan.expert_bytes) * 8 / 7)


def outputs(model):
    ids, labels = inputs(batch=4)
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).logits, model.generate(ids, max_new_tokens=10)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_offloaded_experts_give_the_resident_models_outputs(checkpoints, layout, dtype):
    _, root = checkpoints
    directory = root / layout
    resident = from_hf(directory, dtype=dtype).eval()
    assert resident.expert_cache is None
    budget = budget_for(directory, dtype, experts=3)
    offloaded = from_hf(directory, dtype=dtype, max_memory=budget).eval()
    cache = offloaded.expert_cache
    assert cache is not None and cache.budget_bytes == budget - reserve_bytes(budget) - plan_dense(directory, dtype)
    want_logits, want_tokens = outputs(resident)
    got_logits, got_tokens = outputs(offloaded)
    assert torch.equal(got_logits, want_logits)
    assert torch.equal(got_tokens, want_tokens)
    assert cache.evictions > 0 and len(cache) == 3, "the budget was meant to force eviction"
    assert cache.peak_bytes <= cache.budget_bytes
    assert want_logits.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)


def plan_dense(directory, dtype):
    with torch.device("meta"):
        model = SwitchT5(config_from_hf(json.loads((directory / "config.json").read_text())))
    return plan_placement(model, dtype).dense_bytes


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_routers_stay_float32_and_int8_stays_near_float32(checkpoints, layout):
    hf, root = checkpoints
    for dtype in ("bfloat16", "int8"):
        model = from_hf(root / layout, dtype=dtype)
        routers = [p for n, p in model.named_parameters() if ".router." in n]
        assert routers and all(p.dtype == torch.float32 for p in routers)
    exact, _ = outputs(from_hf(root / layout, dtype="float32").eval())
    int8, _ = outputs(from_hf(root / layout, dtype="int8").eval())
    relative = float((int8 - exact).norm() / exact.norm())
    assert 0 < relative < 0.02, relative  # measured about 0.3% on this random model


def test_the_safetensors_directory_equals_the_model_in_memory(checkpoints):
    hf, root = checkpoints
    want, _ = outputs(from_hf(hf).eval())
    budget = budget_for(root / "safetensors", "float32", 2)
    got, _ = outputs(from_hf(root / "safetensors", dtype="float32", max_memory=budget).eval())
    assert torch.equal(got, want)


def test_a_budget_below_the_resident_part_is_refused_with_what_fits(checkpoints):
    _, root = checkpoints
    directory = root / "bin"
    with torch.device("meta"):
        model = SwitchT5(config_from_hf(json.loads((directory / "config.json").read_text())))
    plan = plan_placement(model, "float32")
    least = minimum_budget(plan.dense_bytes, plan.expert_bytes)
    with pytest.raises(ValueError, match=r"^--max-memory: .* cannot hold this model: .* at least") as err:
        from_hf(directory, dtype="float32", max_memory=least - 1)
    assert "\n" not in str(err.value)
    smallest = from_hf(directory, dtype="float32", max_memory=least)  # what the message names is enough
    assert smallest.expert_cache is not None and smallest.expert_cache.budget_bytes >= plan.expert_bytes
    outputs(smallest.eval())  # and runs, one expert at a time
    assert smallest.expert_cache.peak_bytes <= plan.expert_bytes


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_a_truncated_shard_is_one_line_naming_it(checkpoints, layout, tmp_path):
    import shutil

    _, root = checkpoints
    directory = tmp_path / layout
    shutil.copytree(root / layout, directory)
    shard = sorted(p for p in directory.iterdir() if p.suffix in (".bin", ".safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        from_hf(directory, dtype="float32", max_memory=budget_for(directory, "float32", 3))
    message = str(err.value)
    assert message.startswith(f"{shard}: damaged") and "\n" not in message


def test_int8_and_a_budget_need_a_directory(checkpoints):
    hf, _ = checkpoints
    with pytest.raises(ValueError, match="need a checkpoint directory"):
        from_hf(hf, dtype="int8")


def test_the_streamed_safetensors_writer_writes_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file

    from switchformer.runs.files import write_file_atomic
    from switchformer.runs.safetensors_stream import StreamedTensor, streamed_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 4, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randint(-128, 127, (2, 3), generator=g).to(torch.int8),
        "d": torch.tensor(2.5),
        "e": torch.zeros(0, 4),
        "f": torch.tensor([True, False, True]),
    }
    entries = [
        StreamedTensor(k, v.dtype, tuple(v.shape), (lambda v=v: list(v.unbind(0)) if v.dim() > 1 else [v]))
        for k, v in tensors.items()
    ]
    write_file_atomic(tmp_path / "x.safetensors", streamed_safetensors(entries, {"format": "pt"}))
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    short = [StreamedTensor("a", torch.float32, (3, 4, 5), lambda: [tensors["a"][0]])]
    with pytest.raises(ValueError, match=r"a: 80 bytes written, its shape \[3, 4, 5\] needs 240"):
        write_file_atomic(tmp_path / "y.safetensors", streamed_safetensors(short))
    assert not (tmp_path / "y.safetensors").exists() and not list(tmp_path.glob(".y*"))


@pytest.mark.parametrize("dtype", [None, "bfloat16", "int8"])
def test_convert_streams_a_directory_into_a_run_that_loads_as_the_directory(checkpoints, tmp_path, dtype):
    from switchformer.lifecycle.convert import convert
    from switchformer.train.run import load_run

    _, root = checkpoints
    convert(root / "bin", tmp_path / "run", dtype)  # bf16 .bin shards
    compute = "int8" if dtype == "int8" else (dtype or "bfloat16")  # the run keeps the shards' bf16 by default
    want, tokens = outputs(from_hf(root / "bin", dtype=compute).eval())
    run, _, _ = load_run(tmp_path / "run", need_tokenizer=False, dtype=None if dtype == "int8" else compute)
    got, got_tokens = outputs(run.eval())  # int8 runs load int8 by themselves
    assert torch.equal(got, want) and torch.equal(got_tokens, tokens)
    offloaded, _, _ = load_run(tmp_path / "run", need_tokenizer=False, dtype=compute,
                               max_memory=budget_for(root / "bin", compute, 3))  # fmt: skip
    assert torch.equal(outputs(offloaded.eval())[0], want)
    assert offloaded.expert_cache.evictions > 0
    if dtype == "int8":  # stored int8, computed in float32: dequantised alike resident and offloaded
        resident, _, _ = load_run(tmp_path / "run", need_tokenizer=False, dtype="float32")
        offloaded, _, _ = load_run(tmp_path / "run", need_tokenizer=False, dtype="float32",
                                   max_memory=budget_for(root / "bin", "float32", 3))  # fmt: skip
        dequantised, _ = outputs(resident.eval())
        assert torch.equal(outputs(offloaded.eval())[0], dequantised)
        torch.testing.assert_close(dequantised, want, rtol=1e-4, atol=1e-4)  # int8 weights either way


def test_int8_has_no_hugging_face_format(checkpoints, tmp_path):
    from switchformer.lifecycle.convert import convert

    _, root = checkpoints
    convert(root / "safetensors", tmp_path / "run")
    with pytest.raises(ValueError, match="--dtype: int8 experts have no Hugging Face format"):
        convert(tmp_path / "run", tmp_path / "hf", "int8")


def word_tokenizer(path):
    """A word-level tokenizer of the tiny model's vocabulary (96 ids): <pad> 0, </s> 1, <unk> 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_generate_reads_a_hugging_face_directory_within_a_budget(checkpoints, tmp_path, capsys):
    import shutil

    from switchformer.cli import main

    _, root = checkpoints
    directory = tmp_path / "hf"
    shutil.copytree(root / "bin", directory)
    word_tokenizer(directory / "tokenizer.json")
    args = ["generate", str(directory), "--prompt", "w5 w17 w40 w3 w88", "--greedy", "--max-new-tokens", "8"]
    assert main(args) == 0
    resident = capsys.readouterr().out
    assert len(resident.split()) > 5, resident  # the prompt's five words and what was generated
    assert main([*args, "--max-memory", str(budget_for(directory, "float32", 3))]) == 0
    out = capsys.readouterr()
    assert out.out == resident and "expert cache:" in out.err
