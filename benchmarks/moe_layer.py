"""Forward+backward time of SwitchMoE against a FLOP-matched dense FFN and Hugging Face's layer.

The dense FFN has one expert's size, so with top-1 routing it does the same matmul FLOPs per token
as the MoE layer (the MoE adds a small router). All candidates run interleaved in one process,
rotating order each round; we report medians and ratios to the dense FFN.

    python benchmarks/moe_layer.py                       # the issue's sizes, CPU, fp32
    python benchmarks/moe_layer.py --reuse-freed-memory  # with glibc keeping freed buffers (see runtime.py)
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from switchformer import SwitchMoE
from switchformer.dispatch import grouped_mm_valid
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
    capacity = candidates["switch[auto]"].train().capacity(tokens)
    hf = None if args.no_hf else hf_layer(d_model, d_ff, num_experts, capacity)
    if hf is not None:
        candidates["hf SparseMLP"] = hf
    for m in candidates.values():
        m.to(device=device, dtype=dtype).train()

    x = torch.randn(1, tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, tokens, d_model, device=device, dtype=dtype)
    names = list(candidates)
    for _ in range(args.warmup):
        for name in names:
            step(candidates[name], x, grad_out, device)
    times = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate to spread drift evenly
        for name in order:
            times[name].append(step(candidates[name], x, grad_out, device))
    return {name: statistics.median(ts) for name, ts in times.items()}, capacity


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 512])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face's layer")
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
    print(f"| tokens | E | capacity | {'candidate':<18} | ms | / dense |")
    print("|---:|---:|---:|:---|---:|---:|")
    for tokens in args.tokens:
        for experts in args.experts:
            medians, capacity = bench_size(tokens, args.d_model, args.d_ff, experts, args, device, dtype)
            dense = medians["dense"]
            for name, t in medians.items():
                print(
                    f"| {tokens} | {experts} | {capacity} | {name:<18} | {t * 1e3:.1f} | {t / dense:.2f} |", flush=True
                )


if __name__ == "__main__":
    main()
