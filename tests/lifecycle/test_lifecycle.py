"""The sparse model's life cycle: ``switchformer upcycle`` (a dense checkpoint into a Switch
model whose experts copy each FFN; top-2 with renormalised gates keeps the dense function at step 0)
and ``switchformer distill`` (a Switch teacher into a dense student, alpha * T^2 * soft CE +
(1 - alpha) * hard CE). Every check compares against an independent reference: the dense model's
own logits, Hugging Face's forward, hand-written loops, a plain training of the same student."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import shared
import torch
import torch.nn.functional as F
from shared import snapshot

from switchformer.cli import main
from switchformer.lifecycle.distill import (
    DistillTrainer,
    build_student,
    distillation_loss,
    student_init_state,
)
from switchformer.lifecycle.upcycle import sparse_config, upcycle_model
from switchformer.models import SwitchLM, SwitchLMConfig, SwitchT5, SwitchT5Config
from switchformer.moe.layer import SwitchMoE, switch_layers
from switchformer.train.evaluation import model_forward
from switchformer.train.run import load_run
from switchformer.train.trainer import Trainer

TEXT = shared.TEXT * 30  # the corpus of the run tests
CORPUS_DOCS, CORPUS_REPEATS = 0, 30  # the conftest corpus: one file of TEXT


def one_line_error(capsys) -> str:
    """The stderr of a failed ``main``: exactly one line, ``switchformer: error: ...``."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("switchformer: error: "), err
    assert "Traceback" not in err
    return lines[0]


def eval_loss(run, capsys) -> float:
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["eval_loss"]


@pytest.fixture(scope="module", autouse=True)
def tokenizer_cache(tmp_path_factory):
    """Converted tokenizers go to a folder of the tests, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWITCHFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def train_run(root: Path, name: str, corpus: Path, *flags: str) -> Path:
    args = ["train", "--preset", "test", "--data", str(corpus), "--set", "vocab_size=400"]
    args += ["--out-dir", str(root), "--run-name", name, "--no-progress", *flags]
    assert main(args) == 0
    return root / name


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, corpus) -> Path:
    """A native dense LM run (sparse_step=0), 20 steps."""
    return train_run(tmp_path_factory.mktemp("dense"), "dense", corpus, "--model", "lm", "--set", "sparse_step=0",
                     "--max-steps", "20")  # fmt: skip


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, corpus) -> Path:
    """A Switch LM run (the test preset: 4 experts every other layer, top-1), 30 steps."""
    return train_run(tmp_path_factory.mktemp("teacher"), "teacher", corpus, "--model", "lm", "--max-steps", "30")


# ----------------------------------------------------------------------------- upcycling: native models


def expected_sparse_layers(num_layers: int, step: int) -> list[int]:
    """Hugging Face's layout, written out: every layer for step 1, else the layers i with i % step == 1."""
    return [i for i in range(num_layers) if step == 1 or i % step == 1]


def lm_dense() -> SwitchLM:
    torch.manual_seed(0)
    config = SwitchLMConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=2, d_ff=48, max_seq_len=32,
                            sparse_step=0, init_scale=1.0)  # fmt: skip
    return SwitchLM(config).eval()


def t5_dense() -> SwitchT5:
    torch.manual_seed(0)
    config = SwitchT5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=3, num_decoder_layers=2,
                            num_heads=2, dropout_rate=0.0, encoder_sparse_step=0, decoder_sparse_step=0,
                            init_scale=1.0, activation="gated-gelu", tie_word_embeddings=False)  # fmt: skip
    return SwitchT5(config).eval()


def lm_inputs(seed: int):
    """(kwargs, positions to compare): left-padded rows of random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 12), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :7] = False
    ids = ids.masked_fill(~mask, 0)
    if seed % 2:
        return dict(input_ids=ids, attention_mask=mask.long()), mask
    return dict(input_ids=ids), torch.ones_like(mask)  # one without any mask


def t5_inputs(seed: int):
    """(kwargs, decoder positions to compare): padded sources, labels padded with -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[2, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(3, 64, (3, 7), generator=g)
    labels[1, 4:] = -100
    labels[2, 6:] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels), labels != -100


def build_upcycled(family: str, step: int, top_k: int, seed: int = 5):
    dense = lm_dense() if family == "lm" else t5_dense()
    config = sparse_config(dense.config, num_experts=4, sparse_step=step, top_k=top_k)
    torch.manual_seed(seed)
    sparse = (SwitchLM if family == "lm" else SwitchT5)(config)
    fresh = copy.deepcopy(sparse.state_dict())
    upcycle_model(dense, sparse)
    return dense, sparse.eval(), fresh


def dense_ffn_weights(dense) -> dict[str, torch.Tensor]:
    """``{slot prefix: (w_in, w_out)}`` of every FFN of the dense model, by state-dict names."""
    state = dense.state_dict()
    return {name[: -len(".mlp.w_in")]: (state[name], state[name[: -len("w_in")] + "w_out"])
            for name in state if name.endswith(".ffn.mlp.w_in")}  # fmt: skip


def stack_layer_prefixes(family: str, step: int) -> list[str]:
    if family == "lm":
        return [f"blocks.{i}.ffn" for i in expected_sparse_layers(4, step)]
    return [f"encoder.blocks.{i}.ffn" for i in expected_sparse_layers(3, step)] + [
        f"decoder.blocks.{i}.ffn" for i in expected_sparse_layers(2, step)
    ]


@pytest.mark.parametrize("family", ["lm", "t5"])
@pytest.mark.parametrize("step", [1, 2])
def test_top2_upcycling_copies_every_ffn_and_keeps_the_dense_function(family, step):
    dense, sparse, fresh = build_upcycled(family, step, top_k=2)
    config = sparse.config
    assert (config.num_experts, config.top_k, config.normalize_gates) == (4, 2, True)
    assert config.capacity_factor is None and config.eval_capacity_factor is None  # dropless
    assert config.router_jitter_noise == 0.0

    dense_state, sparse_state = dense.state_dict(), sparse.state_dict()
    switch_slots = stack_layer_prefixes(family, step)
    slots = [name for name, m in sparse.named_modules() if isinstance(m, SwitchMoE)]
    assert slots == [f"{p}.mlp" for p in switch_slots]
    # names: the sparse model adds exactly each Switch layer's router and experts, and lacks exactly their FFNs
    added = {f"{p}.mlp.{w}" for p in switch_slots for w in ("router.weight", "experts.w_in", "experts.w_out")}
    removed = {f"{p}.mlp.{w}" for p in switch_slots for w in ("w_in", "w_out")}
    assert set(sparse_state) - set(dense_state) == added
    assert set(dense_state) - set(sparse_state) == removed
    for name in set(sparse_state) & set(dense_state):  # embeddings, attention, norms, the dense FFNs
        assert torch.equal(sparse_state[name], dense_state[name]), name
    ffns = dense_ffn_weights(dense)
    for prefix in switch_slots:
        w_in, w_out = ffns[prefix]
        for e in range(4):  # every expert is the FFN it replaced, exactly
            assert torch.equal(sparse_state[f"{prefix}.mlp.experts.w_in"][e], w_in), (prefix, e)
            assert torch.equal(sparse_state[f"{prefix}.mlp.experts.w_out"][e], w_out), (prefix, e)
        router = sparse_state[f"{prefix}.mlp.router.weight"]
        assert torch.equal(router, fresh[f"{prefix}.mlp.router.weight"])  # its fresh initialisation, kept
        assert router.abs().sum() > 0

    inputs = lm_inputs if family == "lm" else t5_inputs
    with torch.no_grad():
        for seed in range(4):
            kwargs, real = inputs(seed)
            want, got = dense(**kwargs).logits, sparse(**kwargs).logits
            assert want.abs().max() > 1.0  # outputs that are not tiny
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
            if family == "t5":  # the loss scores the same positions
                torch.testing.assert_close(sparse(**kwargs).ce_loss, dense(**kwargs).ce_loss, atol=1e-5, rtol=0)

        # the comparison sees the experts and the gates: several experts are chosen; un-normalised
        # gates or a changed expert change the logits
        kwargs, real = inputs(1)
        out = sparse(**kwargs)
        assert len(out.router_stats.layers) == len(switch_slots)
        for _, aux in out.router_stats.layers:
            assert int((aux.tokens_per_expert > 0).sum()) >= 2 and int(aux.dropped.sum()) == 0
        want = dense(**kwargs).logits[real]
        for layer in switch_layers(sparse):
            layer.router.normalize_gates = False
        assert (sparse(**kwargs).logits[real] - want).abs().max() > 1e-2
        for layer in switch_layers(sparse):
            layer.router.normalize_gates = True
            layer.experts.w_out[1].mul_(1.5)
        assert (sparse(**kwargs).logits[real] - want).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["lm", "t5"])
def test_top1_upcycling_copies_the_ffns_but_not_the_function(family):
    """Switch's top-1 scales the chosen expert by its router probability: the copies are exact, the
    function is not the dense one (as the docs say)."""
    dense, sparse, _ = build_upcycled(family, 2, top_k=1)
    assert (sparse.config.top_k, sparse.config.normalize_gates) == (1, False)
    ffns, state = dense_ffn_weights(dense), sparse.state_dict()
    for prefix in stack_layer_prefixes(family, 2):
        for e in range(4):
            assert torch.equal(state[f"{prefix}.mlp.experts.w_in"][e], ffns[prefix][0])
            assert torch.equal(state[f"{prefix}.mlp.experts.w_out"][e], ffns[prefix][1])
    kwargs, real = (lm_inputs if family == "lm" else t5_inputs)(1)
    with torch.no_grad():
        assert (sparse(**kwargs).logits[real] - dense(**kwargs).logits[real]).abs().max() > 1e-2


def test_sparse_config_refuses_what_cannot_be_upcycled():
    config = lm_dense().config
    for kwargs, message in [
        (dict(num_experts=1, sparse_step=2, top_k=2), "--num-experts"),
        (dict(num_experts=4, sparse_step=0, top_k=2), "--sparse-step"),
        (dict(num_experts=4, sparse_step=2, top_k=3), "--top-k"),
        (dict(num_experts=2, sparse_step=2, top_k=0), "--top-k"),
    ]:
        with pytest.raises(ValueError, match=message):
            sparse_config(config, **kwargs)


def test_a_sparse_step_that_makes_no_switch_layer_is_refused():
    torch.manual_seed(0)
    dense = SwitchLM(SwitchLMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, d_ff=48, sparse_step=0))
    sparse = SwitchLM(sparse_config(dense.config, 4, 2, 2))  # layer 0 of 1 is no Switch layer at step 2
    with pytest.raises(ValueError, match="--sparse-step: no layer"):
        upcycle_model(dense, sparse)


def test_expert_noise_in_upcycle_model_is_relative_to_the_weights_spread():
    dense = lm_dense()
    sparse = SwitchLM(sparse_config(dense.config, 4, 1, 2))
    upcycle_model(dense, sparse, expert_noise=0.05, generator=torch.Generator().manual_seed(0))
    ffns = dense_ffn_weights(dense)
    for i, layer in enumerate(switch_layers(sparse)):
        for weight, copied in ((layer.experts.w_in, ffns[f"blocks.{i}.ffn"][0]),
                               (layer.experts.w_out, ffns[f"blocks.{i}.ffn"][1])):  # fmt: skip
            relative = (weight.detach() - copied).std() / copied.std()
            assert 0.04 < relative < 0.06


# ----------------------------------------------------------------------------- upcycling: Hugging Face T5


@pytest.fixture(params=[("relu", []), ("gated-gelu", ["--sparse-step", "1"])], ids=["t5-v1.0-relu", "t5-v1.1-gated"])
def hf_t5_dir(request, tmp_path):
    transformers = pytest.importorskip("transformers")
    from switchformer.data.tokenizer import train_tokenizer

    proj, flags = request.param
    tokenizer = train_tokenizer([TEXT], 400, "bpe")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
        num_decoder_layers=3, feed_forward_proj=proj, tie_word_embeddings=proj == "relu", dropout_rate=0.0,
        decoder_start_token_id=0,
    )  # fmt: skip
    folder = tmp_path / "hf-t5"
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, model, flags


def test_upcycling_a_hugging_face_t5_through_the_cli_keeps_its_logits(hf_t5_dir, tmp_path, capsys):
    folder, hf_model, flags = hf_t5_dir
    before = snapshot(folder)
    out = tmp_path / "t5-moe"
    assert main(["upcycle", str(folder), str(out), "--num-experts", "4", *flags]) == 0
    assert "the dense model's function at step 0" in capsys.readouterr().out
    assert snapshot(folder) == before  # the source is only read
    saved = json.loads((out / "config.json").read_text())
    settings = run_settings(out)
    assert saved["model"]["num_experts"] == 4 and saved["model"]["top_k"] == 2
    assert saved["model"]["normalize_gates"] is True
    assert saved["model"]["capacity_factor"] is None and saved["model"]["eval_capacity_factor"] is None
    assert settings["num_experts"] == 4 and settings["top_k"] == 2 and settings["model"] == "t5"
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()

    model, tokenizer, _ = load_run(out)
    assert tokenizer is not None
    layers = switch_layers(model)
    assert len(layers) == (5 if flags else 2)  # step 1: 2 encoder + 3 decoder layers; step 2: one of each
    hf_state = hf_model.state_dict()
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, SwitchMoE)):
        stack, _, index = name.split(".")[:3]
        hf_layer = f"{stack}.block.{index}.layer.{1 if stack == 'encoder' else 2}.DenseReluDense"
        hf_out = hf_state[f"{hf_layer}.wo.weight"].T  # [d_ff, d_model], as ours
        for e in range(4):
            assert torch.equal(layer.experts.w_out[e], hf_out)
        assert all(torch.equal(layer.experts.w_in[e], layer.experts.w_in[0]) for e in range(4))

    g = torch.Generator().manual_seed(0)
    vocab = hf_model.config.vocab_size
    for _ in range(3):
        ids = torch.randint(3, vocab, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        ids = ids.masked_fill(mask == 0, 0)
        decoder_ids = torch.randint(3, vocab, (3, 6), generator=g)
        with torch.no_grad():
            want = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
            got = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- upcycling: native runs, CLI


@pytest.fixture(scope="module")
def upcycled_run(dense_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("up") / "upcycled"
    before = snapshot(dense_run)
    assert main(["upcycle", str(dense_run), str(out), "--num-experts", "4"]) == 0
    assert snapshot(dense_run) == before
    return out


def test_an_upcycled_run_scores_as_its_dense_source(dense_run, upcycled_run, capsys):
    saved = json.loads((upcycled_run / "config.json").read_text())
    settings = run_settings(upcycled_run)
    assert saved["model"]["sparse_step"] == 2 and saved["model"]["num_experts"] == 4
    assert settings["sparse_step"] == 2 and settings["normalize_gates"] is True
    assert (upcycled_run / "tokenizer.json").read_bytes() == (dense_run / "tokenizer.json").read_bytes()
    model, _, _ = load_run(upcycled_run)
    assert len(switch_layers(model)) == 1  # 2 layers, every other one Switch
    dense_loss, upcycled_loss = eval_loss(dense_run, capsys), eval_loss(upcycled_run, capsys)
    assert abs(dense_loss - upcycled_loss) < 1e-5


def test_a_checkpoint_upcycles_as_itself(dense_run, tmp_path, capsys):
    checkpoint = sorted((dense_run / "checkpoints").iterdir())[0]  # not the latest
    out = tmp_path / "from-checkpoint"
    assert main(["upcycle", str(checkpoint), str(out), "--num-experts", "2", "--sparse-step", "1"]) == 0
    assert (out / "tokenizer.json").read_bytes() == (dense_run / "tokenizer.json").read_bytes()
    want, latest = eval_loss(checkpoint, capsys), eval_loss(dense_run, capsys)
    assert abs(eval_loss(out, capsys) - want) < 1e-5 and abs(want - latest) > 1e-4


def test_an_upcycled_run_trains_further(upcycled_run, corpus, tmp_path, capsys):
    start = eval_loss(upcycled_run, capsys)
    args = ["train", "--init-from", str(upcycled_run), "--preset", "test", "--data", str(corpus), "--max-steps", "15",
            "--set", "optimizer=adamw", "--set", "lr=1e-3", "--set", "dropout=0", "--set", "expert_dropout=0",
            "--out-dir", str(tmp_path), "--run-name", "tuned", "--no-progress"]  # fmt: skip
    before = snapshot(upcycled_run)
    assert main(args) == 0
    assert snapshot(upcycled_run) == before
    model, _, _ = load_run(tmp_path / "tuned")
    assert len(switch_layers(model)) == 1 and model.config.top_k == 2 and model.config.normalize_gates
    assert eval_loss(tmp_path / "tuned", capsys) < start - 0.05


def test_expert_noise_breaks_the_symmetry_by_about_its_size(dense_run, tmp_path, capsys):
    out = tmp_path / "noisy"
    assert main(["upcycle", str(dense_run), str(out), "--num-experts", "4", "--expert-noise", "0.05"]) == 0
    assert "up to the expert noise" in capsys.readouterr().out
    dense, _, _ = load_run(dense_run)
    model, _, _ = load_run(out)
    (layer,) = switch_layers(model)
    ffn = dense.blocks[1].ffn.mlp
    for weight, copied in ((layer.experts.w_in, ffn.w_in), (layer.experts.w_out, ffn.w_out)):
        weight, copied = weight.detach(), copied.detach()
        for e in range(4):
            relative = float((weight[e] - copied).std() / copied.std())
            assert 0.03 <= relative <= 0.07, relative
            for other in range(e):
                assert not torch.allclose(weight[e], weight[other])
    # a small perturbation of the function, not another model
    assert abs(eval_loss(out, capsys) - eval_loss(dense_run, capsys)) < 0.05


def test_top1_through_the_cli_says_it_is_not_the_dense_function(dense_run, tmp_path, capsys):
    out = tmp_path / "top1"
    assert main(["upcycle", str(dense_run), str(out), "--num-experts", "4", "--top-k", "1"]) == 0
    assert "not the dense function" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["top_k"] == 1 and saved["normalize_gates"] is False


@pytest.mark.parametrize(
    "case, message",
    [
        ("sparse", "already sparse"),
        ("one-expert", "--num-experts: must be >= 2"),
        ("step-0", "--sparse-step: must be >= 1"),
        ("non-empty", "already holds files"),
        ("inside", "inside the source"),
        ("inside-checkpoint", "inside the source"),
        ("missing", "not found"),
        ("noise", "--expert-noise: must be"),
        ("noise-nan", "--expert-noise: must be"),
    ],
)
def test_upcycle_refuses_bad_input_in_one_line_and_writes_nothing(case, message, dense_run, teacher_run, tmp_path,
                                                                   capsys):  # fmt: skip
    source, out = dense_run, tmp_path / "out"
    flags = ["--num-experts", "4"]
    if case == "sparse":
        source = teacher_run
    elif case == "one-expert":
        flags = ["--num-experts", "1"]
    elif case == "step-0":
        flags += ["--sparse-step", "0"]
    elif case == "non-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "inside":
        out = dense_run / "upcycled"
    elif case == "inside-checkpoint":
        source = sorted((dense_run / "checkpoints").iterdir())[-1]
        out = dense_run / "checkpoints" / "upcycled"
    elif case == "missing":
        source = tmp_path / "no-such-run"
    elif case == "noise":
        flags += ["--expert-noise", "-1"]
    elif case == "noise-nan":
        flags += ["--expert-noise", "nan"]
    before = snapshot(source) if source.exists() else None
    capsys.readouterr()
    assert main(["upcycle", str(source), str(out), *flags]) == 2
    assert message in one_line_error(capsys)
    if case == "non-empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    else:
        assert not out.exists()
    if before is not None:
        assert snapshot(source) == before


def test_upcycle_top_k_is_one_or_two(dense_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["upcycle", str(dense_run), str(tmp_path / "out"), "--num-experts", "4", "--top-k", "3"])
    assert exit_info.value.code == 2
    assert "--top-k" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- distillation loss


def reference_distillation(student, teacher, scored, temperature) -> float:
    """T^2 * the mean over scored positions of -sum_v p_teacher(v) log p_student(v), with loops."""
    total, count = 0.0, 0
    rows, cols, vocab = student.shape
    for b in range(rows):
        for t in range(cols):
            if not scored[b][t]:
                continue
            s = [float(student[b, t, v]) / temperature for v in range(vocab)]
            q = [float(teacher[b, t, v]) / temperature for v in range(vocab)]
            s_norm = math.log(sum(math.exp(x) for x in s))
            q_norm = sum(math.exp(x) for x in q)
            total += -sum(math.exp(q[v]) / q_norm * (s[v] - s_norm) for v in range(vocab))
            count += 1
    return temperature**2 * total / count


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_matches_a_hand_written_reference(temperature):
    g = torch.Generator().manual_seed(int(temperature))
    student = torch.randn(2, 5, 7, generator=g) * 2
    teacher = torch.randn(2, 5, 7, generator=g) * 2
    scored = torch.ones(2, 5, dtype=torch.bool)
    scored[0, 3:] = False
    scored[1, 0] = False
    got = distillation_loss(student, teacher, scored, temperature)
    assert got.dtype == torch.float32
    assert abs(float(got) - reference_distillation(student, teacher, scored, temperature)) < 1e-5
    # every position scored: the mean over all of them
    everything = torch.ones_like(scored)
    assert abs(float(distillation_loss(student, teacher, everything, temperature))
               - reference_distillation(student, teacher, everything, temperature)) < 1e-5  # fmt: skip
    # bf16 logits are scored in float32
    low = distillation_loss(student.bfloat16(), teacher.bfloat16(), scored, temperature)
    assert low.dtype == torch.float32
    # T^2 keeps the gradient's scale: d/ds = T * (softmax(s/T) - softmax(t/T)) / N at each scored position
    s = student.clone().requires_grad_(True)
    distillation_loss(s, teacher, scored, temperature).backward()
    n = int(scored.sum())
    want = temperature * (torch.softmax(student / temperature, -1) - torch.softmax(teacher / temperature, -1)) / n
    torch.testing.assert_close(s.grad[scored], want[scored])
    assert torch.all(s.grad[~scored] == 0)
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(student, teacher[..., :5], scored, temperature)


def test_alpha_mixing_is_the_cross_entropy_against_the_mixed_target():
    """alpha * soft + (1 - alpha) * hard at T = 1 is the cross-entropy against alpha * p_teacher +
    (1 - alpha) * onehot(label): the Switch paper's formulation."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(3, 4, 9, generator=g)
    teacher = torch.randn(3, 4, 9, generator=g) * 3
    labels = torch.randint(0, 9, (3, 4), generator=g)
    scored = torch.rand(3, 4, generator=g) > 0.3
    scored[0, 0] = True
    hard = F.cross_entropy(student[scored], labels[scored])
    soft = distillation_loss(student, teacher, scored, 1.0)
    for alpha in (0.0, 0.25, 0.75, 1.0):
        mixed = alpha * torch.softmax(teacher, -1) + (1 - alpha) * F.one_hot(labels, 9).float()
        total, count = 0.0, 0
        for b in range(3):
            for t in range(4):
                if scored[b, t]:
                    log_p = torch.log_softmax(student[b, t], -1)
                    total += -float((mixed[b, t] * log_p).sum())
                    count += 1
        assert abs(float(alpha * soft + (1 - alpha) * hard) - total / count) < 1e-5


# ----------------------------------------------------------------------------- distillation: the student


def is_expert_or_router(name: str) -> bool:
    return ".router." in name or ".experts." in name


def expected_copies(teacher_state: dict, student_state: dict) -> set[str]:
    """The teacher's weights a student starts from, by name: every one that is no router or expert
    weight and has a place of its shape in the student."""
    return {
        name
        for name, value in teacher_state.items()
        if not is_expert_or_router(name) and name in student_state and student_state[name].shape == value.shape
    }


@pytest.mark.parametrize("sets", [{}, {"num_layers": 1}, {"d_ff": 32}], ids=["twin", "fewer-layers", "narrower"])
def test_the_student_starts_from_the_teachers_shared_weights(teacher_run, tmp_path, sets):
    teacher, train, model_values = build_student(teacher_run, tmp_path / "student", dict(sets), 5)
    assert train.sparse_step == 0 and train.max_steps == 5 and train.run_name == "student"
    assert train.tokenizer == str((teacher_run / "tokenizer.json").resolve())
    state, copied = student_init_state(teacher, train, model_values)
    teacher_state = teacher.state_dict()
    assert model_values["vocab_size"] == teacher.config.vocab_size
    expected = expected_copies(teacher_state, state)
    assert set(copied) == expected
    assert len(copied) == len(set(copied))
    if not sets:  # the twin: every non-expert weight of the teacher has its place in the student
        assert expected == {name for name in teacher_state if not is_expert_or_router(name)}
        assert model_values["d_ff"] == teacher.config.d_ff and model_values["sparse_step"] == 0
    for name in copied:
        assert torch.equal(state[name], teacher_state[name]), name
    # the FFNs in the Switch layers' places are fresh: none of the teacher's experts
    places = [name for name in teacher_state if name.endswith(".mlp.experts.w_in")]
    assert places
    for name in places:
        student_name = name.replace(".experts.", ".")
        if student_name not in state:
            continue  # a student without that layer
        assert student_name not in copied
        for expert in teacher_state[name]:
            assert expert.shape != state[student_name].shape or not torch.equal(expert, state[student_name])
    # a student of no Switch layer, built from the model values
    from switchformer.train.run import build_model_from_dict

    student = build_model_from_dict("lm", model_values, "student")
    assert not switch_layers(student)
    if "d_ff" in sets:
        assert student.blocks[0].ffn.mlp.w_out.shape[0] == 32


@pytest.fixture(scope="module")
def distilled_run(teacher_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distilled") / "student"
    before = snapshot(teacher_run)
    teacher_before, _, _ = load_run(teacher_run)
    assert main(["distill", str(teacher_run), str(out), "--max-steps", "15", "--no-progress"]) == 0
    assert snapshot(teacher_run) == before
    teacher_after, _, _ = load_run(teacher_run)
    after = teacher_after.state_dict()
    assert all(torch.equal(value, after[name]) for name, value in teacher_before.state_dict().items())
    return out


def test_distill_through_the_cli_makes_a_dense_student(distilled_run, teacher_run):
    teacher, _, _ = load_run(teacher_run)
    student, tokenizer, train = load_run(distilled_run)
    assert switch_layers(teacher) and not switch_layers(student)
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.d_ff == teacher.config.d_ff and student.config.num_layers == teacher.config.num_layers
    assert train.sparse_step == 0 and train.max_steps == 15
    assert (distilled_run / "tokenizer.json").read_bytes() == (teacher_run / "tokenizer.json").read_bytes()
    summary = json.loads((distilled_run / "summary.json").read_text())
    assert summary["step"] == 15 and math.isfinite(summary["eval_loss"])


def test_a_distilled_run_records_its_teacher_and_logs_the_labels_cross_entropy(distilled_run, teacher_run):
    record = json.loads((distilled_run / "distill.json").read_text())
    assert record["teacher"] == str(teacher_run.resolve()) and record["alpha"] == 0.75 and record["copied_weights"]
    rows = [json.loads(line) for line in (distilled_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "ce_loss" in r]
    # the logged ce_loss is the labels' cross-entropy; loss is the objective, which mixes in the teacher
    assert steps and all(abs(r["loss"] - r["ce_loss"]) > 1e-6 for r in steps)


def test_a_missing_or_file_source_and_a_file_out_are_named(teacher_run, dense_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["upcycle", str(tmp_path / "nope"), str(tmp_path / "o1"), "--num-experts", "4"], "nope: not found"),
        (["upcycle", str(afile), str(tmp_path / "o2"), "--num-experts", "4"], "afile: a file"),
        (["upcycle", str(dense_run), str(afile), "--num-experts", "4"], "afile: a file; upcycle writes"),
        (["distill", str(tmp_path / "nope"), str(tmp_path / "o3"), "--max-steps", "2"], "nope: not found"),
        (["distill", str(teacher_run), str(afile), "--max-steps", "2"], "afile: a file; distill writes"),
    ]
    for args, message in cases:
        assert main(args) == 2
        assert message in capsys.readouterr().err, args


def test_distill_into_a_folder_of_other_files_is_refused(teacher_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["distill", str(teacher_run), str(out), "--max-steps", "2", "--no-progress"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_distill_with_alpha_0_is_plain_training_of_the_same_student(teacher_run, distilled_run, tmp_path, capsys):
    """alpha 0: the labels alone, so the run is a plain training of the same dense twin from the same
    initialisation (the teacher's shared weights, the same seed)."""
    out = tmp_path / "alpha0"
    assert main(["distill", str(teacher_run), str(out), "--max-steps", "15", "--alpha", "0", "--no-progress"]) == 0
    distilled = json.loads((out / "summary.json").read_text())["eval_loss"]
    teacher, train, model_values = build_student(teacher_run, tmp_path / "plain", {}, 15)
    init_state, _ = student_init_state(teacher, train, model_values)
    plain = Trainer(train, tmp_path / "plain", progress=False, model_config=model_values, init_state=init_state)
    plain_loss = plain.train()["eval_loss"]
    assert abs(distilled - plain_loss) < 1e-6
    # the teacher's term matters: the default alpha (0.75) trains another student
    assert abs(json.loads((distilled_run / "summary.json").read_text())["eval_loss"] - plain_loss) > 1e-4


@pytest.fixture(scope="module")
def distill_trainer(teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer") / "student"
    teacher, train, model_values = build_student(teacher_run, out, {}, 5)
    init_state, copied = student_init_state(teacher, train, model_values)
    teacher.train()  # the trainer puts it in eval mode itself
    trainer = DistillTrainer(train, out, teacher=teacher, alpha=0.75, temperature=1.0, progress=False,
                             model_config=model_values, init_state=init_state)  # fmt: skip
    return trainer, init_state, copied


def test_the_trainer_starts_from_the_init_state_and_freezes_the_teacher(distill_trainer, teacher_run):
    trainer, init_state, copied = distill_trainer
    state = trainer.model.state_dict()
    assert set(state) == set(init_state)
    for name, value in init_state.items():
        assert torch.equal(state[name], value), name
    original, _, _ = load_run(teacher_run)
    for name in copied:  # step 0: the copied weights are the teacher's, exactly
        assert torch.equal(state[name], original.state_dict()[name])
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.teacher.parameters()}
    assert {id(p) for p in trainer.model.parameters() if p.requires_grad} <= optimized


def test_the_trainer_loss_mixes_the_teachers_probabilities_and_the_labels(distill_trainer):
    trainer, _, _ = distill_trainer
    batch = trainer.data.batch(trainer.config, 0, 0)
    assert set(batch) == {"input_ids"}
    scored = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    scored[:, -1] = False  # a causal LM scores every position but the last
    reference_teacher = copy.deepcopy(trainer.teacher)
    for layer in switch_layers(reference_teacher):  # dropless: no token dropped
        layer.eval_capacity_factor, layer.expert_capacity, layer.group_size = None, None, None
    teacher_layers = switch_layers(trainer.teacher)
    for layer in teacher_layers:  # a capacity that would drop most tokens: the trainer must ignore it
        layer.eval_capacity_factor = 0.1
    try:
        with torch.no_grad():
            teacher_logits = reference_teacher(batch["input_ids"]).logits
        trainer.model.eval()
        for alpha, temperature in ((0.0, 1.0), (1.0, 1.0), (1.0, 2.0), (0.75, 2.0)):
            trainer.alpha, trainer.temperature = alpha, temperature
            out = trainer.forward(batch)
            with torch.no_grad():
                plain = model_forward(trainer.model, batch)
            soft = distillation_loss(plain.logits, teacher_logits, scored, temperature)
            want = alpha * soft + (1 - alpha) * plain.ce_loss
            torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.ce_loss, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.label_ce_loss, plain.ce_loss, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.soft_loss, soft, atol=1e-5, rtol=0)
            assert out.aux_loss is None and out.z_loss is None
        assert [layer.eval_capacity_factor for layer in teacher_layers] == [0.1] * len(teacher_layers)  # restored
        # gradients reach the student only
        trainer.alpha = 0.5
        trainer.model.zero_grad()
        trainer.forward(batch).loss.backward()
        assert all(p.grad is None for p in trainer.teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())
        # evaluation scores the student's plain cross-entropy, not the distillation objective
        result = trainer.evaluate(1)
        index = torch.arange(0, min(trainer.config.batch_size, len(trainer.data.valid)))
        with torch.no_grad():
            valid = model_forward(trainer.model, trainer.data.valid.rows(index))
        assert abs(result.loss - float(valid.ce_loss)) < 1e-5
    finally:
        for layer in teacher_layers:
            layer.eval_capacity_factor = 2.0
        trainer.model.zero_grad()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "vocab_size=512"], "--set vocab_size: the student shares the teacher's vocabulary"),
        (["--set", "model=t5"], "--set model: the student is of the teacher's family"),
        (["--set", "tokenizer_kind=unigram"], "--set tokenizer_kind: the student uses the teacher's tokenizer"),
        (["--set", "max_steps=5"], "--set max_steps: give --max-steps"),
        (["--set", "top_k=2"], "--set top_k: the student is dense"),
        (["--set", "num_experts=4"], "num_experts: the student is dense"),
        (["--set", "sparse_step=2"], "sparse_step: the student is dense"),
        (["--alpha", "1.5"], "--alpha"),
        (["--alpha", "-0.1"], "--alpha"),
        (["--temperature", "0"], "--temperature: must be"),
        (["--temperature", "inf"], "--temperature: must be"),
        (["--max-steps", "0"], "--max-steps: must be >= 1"),
        (["--set", "bogus=1"], "--set bogus=1"),
        ("dense", "the teacher is dense"),
        ("inside", "inside the teacher's run"),
    ],
)
def test_distill_refuses_bad_input_in_one_line(flags, message, teacher_run, dense_run, tmp_path, capsys):
    teacher, out = teacher_run, tmp_path / "student"
    if flags == "dense":
        teacher, flags = dense_run, []
    elif flags == "inside":
        out, flags = teacher_run / "student", []
    args = ["distill", str(teacher), str(out), "--no-progress", *flags]
    if "--max-steps" not in flags:
        args += ["--max-steps", "3"]
    before = snapshot(teacher)
    capsys.readouterr()
    assert main(args) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()
    assert snapshot(teacher) == before


def test_a_t5_teacher_distils_into_a_dense_t5(corpus, tmp_path, capsys):
    teacher = train_run(tmp_path, "t5-teacher", corpus, "--model", "t5", "--max-steps", "10")
    model, _, _ = load_run(teacher)
    assert switch_layers(model)
    before = snapshot(teacher)
    out = tmp_path / "t5-student"
    assert main(["distill", str(teacher), str(out), "--max-steps", "5", "--no-progress", "--temperature", "2"]) == 0
    assert snapshot(teacher) == before
    student, _, train = load_run(out)
    assert isinstance(student, SwitchT5) and not switch_layers(student)
    assert student.config.vocab_size == model.config.vocab_size and train.model == "t5"
    assert math.isfinite(json.loads((out / "summary.json").read_text())["eval_loss"])


def test_a_top2_teacher_needs_the_students_size(upcycled_run, tmp_path, capsys):
    """An upcycled (top-2) model has no FLOP-matched dense twin of its sizes: distill says how to go on,
    and with a size given the student is dense and starts from the teacher's shared weights."""
    out = tmp_path / "student"
    capsys.readouterr()
    assert main(["distill", str(upcycled_run), str(out), "--max-steps", "3", "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert "top-2" in line and "--set" in line
    assert not out.exists()
    teacher, train, model_values = build_student(upcycled_run, out, {"d_ff": 128}, 3)
    state, copied = student_init_state(teacher, train, model_values)
    teacher_state = teacher.state_dict()
    assert set(copied) == expected_copies(teacher_state, state)
    assert "blocks.0.ffn.mlp.w_in" not in copied and "blocks.0.attn.qkv.weight" in copied  # fmt: skip
    assert model_values["d_ff"] == 128 and model_values["sparse_step"] == 0


def run_settings(run) -> dict:
    """Every training setting of a run as its reader gives them: config.json's train section with the
    settings the model section holds (the architecture is stored once, there)."""
    from switchformer.train.run import read_run_config

    return read_run_config(run).train_values
