"""What the fused output loss and RMSNorm's hand-written backward each save in a training step.

The `vs_transformers.py` SwitchT5 (d_model 256, 4+4 layers, d_ff 1024, vocab 8192, batch 8 x 256),
one process, the variants interleaved, medians of the step time (forward, backward, fused AdamW):

- ``plain``: cross-entropy on materialised logits and autograd's RMSNorm backward (the old path);
- ``+fused loss``: :mod:`switchformer.models.vocab_loss`;
- ``+norm backward``: both.

    python benchmarks/train_step_parts.py --experts 8 64
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from vs_transformers import hf_model, train_step

from switchformer.interop.hf import from_hf
from switchformer.models import common

FUSED_LOSS = common.linear_cross_entropy
NORM_FORWARD = common.RMSNorm.forward


def unfused_loss(h, weight, labels):
    return F.cross_entropy(h @ weight.t(), labels)


def autograd_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps))


VARIANTS = {
    "plain": (unfused_loss, autograd_norm),
    "+fused loss": (FUSED_LOSS, autograd_norm),
    "+norm backward": (FUSED_LOSS, NORM_FORWARD),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| E | variant | step (ms) | vs plain |")
    print("|---:|:---|---:|---:|")
    for experts in args.experts:
        model = from_hf(hf_model(experts, 8192)).train()
        g = torch.Generator().manual_seed(1)
        batch = {name: torch.randint(2, 8192, (8, 256), generator=g) for name in ("ids", "labels")}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        times = {name: [] for name in VARIANTS}
        try:
            for step in range(args.steps + 1):
                order = list(VARIANTS) if step % 2 else list(VARIANTS)[::-1]
                for name in order:
                    common.linear_cross_entropy, common.RMSNorm.forward = VARIANTS[name]
                    elapsed = train_step(model, optimizer, batch, is_hf=False)
                    if step:  # the first round warms up allocators
                        times[name].append(elapsed)
        finally:
            common.linear_cross_entropy, common.RMSNorm.forward = FUSED_LOSS, NORM_FORWARD
        base = statistics.median(times["plain"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| {experts} | {name} | {median * 1e3:,.0f} | {base / median:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
