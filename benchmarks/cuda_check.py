"""A short, prepared check of the CUDA path for a session lent a GPU (never part of the tests).

The test suite runs on CPU; this script checks on a device what the tests cannot reach:

1. parity: ``from_hf`` on the device gives Hugging Face's logits (fp32, TF32 off) and greedy tokens;
2. MoE backends: ``grouped_mm``, ``padded`` and ``loop`` agree forward and backward, fp32 and bf16,
   and ``auto`` picks one that runs;
3. bf16 training: the trainer's bf16 autocast on the ``test`` preset for 30 steps (finite, falling
   loss), with every router's logits in float32 (selective precision);
4. serving: the continuous-batching engine's greedy tokens equal ``generate`` alone (fp32), and it
   runs in bf16, both model families;
5. speed: a few interleaved training steps and greedy generations against Hugging Face, as
   ``vs_transformers.py`` (run that script with ``--device cuda`` for the full table).

Prints one line per check and exits 1 if any failed.

    python benchmarks/cuda_check.py                 # cuda (fails at once if there is none)
    python benchmarks/cuda_check.py --device cpu    # the same checks on CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from vs_transformers import describe_device, generate, hf_model, interleaved_generate_times, interleaved_train_times

from switchformer import SwitchMoE
from switchformer.interop.hf import from_hf
from switchformer.moe.dispatch import grouped_mm_available
from switchformer.moe.routing import Router
from switchformer.train.sources import build_config
from switchformer.train.trainer import Trainer

FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def check_parity(device: torch.device) -> None:
    hf = hf_model(8, 8192).to(device).eval()
    ours = from_hf(hf).to(device).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 8192, (4, 64), generator=g).to(device)
    labels = torch.randint(2, 8192, (4, 32), generator=g).to(device)
    with torch.no_grad():
        diff = (hf(input_ids=ids, labels=labels).logits - ours(ids, labels=labels).logits).abs().max().item()
    report("parity logits", diff < 1e-4, f"max abs difference {diff:.1e} (bound 1e-4)")
    _, theirs = generate(hf, ids, 16, is_hf=True)
    _, mine = generate(ours, ids, 16, is_hf=False)
    report("parity greedy", torch.equal(theirs, mine), f"{mine.shape[1] - 1} new tokens for {ids.shape[0]} rows")


def check_backends(device: torch.device) -> None:
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):  # relative to each tensor's largest entry
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            report("backends bf16", True, "skipped: no bf16 on this GPU")
            continue
        results = {}
        for backend in ("loop", "padded", "grouped_mm", "auto"):
            if backend == "grouped_mm" and not grouped_mm_available(device.type, dtype):
                report(f"backends {dtype}", True, "grouped_mm not available here; auto falls back")
                continue
            torch.manual_seed(0)
            layer = SwitchMoE(64, 128, 8, backend=backend, capacity_factor=None).to(device, dtype)
            x = torch.randn(4, 96, 64, device=device, dtype=dtype, requires_grad=True)
            y, aux = layer(x)
            (y.float().square().mean() + aux.aux_loss).backward()
            results[backend] = (y.float(), x.grad.float(), layer.experts.w_in.grad.float())
        base = results.pop("loop")
        worst = max(
            ((a - b).abs().max() / a.abs().max()).item() for other in results.values() for a, b in zip(base, other)
        )
        report(
            f"backends {dtype}",
            worst < tol,
            f"{', '.join(results)} vs loop: worst relative output/gradient difference {worst:.1e} (bound {tol})",
        )


def check_host_syncs(device: torch.device) -> None:
    """Where a Switch layer's training step waits for the GPU (a host sync stalls the launch queue):
    counted with ``torch.cuda.set_sync_debug_mode``, reported with the line of ours that caused it."""
    if device.type != "cuda":
        report("host syncs", True, "skipped: CUDA only")
        return
    import warnings

    layer = SwitchMoE(256, 512, 8).to(device)
    x = torch.randn(4, 128, 256, device=device, requires_grad=True)
    for dropless in (False, True):
        layer.capacity_factor = None if dropless else 1.25
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x)  # warm-up: backend detection may sync once
        places: dict[str, int] = {}
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y, aux = layer(x)
                    loss = y.float().square().mean() + aux.aux_loss + aux.z_loss
                loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for warning in caught:
            if "synchroniz" not in str(warning.message):
                continue
            where = f"{warning.filename.split('/')[-1]}:{warning.lineno}"
            places[where] = places.get(where, 0) + 1
        label = "dropless" if dropless else "capacity 1.25"
        report(f"host syncs ({label})", True, f"{sum(places.values())} per forward+backward at {places or 'none'}")


def check_expert_grad_layout(device: torch.device) -> None:
    """The layout of the expert weights' gradients as the grouped kernel's backward returns them
    (before AccumulateGrad): one that differs from the weight's makes every step copy it."""
    if device.type != "cuda" or not grouped_mm_available("cuda", torch.bfloat16):
        report("expert gradient layout", True, "skipped: needs grouped_mm on CUDA")
        return
    layer = SwitchMoE(256, 512, 8, backend="grouped_mm").to(device, torch.bfloat16)
    x = torch.randn(4, 128, 256, device=device, dtype=torch.bfloat16)
    y, _ = layer(x)
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    grads = torch.autograd.grad(y.float().square().mean(), [w_in, w_out])
    detail = ", ".join(
        f"{name} {tuple(w.stride())} grad {tuple(g.stride())}"
        for name, w, g in zip(("w_in", "w_out"), (w_in, w_out), grads)
    )
    report("expert gradient layout", True, detail)


def check_bf16_training(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        report("bf16 training", True, "skipped: no bf16 on this GPU")
        return
    config = build_config("test", None, {"max_steps": 30}, ["precision=bf16", "eval_every=30", "log_every=1"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp) / "run", progress=False, device=str(device))
        dtypes = set()
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.logits.dtype))
            for m in trainer.model.modules()
            if isinstance(m, Router)
        ]
        summary = trainer.train()
        for hook in hooks:
            hook.remove()
        losses = [r["loss"] for r in trainer.history if "loss" in r]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    report(
        "bf16 training",
        finite and last < first and dtypes == {torch.float32},
        f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps, router logits {sorted(map(str, dtypes))}, "
        f"validation loss {summary['eval_loss']:.3f}",
    )


def check_speed(device: torch.device, steps: int) -> None:
    for experts in (8, 64):
        hf = hf_model(experts, 8192).to(device)
        models = {"hf": hf, "ours": from_hf(hf).to(device)}
        g = torch.Generator().manual_seed(1)
        batch = {name: torch.randint(2, 8192, (8, 256), generator=g).to(device) for name in ("ids", "labels")}
        for model in models.values():
            model.eval()
        for rows in (1, 8):
            times, _ = interleaved_generate_times(models, batch["ids"][:rows, :64], 64, repeats=3)
            ratio = statistics.median(times["hf"]) / statistics.median(times["ours"])
            print(f"     E={experts} greedy batch {rows}: {ratio:.2f}x HF", flush=True)
        for model in models.values():
            model.train()
        optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in models.items()}
        times = interleaved_train_times(models, optimizers, batch, steps)
        hf_t, our_t = statistics.median(times["hf"]), statistics.median(times["ours"])
        print(f"     E={experts} training step: HF {hf_t * 1e3:.1f} ms, ours {our_t * 1e3:.1f} ms, {hf_t / our_t:.2f}x")


def _serve(model, tok, prompts: list[list[int]]) -> tuple[bool, dict]:
    """Greedy requests (``max_tokens`` 8, 9, ...) through a started engine of 5 slots; (all ended in
    time, {request: (final event, tokens)})."""
    import threading

    from switchformer.serve.engine import Engine, Request
    from switchformer.serve.sampling import SamplingParams

    engine = Engine(model, tok, max_batch_size=5, max_request_tokens=64, max_source_tokens=64, columns=72)
    results, done = {}, threading.Event()

    def emitter(i: int):
        out: list[int] = []

        def emit(kind, payload):
            if kind == "token":
                out.append(payload["choice"].token)
                return
            results[i] = (kind, out)
            if len(results) == len(prompts):
                done.set()

        return emit

    engine.start()
    for i, ids in enumerate(prompts):
        engine.submit(Request(ids, SamplingParams(max_tokens=8 + i, temperature=0), emitter(i)))
    finished = done.wait(120)
    engine.stop()
    return finished, results


def check_serving(device: torch.device) -> None:
    """The server's engine on the device: 12 greedy requests over 5 slots (admissions, retirements,
    cache shifts) give each request's tokens of ``generate`` alone, both families, fp32; in bf16 the
    engine must run and its tokens are compared (batched bf16 products may round differently)."""
    from switchformer.data.tokenizer import train_tokenizer
    from switchformer.models import SwitchLM, SwitchLMConfig, SwitchT5, SwitchT5Config

    words = "the a cat dog sat on mat ran fast slow big small red blue green house tree sun moon river".split()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (3 + 2 * n,), generator=g)) for n in range(12)]
    tok = train_tokenizer(texts * 20, 400, "bpe")
    torch.manual_seed(0)
    lm = SwitchLM(SwitchLMConfig(vocab_size=400, d_model=64, num_layers=2, num_heads=4, d_ff=128, num_experts=4,
                                 sparse_step=1, max_seq_len=128, init_scale=1.0))  # fmt: skip
    t5 = SwitchT5(SwitchT5Config(vocab_size=400, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, init_scale=1.0,
                                 dropout_rate=0.0))  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        for model in (lm, t5):
            model = model.to(device=device, dtype=dtype).eval()
            t5_family = isinstance(model, SwitchT5)
            prompts = [tok.encode(t).ids + ([1] if t5_family else []) for t in texts]
            finished, results = _serve(model, tok, prompts)
            same = 0
            for i, ids in enumerate(prompts):
                ref = model.generate(torch.tensor([ids], device=device), max_new_tokens=8 + i, do_sample=False)[0]
                ref = ref[(1 if t5_family else len(ids)) :].tolist()
                ref = ref[: ref.index(1)] if 1 in ref else ref
                same += finished and i in results and results[i][0] == "done" and results[i][1] == ref
            name = f"serve engine {'t5' if t5_family else 'lm'} {str(dtype).split('.')[-1]}"
            exact = dtype == torch.float32
            report(
                name,
                finished and (same == len(prompts) or not exact),
                f"{same}/{len(prompts)} requests equal generate alone" + ("" if exact else " (bf16: compared)"),
            )
    lm.float(), t5.float()


def check_static_decoding(device: torch.device) -> None:
    """The static decoding step on the device: the growing cache's tokens (fp32), no host sync
    inside a step (``set_sync_debug_mode("error")`` raises at the first), and the step compiled into
    CUDA graphs (``reduce-overhead``) giving the same tokens."""
    hf = hf_model(8, 8192).to(device).eval()
    model = from_hf(hf).to(device).eval()
    ids = torch.randint(2, 8192, (4, 32), generator=torch.Generator().manual_seed(2)).to(device)
    growing = model.generate(ids, max_new_tokens=16, eos_token_id=None)
    static = model.generate(ids, max_new_tokens=16, eos_token_id=None, cache_implementation="static")
    report("static decoding tokens", torch.equal(growing, static), f"{static.shape[1] - 1} new tokens, 4 rows")
    if device.type == "cuda":
        from switchformer.inference.routing import inference_routing

        with torch.inference_mode(), inference_routing(model, "eval", decoding=True):
            cache = model.new_static_cache(model.encode(ids), None, 8)
            tokens = torch.zeros(4, dtype=torch.long, device=device)
            model.decode_step(tokens, cache)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model.decode_step(tokens, cache)
                report("static step host syncs", True, "none inside a step")
            except RuntimeError as err:
                report("static step host syncs", False, str(err).splitlines()[0])
            finally:
                torch.cuda.set_sync_debug_mode("default")
    try:
        start = time.perf_counter()
        static = dict(max_new_tokens=16, eos_token_id=None, cache_implementation="static", compile=True)
        compiled = model.generate(ids, **static)
        seconds = time.perf_counter() - start
        # a second call with other prompts, hence new cache buffers: a replayed graph must not read the
        # first call's (transformers#30351: a compiled static cache "locked" to its first prompt)
        other = torch.randint(2, 8192, (4, 32), generator=torch.Generator().manual_seed(3)).to(device)
        again = model.generate(other, **static)
        expected = model.generate(other, max_new_tokens=16, eos_token_id=None)
        same = torch.equal(growing, compiled) and torch.equal(expected, again)
        report("compiled static step", same, f"same tokens in two calls; first call (compiling) {seconds:.0f} s")
    except Exception as err:  # noqa: BLE001 - a check reports what failed and goes on
        report("compiled static step", False, f"{type(err).__name__}: {str(err).splitlines()[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10, help="training steps per model in the speed check")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu to check the same code on CPU")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {describe_device(device)}")
    start = time.perf_counter()
    check_parity(device)
    check_backends(device)
    check_host_syncs(device)
    check_expert_grad_layout(device)
    check_bf16_training(device)
    check_serving(device)
    check_static_decoding(device)
    if not args.skip_speed:
        check_speed(device, args.steps)
    print(f"{len(FAILURES)} failed ({', '.join(FAILURES) or 'none'}) in {time.perf_counter() - start:.0f} s")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
