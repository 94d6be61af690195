"""Expert and data parallelism on CPU with gloo over 127.0.0.1: several processes must compute what
one process computes on the concatenated batch. Every run has a timeout, so a bug cannot hang CI."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerances import AdamDrift, adam_normalised_step_bound, assert_close

from switchformer import SwitchLM, SwitchLMConfig
from switchformer.parallel import (
    apply_expert_parallel,
    check_same_config,
    checkpoint_state,
    is_expert_parameter,
    load_full_state_into,
    make_groups,
    reduce_gradients,
)

pytestmark = [pytest.mark.distributed]

TIMEOUT_S = 120
CONFIG = dict(
    vocab_size=50,
    d_model=16,
    num_layers=2,
    num_heads=2,
    d_ff=24,
    num_experts=4,
    sparse_step=1,
    max_seq_len=32,
    capacity_factor=1.0,
    eval_capacity_factor=1.0,
    min_capacity=1,
    init_scale=1.0,
)
BATCH_PER_RANK, SEQ = 2, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, error_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        fn(rank, world, *args)
    except BaseException:
        Path(error_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world, *args, tmp_path):
    context = mp.start_processes(
        _worker, args=(world, free_port(), fn, args, str(tmp_path)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() returns False each time one worker exits while others still run
        while not context.join(max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    except mp.ProcessRaisedException:
        pass  # the worker's own traceback is in its error file
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    errors = sorted(tmp_path.glob("rank*.txt"))
    assert not errors, errors[0].read_text()


def global_batch(world):
    g = torch.Generator().manual_seed(123)
    return torch.randint(1, CONFIG["vocab_size"], (world * BATCH_PER_RANK, SEQ), generator=g)


def reference_model(world):
    torch.manual_seed(0)
    model = SwitchLM(SwitchLMConfig(**CONFIG))
    for layer in model.sparse_layers():  # routing groups: each rank's local tokens
        layer.group_size = BATCH_PER_RANK * SEQ
    return model


def sharded_model(ep):
    torch.manual_seed(0)  # the same full init on every rank, then sliced
    state = make_groups(ep)
    return apply_expert_parallel(SwitchLM(SwitchLMConfig(**CONFIG)), state), state


def whole_state(model, state) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an expert-parallel model (gathered on every rank: a collective)."""
    from torch.distributed.tensor import DTensor

    shards = checkpoint_state(model, None, state)["model"]
    return {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in shards.items()}


def reference_name(name):
    return name.replace(".experts.local.", ".experts.")


def _equivalence(rank, world, ep):
    ids = global_batch(world)
    local = ids[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK]
    reference = reference_model(world)
    model, state = sharded_model(ep)
    ref_params = dict(reference.named_parameters())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    drift = AdamDrift(opt_ref, atol=1e-5, rtol=1e-4)  # the gradient check's tolerance
    for step in range(3):
        ref_out = reference(ids, labels=ids)
        out = model(local, labels=local)
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        assert_close(out.logits, ref_out.logits[rows], f"step {step}: logits", atol=1e-5, rtol=1e-5)
        losses = torch.stack([out.loss.detach(), out.ce_loss.detach(), out.aux_loss.detach(), out.z_loss.detach()])
        dist.all_reduce(losses)
        losses /= world
        want = torch.stack([ref_out.loss, ref_out.ce_loss, ref_out.aux_loss, ref_out.z_loss]).detach()
        assert_close(losses, want, f"step {step}: losses", atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        opt_ref.zero_grad()
        ref_out.loss.backward()
        out.loss.backward()
        reduce_gradients(model, state)
        for name, param in model.named_parameters():
            ref_grad = ref_params[reference_name(name)].grad
            if is_expert_parameter(name):
                n = param.shape[0]
                ref_grad = ref_grad[state.ep_rank * n : (state.ep_rank + 1) * n]
            assert_close(param.grad, ref_grad, f"step {step}: gradient {name}", atol=1e-5, rtol=1e-4)
        drift.gradients()
        opt.step()
        opt_ref.step()
        drift.stepped()
    full = whole_state(model, state)
    if rank == 0:
        parameters = dict(reference.named_parameters())
        for name, tensor in reference.state_dict().items():
            if name in parameters:
                drift.check(full[name], parameters[name], f"weight {name}")
            else:  # buffers: no optimizer in between
                assert_close(full[name], tensor, f"buffer {name}", atol=1e-5, rtol=1e-5)
    # the memory estimate of the replicated layout (fsdp=false) is what this rank holds
    from switchformer.parallel.memory import estimate_rank_memory

    with torch.device("meta"):
        unsharded = SwitchLM(SwitchLMConfig(**CONFIG))
    estimate = estimate_rank_memory(unsharded, world, ep, rank, fsdp=False)
    held = sum(p.numel() for p in model.parameters())
    moments = sum(v.numel() for entry in opt.state.values() for v in entry.values())
    assert (estimate.parameters, estimate.optimizer) == (held, moments)


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 2)])
def test_expert_and_data_parallel_match_one_process(world, ep, tmp_path):
    run_workers(_equivalence, world, ep, tmp_path=tmp_path)


def _save_and_reshard(rank, world, ep, out_dir):
    model, state = sharded_model(ep)
    with torch.no_grad():
        for p in model.parameters():  # make the weights differ from any fresh init
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.01)
    full = whole_state(model, state)
    if rank == 0:
        torch.save(full, Path(out_dir) / "full.pt")
    dist.barrier()
    full = torch.load(Path(out_dir) / "full.pt", weights_only=True)
    for ep_size in (1, world):
        if ep_size == 1:
            target = SwitchLM(SwitchLMConfig(**CONFIG))
            target.load_state_dict(full)
            local_state = None
        else:
            target, local_state = sharded_model(ep_size)
            load_full_state_into(checkpoint_state(target, None, local_state)["model"], full)
        ids = global_batch(world)[:BATCH_PER_RANK]
        got = target.eval()(ids).logits
        want = model.eval()(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_save_with_ep2_load_with_ep1_and_ep4(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    run_workers(_save_and_reshard, 4, 2, str(out), tmp_path=tmp_path)


def _bad_experts(rank, world):
    with pytest.raises(ValueError, match="num_experts: 4 experts cannot be split over 3"):
        sharded_model(3)


def _bad_world(rank, world):
    with pytest.raises(ValueError, match="world size 2 is not a multiple of 3"):
        make_groups(3)


def _mismatched_config(rank, world):
    state = make_groups(1)
    config = dict(CONFIG, num_experts=4 + rank)
    with pytest.raises(ValueError, match=r"ranks \[1\] run a different configuration"):
        check_same_config(config, state)


def _rank_dies(rank, world):
    if rank == 1:
        os._exit(0)  # gone without a word, mid-run
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        dist.all_reduce(torch.ones(4))  # the collective fails instead of hanging
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("fn, world", [(_bad_experts, 3), (_bad_world, 2), (_mismatched_config, 2), (_rank_dies, 2)])
def test_bad_setups_fail_fast_on_every_rank(fn, world, tmp_path):
    run_workers(fn, world, tmp_path=tmp_path)


def test_torchrun_training_matches_one_process(tmp_path):
    """The same command under torchrun with 2 ranks (experts split 2 ways, 2 rows each) gives the
    losses of one process on the 4-row global batch with the same routing groups."""
    import json
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Switch layers route every token to one expert of many.\n" * 400)
    common = [
        "--preset",
        "test",
        "--data",
        str(corpus),
        "--no-progress",
        "--out-dir",
        str(tmp_path),
        "--max-steps",
        "6",
        "--set",
        "vocab_size=400",
        "--set",
        "group_size=32",
        "--set",
        "seq_len=32",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "switchformer", "train", *common, "--run-name", "one", "--set", "batch_size=4"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "tokenizer.json").write_bytes((tmp_path / "one" / "tokenizer.json").read_bytes())
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "switchformer",
            "train",
            *common,
            "--run-name",
            "two",
            "--set",
            "batch_size=2",
            "--expert-parallel",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "ce_loss" in r}

    a, b = losses("one"), losses("two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    # evaluation too: each rank scores its part of every global batch of the validation split
    one_summary, two_summary = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert abs(one_summary["eval_loss"] - two_summary["eval_loss"]) < 1e-5
    for layer, stats in one_summary["routing"].items():
        assert two_summary["routing"][layer]["tokens_per_expert"] == stats["tokens_per_expert"], layer
    # a DCP checkpoint and the consolidated weights for single-process commands
    checkpoint = sorted((tmp_path / "two" / "checkpoints").iterdir())[-1]
    assert (checkpoint / "dcp" / ".metadata").exists() and (checkpoint / "model.safetensors").exists()
    # the consolidated checkpoint serves single-process commands
    from switchformer.train.run import load_run

    model, _, config = load_run(tmp_path / "two")
    reference, _, _ = load_run(tmp_path / "one")
    # what the model computes: the consolidated weights give one process's outputs to rounding
    probe = global_batch(2) % config.vocab_size
    assert_close(model(probe).logits, reference(probe).logits, "logits of the consolidated model", atol=1e-4, rtol=1e-4)
    # the weights themselves: within rounding, or within what AdamW can make of a rounding difference in a
    # near-zero gradient (its normalised step is at most K_t ~ 1 per step, so at most 2 K_t lr apart)
    adam = sum(2 * adam_normalised_step_bound(t, 0.9, 0.999) * config.lr for t in range(1, 7))
    for name, tensor in reference.state_dict().items():
        assert_close(model.state_dict()[name], tensor, f"weight {name}", atol=1e-5 + adam, rtol=1e-4)


# ----------------------------------------------------------------------------- state outside autograd


def _aux_loss_free_replicas(rank, world, defer):
    """Issue 13, fault 3: selection biases updated outside autograd stay identical on every replica
    and equal to one process on the global batch (three SGD steps, inputs that differ per rank)."""
    from switchformer import SwitchMoE
    from switchformer.moe.routing import defer_bias_updates

    def layer():
        torch.manual_seed(0)
        moe = SwitchMoE(8, 16, 4, routing="aux_loss_free", bias_update_rate=0.1, capacity_factor=None, init_scale=1.0)
        return moe.train()

    reference, replica = layer(), layer()
    if defer:
        defer_bias_updates(replica)
    state = make_groups(1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(replica.parameters(), lr=0.1)
    micro = 2 if defer else 1  # with deferral: two micro-batches per rank, one update per step
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(world * micro, 6, 8, generator=g)  # global batch: rank r's rows differ
        y_ref, _ = reference(x)
        y_ref.square().mean().backward()
        opt_ref.step()
        opt_ref.zero_grad()
        rows = x[rank * micro : (rank + 1) * micro]
        for m in range(micro):
            y, _ = replica(rows[m : m + 1])
            (y.square().mean() / micro).backward()
        reduce_gradients(replica, state)
        opt.step()
        opt.zero_grad()
        bias = replica.router.expert_bias
        gathered = [torch.empty_like(bias) for _ in range(world)]
        dist.all_gather(gathered, bias)
        for other in gathered:
            assert torch.equal(other, bias), f"step {step}: replicas differ: {gathered}"
        assert_close(bias, reference.router.expert_bias, f"step {step}: selection biases")
    assert reference.router.expert_bias.abs().sum() > 0  # the biases did move
    for (name, p), q in zip(replica.named_parameters(), reference.parameters()):
        assert_close(p, q, f"weight {name}", atol=1e-6, rtol=1e-5)
    dist.barrier()  # no rank tears the group down while another is still in a collective


@pytest.mark.parametrize("defer", [False, True])
def test_aux_loss_free_biases_are_the_same_on_every_replica_and_as_one_process(defer, tmp_path):
    run_workers(_aux_loss_free_replicas, 2, defer, tmp_path=tmp_path)


def _dp_config(data, batch_size, grad_accum, fsdp=True):
    from switchformer.train.sources import build_config

    values = dict(
        fsdp=fsdp,
        model="t5", objective="seq2seq", data=[data], d_model=16, num_layers=1, num_heads=2, d_ff=16,
        num_experts=2, sparse_step=1, precision="fp32", max_steps=1, grad_clip=1e9, aux_loss_coef=0.0,
        z_loss_coef=0.0, vocab_size=400, seq_len=32, batch_size=batch_size, grad_accum=grad_accum,
        checkpoint_every=100, eval_every=100,
    )  # fmt: skip
    return build_config("test", overrides=values, sets=["capacity_factor=none", "eval_capacity_factor=none"])


def _trainer_gradient(config, run_dir) -> dict[str, torch.Tensor]:
    from switchformer.train.trainer import Trainer

    trainer = Trainer(config, run_dir, progress=False)
    seen = {}

    def record():  # the gradient the optimizer would apply (FSDP's shards gathered: a collective)
        from torch.distributed.tensor import DTensor

        for n, p in trainer.model.named_parameters():
            if p.grad is not None:
                seen[n] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()

    trainer.optimizer.step = record
    assert trainer.train_step() is not None
    return seen


def _dp_gradient(rank, world, data, run_dir, batch_size, grad_accum, out, fsdp):
    gradient = _trainer_gradient(_dp_config(data, batch_size, grad_accum, fsdp), run_dir)
    if rank == 0:
        torch.save(gradient, out)
    dist.barrier()  # no rank tears the group down while another is still in a collective


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "replicated"])
def test_trainer_gradient_over_ranks_and_micro_batches_equals_one_process(fsdp, tmp_path):
    """Issue 13, fault 1 over ranks: uneven targets (2 to 17 label tokens), split over 2 ranks and
    micro-batches, give the one-process gradient of the mean over every label token, with FSDP2's
    reduction during backward and with the replicated weights' reduction after it."""
    from uneven_pairs import write_uneven_pairs

    data = write_uneven_pairs(tmp_path)
    whole = _trainer_gradient(_dp_config(str(data), 4, 1), tmp_path / "whole")
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        run_dir = tmp_path / f"dp{grad_accum}"
        run_dir.mkdir()
        (run_dir / "tokenizer.json").write_bytes((tmp_path / "whole" / "tokenizer.json").read_bytes())
        out = tmp_path / f"grad{grad_accum}.pt"
        errors = tmp_path / f"errors{grad_accum}"
        errors.mkdir()
        run_workers(_dp_gradient, 2, str(data), str(run_dir), batch_size, grad_accum, str(out), fsdp, tmp_path=errors)
        split = {reference_name(n): g for n, g in torch.load(out, weights_only=True).items()}
        # reduce_gradients gives a zero gradient to parameters without one (a rank may route no
        # token to an expert), where one process leaves None: the same update under SGD/Adam
        for name in split.keys() - whole.keys():
            assert not split[name].any(), name
        assert whole.keys() <= split.keys()
        for name, grad in whole.items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert ((split[name] - grad).abs().max() / scale).item() < 1e-4, (name, batch_size, grad_accum)
