"""Smoke tests of the benchmarks: the translation anchor (`benchmarks/mt_baseline.py`) runs end to
end on a tiny slice, the tuning split (`benchmarks/mt_tuning_split.py`) keeps languages aligned, the
big-checkpoint writer's directories read alike, and the GPU suite's steps run at toy sizes."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_lines(path: Path, rows: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    return path


def test_sinusoids_follow_the_paper_formula():
    table = load("mt_baseline").sinusoids(10, 8)
    for pos in (0, 3, 9):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_anchor_beam_search_of_one_beam_is_greedy():
    mt = load("mt_baseline")
    torch.manual_seed(0)
    model = mt.Anchor(50, pad=0, d_model=32, num_heads=4, num_layers=1, d_ff=64, dropout=0.0).eval()
    src = torch.randint(3, 50, (1, 7))
    greedy = mt.greedy(model, src, eos=1, max_new=12)[0]
    assert mt.beam(model, src, eos=1, max_new=12, num_beams=1, length_penalty=0.0) == greedy


def test_anchor_runs_on_a_tiny_slice(tmp_path):
    pytest.importorskip("sacrebleu")
    mt = load("mt_baseline")
    words = ["zap", "grop", "snib", "rast", "plim", "vorn"]
    english = ["one", "two", "three", "four", "five", "six"]
    src = [" ".join(words[(i + j) % 6] for j in range(1 + i % 4)) for i in range(60)]
    tgt = [" ".join(english[(i + j) % 6] for j in range(1 + i % 4)) for i in range(60)]
    paths = [write_lines(tmp_path / "train.xx.gz", src), write_lines(tmp_path / "train.en.gz", tgt)]
    out = tmp_path / "anchor.json"
    args = ["--data", *map(str, paths), "--valid", *map(str, paths), "--vocab-size", "400", "--max-steps", "6"]
    args += ["--batch-size", "16", "--eval-every", "3", "--limit-valid", "8", "--num-beams", "2", "--out", str(out)]
    result = mt.main(args)
    assert result == json.loads(out.read_text())
    assert result["steps"] == 6 and [point["step"] for point in result["curve"]] == [3, 6]
    assert math.isfinite(result["valid_loss"]) and result["valid_loss"] > 0
    assert set(result["beams_1"]) == {"bleu", "chrf"} and set(result["beams_2"]) == {"bleu", "chrf"}
    assert "tok:13a" in result["signature"]


def test_tuning_split_keeps_languages_aligned_and_duplicates_together(tmp_path):
    split = load("mt_tuning_split")
    english = [f"caption {i % 150}" for i in range(400)]  # duplicates: each caption 2-3 times
    german = [f"bildunterschrift {i} ({e})" for i, e in enumerate(english)]
    write_lines(tmp_path / "train.en.gz", english)
    write_lines(tmp_path / "train.de.gz", german)
    split.main([str(tmp_path), str(tmp_path / "out"), "--every", "5"])

    def read(name):
        return gzip.open(tmp_path / "out" / name, "rt", encoding="utf-8").read().splitlines()

    tune_en, tune_de, rest_en = read("tune.en.gz"), read("tune.de.gz"), read("rest.en.gz")
    assert len(tune_en) == len(tune_de) and len(tune_en) + len(rest_en) == 400
    assert 40 < len(tune_en) < 130  # about one in five
    assert all(de.endswith(f"({en})") for en, de in zip(tune_en, tune_de))  # the same rows in both languages
    assert not set(tune_en) & set(rest_en)  # a duplicated caption never straddles the split
    # the choice is a function of the text, not of the file's order
    assert split.tuning_rows(english[::-1], 5) == split.tuning_rows(english, 5)[::-1]


@pytest.mark.hf
def test_big_checkpoints_writes_a_directory_ours_and_transformers_read_alike(tmp_path):
    """`benchmarks/big_checkpoints.py` end to end on a tiny Switch: random bf16 .bin shards in
    Hugging Face's format, measured by ours (experts offloaded) and by transformers + accelerate;
    both give the same greedy tokens, and the table reads the JSON."""
    import subprocess

    pytest.importorskip("accelerate")
    script = str(BENCHMARKS / "big_checkpoints.py")
    directory = tmp_path / "tiny"
    subprocess.run([sys.executable, script, "write", "tiny", str(directory), "--format", "bin"], check=True)
    index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"] and (directory / "config.json").exists()
    results = {}
    for impl, budget in (("ours", "1MiB"), ("transformers", "2GiB")):
        out = tmp_path / f"{impl}.json"
        command = [sys.executable, script, "measure", str(directory), "--impl", impl, "--dtype", "float32",
                   "--max-memory", budget, "--no-cgroup", "--new-tokens", "4", "--threads", "1", "--json", str(out)]
        if impl == "ours":
            command += ["--concurrent", "2"]
        subprocess.run(command, check=True, capture_output=True)
        results[impl] = json.loads(out.read_text())
        assert results[impl]["exit_code"] == 0 and results[impl]["load_s"] > 0
    ours, theirs = results["ours"], results["transformers"]
    cache = ours["expert_cache"]
    assert cache["misses"] > 0 and cache["peak_bytes"] <= cache["budget_bytes"]
    assert ours["concurrent_tokens_per_s"] > 0
    assert ours["tokens"][1:] == theirs["tokens"][1:]  # after the decoder's start token (HF's own may differ)
    table = subprocess.run([sys.executable, script, "table", str(tmp_path / "ours.json")], check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "| tiny | ours | float32 | 1MiB | 0 |" in table


def test_big_checkpoints_int8_run_has_the_layout_convert_writes(tmp_path):
    """`write --format int8-run` (random weights written directly as an int8 run) holds the tensors,
    dtypes, shapes, metadata and model config that `convert --dtype int8` writes of the same
    architecture's bf16 checkpoint, and `measure` decodes it with experts offloaded."""
    import subprocess

    from safetensors import safe_open

    from switchformer.lifecycle.convert import convert

    script = str(BENCHMARKS / "big_checkpoints.py")
    subprocess.run([sys.executable, script, "write", "tiny", str(tmp_path / "hf"), "--format", "safetensors"],
                   check=True, capture_output=True)  # fmt: skip
    convert(tmp_path / "hf", tmp_path / "converted", dtype="int8")
    subprocess.run([sys.executable, script, "write", "tiny", str(tmp_path / "direct"), "--format", "int8-run"],
                   check=True, capture_output=True)  # fmt: skip

    def layout(run):
        with safe_open(str(run / "model.safetensors"), "pt") as f:
            return f.metadata(), {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}

    assert layout(tmp_path / "direct") == layout(tmp_path / "converted")
    config = lambda run: json.loads((run / "config.json").read_text())  # noqa: E731
    assert config(tmp_path / "direct")["model"] == config(tmp_path / "converted")["model"]
    with safe_open(str(tmp_path / "direct" / "model.safetensors"), "pt") as f:
        q = f.get_tensor("encoder.blocks.1.ffn.mlp.experts.w_in.qweight").float()
        scale = f.get_tensor("encoder.blocks.1.ffn.mlp.experts.w_in.scale")
    weight_std = (q * scale[..., None]).std().item()
    assert weight_std == pytest.approx(64**-0.5, rel=0.05)  # N(0, 1/fan_in)-sized, as the bf16 writer's
    out = tmp_path / "m.json"
    subprocess.run([sys.executable, script, "measure", str(tmp_path / "direct"), "--dtype", "int8", "--max-memory",
                    "1MiB", "--no-cgroup", "--new-tokens", "4", "--threads", "1", "--json", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["exit_code"] == 0 and len(result["tokens"]) == 5 and result["expert_cache"]["misses"] > 0


@pytest.mark.slow
@pytest.mark.hf
def test_the_gpu_suite_runs_its_decoding_and_serving_steps_at_toy_sizes(tmp_path):
    """`benchmarks/gpu_suite.py --smoke` on the CPU: the steps a lent GPU runs (here the static
    decoding benchmark, which asserts equal tokens, and the server under load) run and log."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    suite = load("gpu_suite")
    status = suite.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--only", "static_decoding",
                         "serve_load"])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "gpu_suite.jsonl").read_text().splitlines()]
    assert status == 0 and [(r["step"], r["status"]) for r in rows] == [("static_decoding", 0), ("serve_load", 0)]
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "| t5 | 4 | 1 |" in log and "| lm | 4 | 2 |" in log  # the static decoding table, both families
    assert "| clients | tokens/s |" in log
