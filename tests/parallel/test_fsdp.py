"""FSDP2 with expert parallelism on a DeviceMesh, and DCP checkpoints that reshard (CPU, gloo,
127.0.0.1, spawned processes with deadlines): several processes compute what one process computes
on the global batch, and a run saved on one layout resumes on another."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_parallel import BATCH_PER_RANK, CONFIG, SEQ, TIMEOUT_S, free_port, global_batch, reference_name, run_workers
from tolerances import AdamDrift, assert_close

from switchformer import SwitchLM, SwitchLMConfig
from switchformer.parallel import apply_expert_parallel, apply_fsdp, is_expert_parameter, make_groups
from switchformer.train.optimizer import clip_grad_norm

pytestmark = [pytest.mark.distributed]

EIGHT = dict(CONFIG, num_experts=8)
UNUSED = 5  # the expert no token reaches


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def seeded_model() -> SwitchLM:
    """The same weights on every rank and in the reference; expert ``UNUSED``'s router row is zero
    and the others' large, so that (checked below) no token picks it."""
    torch.manual_seed(0)
    model = SwitchLM(SwitchLMConfig(**EIGHT))
    with torch.no_grad():
        for layer in model.sparse_layers():
            layer.router.weight.mul_(20.0)
            layer.router.weight[UNUSED] = 0.0
    return model


def uneven_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels with a different number of scored tokens on every rank (1 to 7 masked per row)."""
    labels = ids.clone()
    for row in range(ids.shape[0]):
        labels[row, : 1 + row % (SEQ - 1)] = -100
    return labels


def _fsdp_matches_one_process(rank, world, ep):
    ids = global_batch(world)
    labels = uneven_labels(ids)
    rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    reference = seeded_model()
    for layer in reference.sparse_layers():  # routing groups: each rank's local tokens
        layer.group_size = BATCH_PER_RANK * SEQ
    state = make_groups(ep, fsdp=True)
    model = apply_fsdp(apply_expert_parallel(seeded_model(), state), state)
    assert state.mesh.shape == (world // ep, ep)
    ref_params = dict(reference.named_parameters())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    drift = AdamDrift(opt_ref, atol=1e-5, rtol=1e-4)  # the gradient check's tolerance
    scored = (labels != -100).sum(1)
    global_scored = int(scored.sum())
    local_scored = int(scored[rows].sum())
    assert len({int(scored[r * BATCH_PER_RANK : (r + 1) * BATCH_PER_RANK].sum()) for r in range(world)}) == world
    for step in range(3):
        ref_out = reference(ids, labels=labels)
        out = model(ids[rows], labels=labels[rows])
        counts = torch.stack([aux.tokens_per_expert for _, aux in ref_out.router_stats.layers]).sum(0)
        assert counts[UNUSED] == 0 and counts.sum() > 0, counts  # the premise: one expert gets nothing
        # the trainer's weights: cross-entropy by this rank's share of the global batch's label tokens
        loss = out.ce_loss * (local_scored * world / global_scored) + (out.loss - out.ce_loss)
        mean = torch.stack([loss.detach(), (out.loss - out.ce_loss).detach()])
        dist.all_reduce(mean)
        mean /= world
        want = torch.stack([ref_out.ce_loss + ref_out.loss - ref_out.ce_loss, ref_out.loss - ref_out.ce_loss])
        assert_close(mean, want.detach(), f"step {step}: losses", atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        opt_ref.zero_grad()
        ref_out.loss.backward()
        loss.backward()
        # clipping below the gradient's norm: the norm over every shard must be the whole model's
        norm = clip_grad_norm(model, 0.5, state)
        ref_norm = clip_grad_norm(reference, 0.5, None)
        assert abs(norm - ref_norm) < 1e-5 * max(1.0, ref_norm), (step, norm, ref_norm)
        for name, param in model.named_parameters():
            grad, ref_grad = full(param.grad), ref_params[reference_name(name)].grad
            if is_expert_parameter(name):
                n = grad.shape[0]
                ref_grad = ref_grad[state.ep_rank * n : (state.ep_rank + 1) * n]
            assert_close(grad, ref_grad, f"step {step}: gradient {name}", atol=1e-5, rtol=1e-4)
        drift.gradients()
        opt.step()
        opt_ref.step()
        drift.stepped()
    for name, param in model.named_parameters():
        weight, reference_weight = full(param.detach()), ref_params[reference_name(name)]
        n = weight.shape[0]
        rows = slice(state.ep_rank * n, (state.ep_rank + 1) * n) if is_expert_parameter(name) else None
        drift.check(weight, reference_weight, f"weight {name}", rows=rows)
    # the memory estimate (`info --world-size --expert-parallel`) is what this rank really holds
    from switchformer.parallel import local_tensor
    from switchformer.parallel.memory import estimate_rank_memory

    held = sum(local_tensor(p).numel() for p in model.parameters())
    grads = sum(local_tensor(p.grad).numel() for p in model.parameters() if p.grad is not None)
    moments = sum(local_tensor(v).numel() for entry in opt.state.values() for v in entry.values())
    with torch.device("meta"):
        unsharded = SwitchLM(SwitchLMConfig(**EIGHT))
    estimate = estimate_rank_memory(unsharded, world, ep, rank, fsdp=True)
    assert (estimate.parameters, estimate.gradients, estimate.optimizer) == (held, grads, moments)


@pytest.mark.parametrize("world, ep", [(4, 2), (2, 2), (2, 1), (3, 1)], ids=["ep2xfsdp2", "ep2", "fsdp2", "fsdp3"])
def test_fsdp_with_expert_parallelism_matches_one_process(world, ep, tmp_path):
    """Three AdamW steps (with clipping) over uneven label counts per rank and an expert that
    receives no token: losses, gradients and weights equal one process on the global batch. On 3
    ranks the experts' w_in [8, 16, 48] is sharded on its third dimension (16 is not a multiple of
    3) and every dense weight unevenly."""
    run_workers(_fsdp_matches_one_process, world, ep, tmp_path=tmp_path)


# ----------------------------------------------------------------------------- DCP checkpoints across layouts


def _switchformer(args: list[str], processes: int, env=None) -> subprocess.CompletedProcess:
    """``switchformer`` in one process, or under torchrun with ``processes`` ranks on 127.0.0.1."""
    launch = [sys.executable, "-m", "switchformer"]
    if processes > 1:
        launch = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "switchformer",
        ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([*launch, *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "ce_loss" in r}


def test_checkpoint_of_4_processes_resumes_on_2_and_on_1(tmp_path):
    """Saved on 4 processes (EP=2 x FSDP=2), resumed on 2 (EP=1 and EP=2) and on 1 with the same
    global batch: the steps after the checkpoint have the losses of the run that never stopped,
    which needs the optimizer's moments, the step count and the weights all resharded."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(f"Switch layer {i} routes token {i * 7 % 13} to one expert of many.\n" for i in range(400))
    )
    common = [
        "--preset", "test", "--data", str(corpus), "--no-progress", "--out-dir", str(tmp_path), "--max-steps", "4",
        "--set", "vocab_size=400", "--set", "seq_len=32", "--set", "group_size=32",  # routing per sequence
        "--set", "checkpoint_every=2", "--set", "keep_last=3", "--set", "eval_every=100", "--set", "lr=3e-3",
    ]  # fmt: skip
    whole = _switchformer(
        ["train", *common, "--run-name", "four", "--expert-parallel", "2", "--set", "batch_size=1"], 4
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    four = tmp_path / "four"
    saved = four / "checkpoints" / "step_0000002"
    assert (saved / "dcp" / ".metadata").is_file() and (saved / "model.safetensors").is_file()
    assert json.loads((saved / "state.json").read_text())["global_batch"] == 4
    reference = _losses(four)
    layouts = {"two-ep1": (2, 1, 2), "two-ep2": (2, 2, 2), "one": (1, 1, 4)}
    for name, (processes, ep, batch) in layouts.items():
        run = tmp_path / name
        shutil.copytree(four, run)
        shutil.rmtree(run / "checkpoints" / "step_0000004")
        result = _switchformer(
            ["train", "--resume", str(run), "--expert-parallel", str(ep), "--set", f"batch_size={batch}",
             "--no-progress"],
            processes,
        )  # fmt: skip
        assert result.returncode == 0, (name, result.stderr[-3000:])
        resumed = _losses(run)
        for step in (3, 4):
            assert abs(resumed[step] - reference[step]) < 1e-5, (name, step, resumed[step], reference[step])
    # the global batch is kept: 2 processes with the 4-process batch_size are refused by name
    run = tmp_path / "wrong-batch"
    shutil.copytree(four, run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    result = _switchformer(["train", "--resume", str(run), "--no-progress"], 2)
    assert result.returncode != 0
    assert "batch_size: the checkpoint was trained with a global batch of 4" in result.stderr
    assert "give --set grad_accum=2 (each rank keeps its micro-batch of 1" in result.stderr


# ----------------------------------------------------------------------------- failures


def _rank_killed_mid_run(rank, world, corpus, run_dir):
    from switchformer.parallel import failure_message
    from switchformer.train.sources import build_config
    from switchformer.train.trainer import Trainer

    config = build_config(
        "test",
        overrides=dict(data=[corpus], vocab_size=400, max_steps=6, batch_size=1, expert_parallel=2, eval_every=100),
    )
    trainer = Trainer(config, run_dir, progress=False)
    if rank == world - 1:
        step = trainer.train_step

        def dies():  # killed at its third step, mid-run, without a word
            if trainer.step == 2:
                os._exit(1)
            return step()

        trainer.train_step = dies
    start = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        trainer.train()
    assert time.monotonic() - start < 60
    message = failure_message(raised.value)
    assert message is not None and message.startswith(f"rank {rank} of {world}: lost contact"), raised.value


def _run_to_the_end(fn, world: int, args: tuple, errors: Path) -> list[int]:
    """``fn(rank, world, *args)`` on ``world`` spawned gloo processes, each run to its own end
    (``run_workers`` stops at the first to fail); their exit codes. A worker's failed check leaves
    its traceback in ``errors``."""
    import torch.multiprocessing as mp
    from test_parallel import _worker

    errors.mkdir(exist_ok=True)
    started = time.monotonic()
    context = mp.start_processes(
        _worker, args=(world, free_port(), fn, args, str(errors)), nprocs=world, join=False, start_method="spawn"
    )
    try:
        while any(p.is_alive() for p in context.processes) and time.monotonic() - started < TIMEOUT_S:
            time.sleep(0.2)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    assert time.monotonic() - started < TIMEOUT_S, "the surviving ranks did not stop"
    problems = sorted(errors.glob("rank*.txt"))
    assert not problems, problems[0].read_text()
    return [p.exitcode for p in context.processes]


def _corpus_and_tokenizer(tmp_path: Path) -> tuple[Path, Path]:
    from switchformer.train.data import prepare_data
    from switchformer.train.sources import build_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Switch layers route every token to one expert of many.\n" * 400)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare_data(build_config("test", overrides=dict(data=[str(corpus)], vocab_size=400)), run_dir)  # the tokenizer
    return corpus, run_dir


def test_a_rank_killed_mid_step_ends_every_rank_with_a_message(tmp_path):
    corpus, run_dir = _corpus_and_tokenizer(tmp_path)
    codes = _run_to_the_end(_rank_killed_mid_run, 4, (str(corpus), str(run_dir)), tmp_path / "errors")
    assert codes == [0, 0, 0, 1]  # the survivors' checks passed


def _rank_killed_mid_save(rank, world, corpus, run_dir):
    from switchformer.train import trainer as trainer_module
    from switchformer.train.sources import build_config
    from switchformer.train.trainer import Trainer

    config = build_config(
        "test",
        overrides=dict(data=[corpus], vocab_size=400, max_steps=4, batch_size=1, expert_parallel=2, eval_every=100,
                       checkpoint_every=2),
    )  # fmt: skip
    trainer = Trainer(config, run_dir, progress=False)
    if rank == 1:
        export = trainer_module.export_safetensors

        def dies(directory, model, state):  # the second save: its DCP shards are written, then the kill
            if trainer.step == 4:
                os._exit(1)
            return export(directory, model, state)

        trainer_module.export_safetensors = dies
    with pytest.raises(RuntimeError):
        trainer.train()


def test_a_rank_killed_mid_save_leaves_the_last_complete_checkpoint(tmp_path):
    from switchformer.train.checkpoint import latest_checkpoint, list_checkpoints

    corpus, run_dir = _corpus_and_tokenizer(tmp_path)
    codes = _run_to_the_end(_rank_killed_mid_save, 2, (str(corpus), str(run_dir)), tmp_path / "errors")
    assert codes == [0, 1]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002"]
    assert latest_checkpoint(run_dir).name == "step_0000002"
    # the half-written step 4 is gone or left under a temporary name that the next writer removes
    assert not (run_dir / "checkpoints" / "step_0000004").exists()
    resumed = _switchformer(["train", "--resume", str(run_dir), "--no-progress", "--set", "batch_size=2",
                             "--expert-parallel", "1"], 1)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


# ----------------------------------------------------------------------------- state outside autograd


def _bias_config(corpus: str, batch_size: int, expert_parallel: int):
    from switchformer.train.sources import build_config

    values = dict(
        data=[corpus], vocab_size=400, seq_len=32, group_size=32, routing="aux_loss_free", max_steps=3,
        batch_size=batch_size, expert_parallel=expert_parallel, precision="fp32", eval_every=100,
    )  # fmt: skip
    return build_config("test", overrides=values)


def _biases_after_three_steps(config, run_dir) -> tuple[list[float], list[torch.Tensor]]:
    from switchformer.train.trainer import Trainer

    trainer = Trainer(config, run_dir, progress=False)
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    biases = [layer.router.expert_bias.clone() for layer in trainer.model.sparse_layers()]
    trainer.close()
    return losses, biases


def _fsdp_biases(rank, world, corpus, run_dir, out):
    losses, biases = _biases_after_three_steps(_bias_config(corpus, 1, 2), run_dir)
    for bias in biases:  # identical on every replica
        gathered = [torch.empty_like(bias) for _ in range(world)]
        dist.all_gather(gathered, bias)
        assert all(torch.equal(other, bias) for other in gathered), gathered
    if rank == 0:
        torch.save({"losses": losses, "biases": biases}, out)
    dist.barrier()


def test_aux_loss_free_biases_under_fsdp_equal_one_process(tmp_path):
    """The selection biases (buffers FSDP does not reduce) get one update over every rank's load:
    the same on both ranks of an FSDP2 x EP=2 run and equal to one process on the global batch."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Expert {i % 5} takes token {i * 3 % 11} of line {i}.\n" for i in range(400)))
    whole_losses, whole_biases = _biases_after_three_steps(_bias_config(str(corpus), 2, 1), tmp_path / "one")
    assert any(bias.abs().sum() > 0 for bias in whole_biases)  # the biases did move
    run_dir = tmp_path / "two"
    run_dir.mkdir()
    shutil.copy(tmp_path / "one" / "tokenizer.json", run_dir / "tokenizer.json")
    out = tmp_path / "two.pt"
    run_workers(_fsdp_biases, 2, str(corpus), str(run_dir), str(out), tmp_path=tmp_path)
    split = torch.load(out, weights_only=True)
    for got, want in zip(split["biases"], whole_biases):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for got, want in zip(split["losses"], whole_losses):
        assert abs(got - want) < 1e-5, (split["losses"], whole_losses)


def test_checkpoint_of_one_process_resumes_on_2_with_expert_parallelism(tmp_path):
    """A single-process checkpoint (model.safetensors, optimizer.pt) resumes on 2 processes with
    EP=2 and FSDP2: each rank keeps its part of the weights and of the optimizer's moments."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Token {i * 5 % 17} goes to expert {i % 4}, line {i}.\n" for i in range(400)))
    common = [
        "--preset", "test", "--data", str(corpus), "--no-progress", "--out-dir", str(tmp_path), "--max-steps", "4",
        "--set", "vocab_size=400", "--set", "seq_len=32", "--set", "group_size=32", "--set", "checkpoint_every=2",
        "--set", "keep_last=3", "--set", "eval_every=100", "--set", "lr=3e-3", "--set", "batch_size=2",
    ]  # fmt: skip
    whole = _switchformer(["train", *common, "--run-name", "one"], 1)
    assert whole.returncode == 0, whole.stderr[-3000:]
    one = tmp_path / "one"
    assert (one / "checkpoints" / "step_0000002" / "optimizer.pt").is_file()
    run = tmp_path / "two"
    shutil.copytree(one, run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    args = ["train", "--resume", str(run), "--expert-parallel", "2", "--set", "batch_size=1", "--no-progress"]
    result = _switchformer(args, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, resumed = _losses(one), _losses(run)
    for step in (3, 4):
        assert abs(resumed[step] - reference[step]) < 1e-5, (step, resumed[step], reference[step])


def test_t5_under_fsdp_trains_samples_and_serves_single_process_commands(tmp_path):
    """A seq2seq T5 run on 2 processes (EP=2, FSDP2): its end-of-training sample (generation calls
    into blocks directly, so every unit is gathered for it), a consolidated checkpoint that
    `translate` reads in one process, and a damaged DCP shard named on --resume."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"source": f"ein haus {i}", "target": f"a house {i}"}) + "\n" for i in range(300))
    )
    args = [
        "train", "--model", "t5", "--preset", "test", "--data", str(pairs), "--no-progress", "--out-dir",
        str(tmp_path), "--run-name", "t5", "--max-steps", "4", "--set", "objective=seq2seq", "--set",
        "checkpoint_every=2", "--set", "vocab_size=400", "--set", "batch_size=2", "--expert-parallel", "2",
    ]  # fmt: skip
    result = _switchformer(args, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "t5"
    summary = json.loads((run / "summary.json").read_text())
    assert isinstance(summary["sample"], str) and summary["memory_per_rank"]["parameters"] > 0
    translated = subprocess.run(
        [sys.executable, "-m", "switchformer", "translate", str(run)],
        input="ein haus 3\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert translated.returncode == 0, translated.stderr
    assert len(translated.stdout.splitlines()) == 1
    shard = sorted((run / "checkpoints" / "step_0000004" / "dcp").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    resumed = _switchformer(["train", "--resume", str(run), "--max-steps", "6", "--no-progress",
                             "--set", "batch_size=4", "--expert-parallel", "1"], 1)  # fmt: skip
    assert resumed.returncode == 2
    assert f"step_0000004/dcp/{shard.name}: cut short: 100 bytes, the metadata needs" in resumed.stderr
    assert "to resume from step_0000002 instead, move step_0000004 out of" in resumed.stderr
    (run / "checkpoints" / "step_0000004" / "dcp" / ".metadata").unlink()  # DCP's last file: incomplete
    resumed = _switchformer(["train", "--resume", str(run), "--no-progress"], 1)
    assert "step_0000004: incomplete checkpoint: dcp/.metadata missing" in resumed.stderr, resumed.stderr
    shutil.rmtree(run / "checkpoints" / "step_0000004" / "dcp")  # the whole folder: state.json says DCP
    resumed = _switchformer(["train", "--resume", str(run), "--no-progress"], 1)
    assert "step_0000004: incomplete checkpoint: dcp/.metadata missing" in resumed.stderr, resumed.stderr
    assert "Traceback" not in resumed.stderr


# ----------------------------------------------------------------------------- DCP in one process


def _trained_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = SwitchLM(SwitchLMConfig(**EIGHT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = global_batch(1)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def test_dcp_round_trip_in_one_process_restores_weights_and_optimizer(tmp_path):
    from switchformer.parallel import load_dcp, save_dcp

    model, optimizer = _trained_model_and_optimizer(0)
    save_dcp(tmp_path / "dcp", model, optimizer, None)
    other, other_optimizer = _trained_model_and_optimizer(1)  # other weights and moments
    load_dcp(tmp_path / "dcp", other, other_optimizer, None)
    for (name, tensor), loaded in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(tensor, loaded), name
    for param, loaded in zip(model.parameters(), other.parameters()):
        for field, value in optimizer.state[param].items():
            assert torch.equal(value, other_optimizer.state[loaded][field]), field


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    """DCP reads its .metadata with plain pickle; switchformer reads it with an allow-list, so a
    planted pickle runs nothing and the resume names the folder."""
    import pickle

    from switchformer.parallel import load_dcp, save_dcp
    from switchformer.runs.files import RunFileError

    model, optimizer = _trained_model_and_optimizer(0)
    save_dcp(tmp_path / "dcp", model, optimizer, None)
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(RunFileError, match=r"dcp/\.metadata: damaged .*refused pathlib\.Path\.touch"):
        load_dcp(tmp_path / "dcp", model, optimizer, None)
    assert not marker.exists()


# ----------------------------------------------------------------------------- layouts refused at start-up


def test_expert_shard_dimension_is_the_first_that_divides_evenly():
    from switchformer.parallel.fsdp import expert_shard_dim

    assert expert_shard_dim("w", (4, 32, 128), 1) == 1
    assert expert_shard_dim("w", (4, 32, 128), 2) == 1
    assert expert_shard_dim("w", (4, 30, 128), 4) == 2
    with pytest.raises(ValueError, match=r"^fsdp: w \[4, 32, 128\] cannot be split evenly over the 3 ranks"):
        expert_shard_dim("w", (4, 32, 128), 3)


@pytest.mark.parametrize(
    "world, changes, message",
    [
        (3, {}, r"fsdp: blocks\.1\.ffn\.mlp\.experts\.w_in \[4, 32, 128\] cannot be split evenly over the 3 ranks"),
        (4, {"expert_parallel": 3}, "expert_parallel: world size 4 is not a multiple of 3"),
        (3, {"expert_parallel": 3}, "num_experts: 4 experts cannot be split over 3 expert-parallel ranks"),
        (2, {"optimizer": "adafactor"}, "optimizer: adafactor factors whole matrices, which FSDP shards"),
    ],
)
def test_layouts_that_cannot_work_are_refused_before_anything_runs(world, changes, message):
    from switchformer.train.layout import check_layout
    from switchformer.train.sources import build_config

    config = build_config("test", overrides=changes)
    with pytest.raises(ValueError, match=message):
        check_layout(config, None, world)
    from dataclasses import replace

    if "optimizer" in changes or world == 3 and not changes:  # the replicated layout takes them
        check_layout(replace(config, fsdp=False), None, world)


def test_expert_parallelism_without_torchrun_says_how_to_launch(tmp_path, monkeypatch):
    from switchformer.train.sources import build_config
    from switchformer.train.trainer import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"expert_parallel: 2 splits the experts over 2 processes.*torchrun"):
        Trainer(build_config("test", overrides=dict(expert_parallel=2)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--world-size", "-4", "--expert-parallel", "2"], "--world-size: must be >= 1, got -4"),
        (["--world-size", "0"], "--world-size: must be >= 1, got 0"),
        (["--world-size", "2", "--expert-parallel", "0"], "--expert-parallel: must be >= 1, got 0"),
        (["--no-fsdp"], "--no-fsdp: memory per rank needs --world-size W"),
        (["--world-size", "3"], "fsdp: blocks.1.ffn.mlp.experts.w_in"),
        (["--world-size", "4", "--expert-parallel", "3"], "world size 4 is not a multiple of 3"),
    ],
)
def test_info_memory_flags_are_checked(flags, message, capsys):
    from switchformer.cli import main

    assert main(["info", "--preset", "test", *flags]) == 2
    assert message in capsys.readouterr().err


def test_info_memory_per_rank_prints_the_estimate(capsys):
    from switchformer.cli import main

    assert main(["info", "--preset", "test", "--world-size", "4", "--expert-parallel", "2"]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        from switchformer.train.run import build_model
        from switchformer.train.sources import build_config

        config = build_config("test")
        model = build_model(config, config.vocab_size)
    from switchformer.parallel.memory import estimate_rank_memory

    fullest = max((estimate_rank_memory(model, 4, 2, r) for r in range(4)), key=lambda m: m.total)
    assert f"({fullest.parameters:,} values)" in out
    assert "world 4, expert parallel 2, FSDP2: weights sharded; adamw" in out


# ----------------------------------------------------------------------------- evaluation over ranks


class _Split:
    """A validation split of fixed rows (what ``evaluate`` reads: ``len`` and ``rows``)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: torch.Tensor) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


@pytest.mark.parametrize("rows", [13, 7, 3, 1])
@pytest.mark.parametrize("world, grad_accum", [(2, 1), (2, 2), (4, 1)])
def test_evaluation_split_over_ranks_sums_to_one_process_on_the_global_batch(rows, world, grad_accum):
    """An evaluation batch is the global batch, run in chunks of batch_size rows (routing groups,
    like training micro-batches), each rank taking every world-th chunk (a rank left without one
    runs a stand-in that counts for nothing): the ranks' sums are one process's figures with the
    same global batch as batch_size x grad_accum, whatever the split; splits that fill the last
    batch, leave ranks empty, or hold one row."""
    from dataclasses import replace

    from switchformer.train.evaluation import evaluate
    from switchformer.train.sources import build_config

    model = seeded_model().eval()  # routing groups: each forward's rows (no group_size)
    split = _Split(torch.randint(1, EIGHT["vocab_size"], (rows, SEQ), generator=torch.Generator().manual_seed(3)))
    config = replace(build_config("test"), batch_size=2, grad_accum=grad_accum, eval_batches=2, precision="fp32")
    whole = evaluate(model, split, replace(config, grad_accum=grad_accum * world), "cpu")
    parts = [evaluate(model, split, config, "cpu", rank=r, world=world) for r in range(world)]
    tokens = sum(p.tokens for p in parts)
    assert tokens == whole.tokens == min(rows, 2 * 2 * grad_accum * world) * SEQ  # scored_tokens: labels given
    loss = sum(p.loss * p.tokens for p in parts if p.tokens) / tokens
    assert abs(loss - whole.loss) < 1e-6
    for layer, stats in whole.routing.items():
        summed = [sum(values) for values in zip(*(p.routing[layer]["tokens_per_expert"] for p in parts))]
        assert summed == stats["tokens_per_expert"], layer


def test_dcp_metadata_naming_bytes_is_refused(tmp_path):
    """DCP reads a bytes entry's data with torch.load(weights_only=False): metadata that declares one
    (switchformer saves tensors only) is refused before any data is read."""
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from switchformer.parallel import load_dcp, save_dcp
    from switchformer.parallel.checkpoint import _MetadataUnpickler
    from switchformer.runs.files import RunFileError

    model, optimizer = _trained_model_and_optimizer(0)
    save_dcp(tmp_path / "dcp", model, optimizer, None)
    file = tmp_path / "dcp" / ".metadata"
    with open(file, "rb") as stream:
        metadata = _MetadataUnpickler(stream).load()
    metadata.state_dict_metadata["model.embed.weight"] = BytesStorageMetadata()
    file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(RunFileError, match=r"\.metadata: damaged .*refused .*BytesStorageMetadata"):
        load_dcp(tmp_path / "dcp", model, optimizer, None)


def test_train_refuses_a_layout_before_it_writes_anything(tmp_path, monkeypatch, capsys):
    from switchformer.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Switch layers route every token to one expert of many.\n" * 50)
    args = ["train", "--preset", "test", "--data", str(corpus), "--out-dir", str(tmp_path / "runs"), "--run-name", "x"]
    assert main([*args, "--expert-parallel", "2", "--no-progress"]) == 2
    err = capsys.readouterr()
    assert "expert_parallel: 2 splits the experts over 2 processes" in err.err and "training" not in err.out
    assert not (tmp_path / "runs" / "x").exists()
