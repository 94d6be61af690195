"""Forward+backward time of SwitchMoE against a FLOP-matched dense FFN and Hugging Face's layer.

The dense FFN has one expert's size, so with top-1 routing it does the same matmul FLOPs per token
as the MoE layer (the MoE adds a small router). All candidates run interleaved in one process,
rotating order each round; we report medians and ratios to the dense FFN.

    python benchmarks/moe_layer.py                       # the issue's sizes, CPU, fp32
    python benchmarks/moe_layer.py --reuse-freed-memory  # with glibc keeping freed buffers (see runtime.py)
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --d-model 768 --d-ff 3072 \
        --tokens 32768 --experts 8 64 128                    # the GPU page's sizes (Switch-Base)

Hugging Face's layer gets the Switch layer's router and expert weights, so both route every token to
the same expert (checked: the largest output difference is printed). Routers stay float32 in every
candidate (the paper's selective precision). TFLOP/s counts the top-1 matmul work of forward and
backward, 12 * tokens * d_model * d_ff, the same for the dense FFN and every MoE candidate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from switchformer import SwitchMoE
from switchformer.moe.dispatch import grouped_mm_valid
from switchformer.runtime import reuse_freed_memory


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.wo(torch.relu(self.wi(x)))


def hf_layer(d_model, d_ff, num_experts, capacity):
    try:
        import transformers
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
    except ImportError:
        return None
    config = transformers.SwitchTransformersConfig(
        d_model=d_model,
        d_ff=d_ff,
        num_experts=num_experts,
        expert_capacity=capacity,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
    )
    return SwitchTransformersSparseMLP(config)


def copy_into_hf(hf, layer: SwitchMoE) -> None:
    """The Switch layer's router and experts into Hugging Face's layer: the same routing on both."""
    with torch.no_grad():
        hf.router.classifier.weight.copy_(layer.router.weight)
        for e in range(layer.num_experts):
            hf.experts[f"expert_{e}"].wi.weight.copy_(layer.experts.w_in[e].t())
            hf.experts[f"expert_{e}"].wo.weight.copy_(layer.experts.w_out[e].t())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(module, x, grad_out, device):
    for p in module.parameters():
        p.grad = None  # like optimizer.zero_grad(set_to_none=True)
    x.grad = None
    sync(device)
    start = time.perf_counter()
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(grad_out)
    sync(device)
    return time.perf_counter() - start


def bench_size(tokens, d_model, d_ff, num_experts, args, device, dtype):
    torch.manual_seed(0)
    candidates = {"dense": DenseFFN(d_model, d_ff)}
    backends = ["auto", "loop", "padded", "grouped_mm"]
    for backend in backends:
        layer = SwitchMoE(d_model, d_ff, num_experts, capacity_factor=args.capacity_factor, backend=backend)
        if backend == "grouped_mm" and not grouped_mm_valid(
            torch.empty(1, dtype=dtype, device=device), layer.experts.w_in.to(device, dtype)
        ):
            continue
        candidates[f"switch[{backend}]"] = layer
    if args.scatter_combine:  # the same layer combining by index_add_ (and scattering in backward)
        layer = SwitchMoE(d_model, d_ff, num_experts, capacity_factor=args.capacity_factor)
        layer.gather_combine = False
        candidates["switch[auto, scatter]"] = layer
    capacity = candidates["switch[auto]"].train().capacity(tokens)
    hf = None if args.no_hf else hf_layer(d_model, d_ff, num_experts, capacity or tokens)  # dropless: no cap
    if hf is not None:
        copy_into_hf(hf, candidates["switch[auto]"])
        candidates["hf SparseMLP"] = hf
    for m in candidates.values():
        m.to(device=device, dtype=dtype).train()
        for router in (getattr(m, "router", None),):
            if router is not None:
                router.float()  # selective precision, as in training (HF's router casts itself too)

    x = torch.randn(1, tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, tokens, d_model, device=device, dtype=dtype)
    hf_difference = None
    if hf is not None:
        with torch.no_grad():
            ours, theirs = candidates["switch[auto]"](x)[0].float(), hf(x)
            theirs = (theirs[0] if isinstance(theirs, tuple) else theirs).float()
            # the share of tokens whose rows agree: bf16 router probabilities (HF casts them back to
            # the input dtype before its argmax) can tie and send a few tokens elsewhere
            close = (ours - theirs).abs().amax(-1) <= 0.02 * ours.abs().amax()
            hf_difference = close.float().mean().item()
    names = list(candidates)
    for _ in range(args.warmup):
        for name in names:
            step(candidates[name], x, grad_out, device)
    times = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate to spread drift evenly
        for name in order:
            times[name].append(step(candidates[name], x, grad_out, device))
    return {name: statistics.median(ts) for name, ts in times.items()}, capacity, hf_difference


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 512])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument(
        "--capacity-factor",
        type=lambda t: None if t.lower() == "none" else float(t),
        default=1.25,
        help="none: dropless",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face's layer")
    parser.add_argument(
        "--scatter-combine", action="store_true",
        help="also the layer with index_add_ dispatch/combine instead of the gathers (switch[auto, scatter])",
    )  # fmt: skip
    parser.add_argument("--reuse-freed-memory", action="store_true", help="apply runtime.reuse_freed_memory()")
    args = parser.parse_args()
    if args.reuse_freed_memory:
        print("reuse_freed_memory:", reuse_freed_memory())
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {device}, {args.dtype}, threads {torch.get_num_threads()}, "
        f"d_model {args.d_model}, d_ff {args.d_ff}, capacity factor {args.capacity_factor}, top-1, "
        f"fwd+bwd medians of {args.repeats}"
    )
    print(f"| tokens | E | capacity | {'candidate':<18} | ms | / dense | HF / this | TFLOP/s |")
    print("|---:|---:|---:|:---|---:|---:|---:|---:|")
    for tokens in args.tokens:
        flops = 12 * tokens * args.d_model * args.d_ff  # top-1: two matmuls, forward + backward
        for experts in args.experts:
            medians, capacity, hf_difference = bench_size(tokens, args.d_model, args.d_ff, experts, args, device, dtype)
            dense, hf = medians["dense"], medians.get("hf SparseMLP")
            for name, t in medians.items():
                vs_hf = f"{hf / t:.2f}" if hf else ""
                print(
                    f"| {tokens} | {experts} | {capacity} | {name:<18} | {t * 1e3:.2f} | {t / dense:.2f} | {vs_hf} | "
                    f"{flops / t / 1e12:.1f} |",
                    flush=True,
                )
            if hf_difference is not None:
                print(
                    f"| {tokens} | {experts} | | (same routing: {hf_difference:.4f} of HF's output rows "
                    f"within 2% of ours) | | | | |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
