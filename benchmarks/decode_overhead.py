"""Where a greedy decoding step's time goes: per-op overhead against the arithmetic, for SwitchT5
and Hugging Face.

The `vs_transformers.py` model decodes twice per implementation: at its real size, and shrunk to
d_model 16, d_kv 4, d_ff 32 (the same layers, heads, experts, vocabulary and op sequence, with
products too small to cost anything). The shrunk model's time per step is the overhead floor: Python,
dispatch and small kernels. The real step minus that floor is the arithmetic (mostly reading
weights). Both sides do the same arithmetic, so a speed-up of 2x needs our whole step within half of
Hugging Face's: the last column says how much time that leaves for our overhead. Interleaved runs,
medians.

    python benchmarks/decode_overhead.py
    python benchmarks/decode_overhead.py --experts 8 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics

import torch
from vs_transformers import describe_device, hf_model, interleaved_generate_times

from switchformer.interop.hf import from_hf

SIZES = {"real": {}, "shrunk": {"d_model": 16, "d_kv": 4, "d_ff": 32}}


def step_ms(experts: int, batch: int, size: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per generated token position of each model (``"hf"``, ``"ours"``)."""
    hf = hf_model(experts, 8192, **size).eval()
    models = {"hf": hf, "ours": from_hf(hf).eval()}
    ids = torch.randint(2, 8192, (batch, 64), generator=torch.Generator().manual_seed(1))
    times, outputs = interleaved_generate_times(models, ids, new_tokens, repeats)
    if not torch.equal(outputs["hf"], outputs["ours"]):
        raise AssertionError(f"E={experts} batch {batch} {size}: greedy tokens differ")
    steps = outputs["ours"].shape[1] - 1
    return {name: statistics.median(t) / steps * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {describe_device(torch.device('cpu'))}, ms per decoding step")
    print(
        "| E | batch | HF step | HF overhead | HF arithmetic | our step | our overhead | our arithmetic "
        "| speed-up | overhead left for 2x |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for experts in args.experts:
        for batch in args.batches:
            real = step_ms(experts, batch, SIZES["real"], args.new_tokens, args.repeats)
            floor = step_ms(experts, batch, SIZES["shrunk"], args.new_tokens, args.repeats)
            arithmetic = {name: real[name] - floor[name] for name in real}
            room = real["hf"] / 2 - arithmetic["ours"]
            print(
                f"| {experts} | {batch} | {real['hf']:.2f} | {floor['hf']:.2f} | {arithmetic['hf']:.2f} "
                f"| {real['ours']:.2f} | {floor['ours']:.2f} | {arithmetic['ours']:.2f} "
                f"| {real['hf'] / real['ours']:.2f}x | {room:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
