"""Where the GPU time goes: a Switch layer's training step and a decoding step, by kernel.

Prints ``torch.profiler`` tables (CUDA time per op, top rows) for (1) SwitchMoE forward+backward at
Switch-Base sizes (d_model 768, d_ff 3072, 64 experts, 32k tokens, bf16, dropless) next to the dense
FFN of one expert's size, and (2) greedy decoding of a Switch-Base-8 SwitchT5 at batch 1 under bf16
autocast, with the host time per step against the GPU's busy time (a step whose host time is far
above its GPU time is bound by kernel launches, not arithmetic).

    python benchmarks/cuda_profile.py
"""

from __future__ import annotations

import argparse
import time

import torch
from moe_layer import DenseFFN
from torch.profiler import ProfilerActivity, profile
from vs_transformers import SIZES, hf_model

from switchformer import SwitchMoE
from switchformer.interop.hf import from_hf


def table(prof, rows: int = 18) -> str:
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def gpu_busy_ms(prof) -> float:
    """Milliseconds of kernels: the device events themselves (op rows also carry their kernels'
    time, so summing every row of ``key_averages`` counts each kernel twice)."""
    from torch.autograd import DeviceType

    return sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3


def profile_layer(device: torch.device) -> None:
    torch.manual_seed(0)
    for name, module in (
        ("dense FFN", DenseFFN(768, 3072)),
        ("SwitchMoE E=64 dropless", SwitchMoE(768, 3072, 64, capacity_factor=None)),
    ):
        module = module.to(device, torch.bfloat16)
        if hasattr(module, "router"):
            module.router.float()
        x = torch.randn(1, 32768, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)

        def step(m=module, x=x, grad=grad):
            out = m(x)
            (out[0] if isinstance(out, tuple) else out).backward(grad)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / 5
        print(f"== {name}: {wall * 1e3:.2f} ms a step (profiled), kernels {gpu_busy_ms(prof) / 5:.2f} ms a step")
        print(table(prof), flush=True)


def profile_decoding(device: torch.device) -> None:
    hf = hf_model(8, 32128, device=device, **SIZES["base"])
    model = from_hf(hf).to(device, torch.bfloat16).eval()  # bf16 weights, no autocast: how a server runs
    del hf
    ids = torch.randint(2, 32128, (1, 64), device=device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, routing="eval")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=32, routing="eval")
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    print(
        f"== greedy decoding, batch 1, 32 new tokens: {wall / 32 * 1e3:.2f} ms a token on the host clock, "
        f"GPU kernels {gpu_busy_ms(prof) / 32:.2f} ms a token"
    )
    print(table(prof, 25), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["layer", "decoding"], default=["layer", "decoding"])
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    if "layer" in args.parts:
        profile_layer(device)
    if "decoding" in args.parts:
        profile_decoding(device)


if __name__ == "__main__":
    main()
