"""How close a training step is to this machine's limits, for SwitchT5 and Hugging Face.

On the `vs_transformers.py` model and batch, for each implementation: the median step time
(forward, backward, fused AdamW; unprofiled, interleaved), then one profiled step split into matrix
multiplications (their FLOPs and time, by shape), the fused AdamW kernel, and everything else. The
machine's matmul peak is measured on a large square GEMM. The last line answers: if a step did its
matmuls at the measured peak and took no time for anything but them and the optimizer, how much
faster than Hugging Face's measured step could it be? Both sides do the same matmul FLOPs (the
same model), so that ratio bounds what any implementation of this model can reach here. Products
inside fused kernels (SDPA's flash attention) are not counted as matmuls: their time is in "rest".

    python benchmarks/roofline.py --experts 8 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from vs_transformers import hf_model, interleaved_train_times, train_step

from switchformer.interop.hf import from_hf

MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm"}


def matmul_flops(name: str, shapes: list) -> int:
    if name in ("aten::mm", "aten::bmm"):
        a, b = shapes[0], shapes[1]
    else:  # addmm / baddbmm: (bias, a, b)
        a, b = shapes[1], shapes[2]
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def peak_gflops(size: int = 2048, repeats: int = 5, trials: int = 5) -> float:
    """The best of several timings: on a shared machine the slow ones measure the neighbours."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def profile_step(model, optimizer, batch, is_hf) -> dict:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(model, optimizer, batch, is_hf)
    parts = {"matmul_s": 0.0, "matmul_flops": 0, "adamw_s": 0.0}
    for event in prof.events():
        seconds = event.self_cpu_time_total / 1e6
        if event.name in MATMULS:
            parts["matmul_s"] += seconds
            parts["matmul_flops"] += matmul_flops(event.name, event.input_shapes)
        elif event.name == "aten::_fused_adamw_":
            parts["adamw_s"] += seconds
    return parts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    peak = peak_gflops()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, matmul peak {peak:.0f} GFLOP/s (2048^3)")
    print(
        "| E | model | step (ms) | matmul GFLOP | matmul (ms, profiled) | matmul GFLOP/s | fused AdamW (ms) "
        "| rest (ms) |"
    )
    print("|---:|:---|---:|---:|---:|---:|---:|---:|")
    for experts in args.experts:
        hf = hf_model(experts, 8192).train()
        models = {"hf": hf, "ours": from_hf(hf).train()}
        g = torch.Generator().manual_seed(1)
        batch = {name: torch.randint(2, 8192, (8, 256), generator=g) for name in ("ids", "labels")}
        optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in models.items()}
        times = interleaved_train_times(models, optimizers, batch, args.steps)
        medians = {name: statistics.median(values) for name, values in times.items()}
        floors = {}
        for name in ("hf", "ours"):
            parts = profile_step(models[name], optimizers[name], batch, name == "hf")
            step_ms = medians[name] * 1e3
            matmul_ms, adamw_ms = parts["matmul_s"] * 1e3, parts["adamw_s"] * 1e3
            floors[name] = parts["matmul_flops"] / peak / 1e6 + adamw_ms  # ms at peak, plus the optimizer
            print(
                f"| {experts} | {name} | {step_ms:,.0f} | {parts['matmul_flops'] / 1e9:.1f} | {matmul_ms:,.0f} | "
                f"{parts['matmul_flops'] / parts['matmul_s'] / 1e9:.0f} | {adamw_ms:,.0f} | "
                f"{max(step_ms - matmul_ms - adamw_ms, 0.0):,.0f} |",
                flush=True,
            )
        print(
            f"| {experts} | bound | {floors['ours']:,.0f} | matmuls at peak + AdamW: at most "
            f"{medians['hf'] * 1e3 / floors['ours']:.2f}x HF's step; measured {medians['hf'] / medians['ours']:.2f}x | "
            "| | | |",
            flush=True,
        )


if __name__ == "__main__":
    main()
