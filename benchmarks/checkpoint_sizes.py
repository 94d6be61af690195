"""Google's checkpoints: parameters and memory of each, and which machine fits which (docs/models.md,
"Google's checkpoints: sizes").

Every model is built as switchformer's SwitchT5 on the meta device (no memory, no download) from
its Hugging Face ``config.json`` values, read by ``switchformer.interop.hf.config_from_hf`` as
transformers reads them; parameters are counted on that model (tied embeddings once), and the
optimizer state is computed from its tensors' shapes:

- weights: 2 bytes per parameter in bf16, 4 in fp32;
- fine-tuning with AdamW (fp32 weights, bf16 autocast): weights 4 + gradients 4 + two moments 8
  = 16 bytes per parameter;
- fine-tuning with Adafactor (torch.optim.Adafactor, switchformer's): weights 4 + gradients 4 +
  the factored second moment (one row and one column vector per matrix, per expert for stacked
  expert weights; a full vector for vectors), a few bytes per thousand parameters.

Activations come on top (they grow with batch and sequence length, not with the number of
experts); the machine verdicts keep a quarter of the memory for them.

    python benchmarks/checkpoint_sizes.py                      # the docs' table (markdown)
    python benchmarks/checkpoint_sizes.py --measure-cpu-step   # also time switch-base-8 steps here
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from switchformer.interop.hf_config import config_from_hf
from switchformer.models import SwitchT5
from switchformer.models.accounting import parameter_counts

GIB = 2**30
CPU_RAM_GIB = 24  # this project's CPU machine (2 cores)
GPU_GIB = 80  # one A100/H100 80 GB
HEADROOM = 0.75  # the share of memory the weights and optimizer may take; the rest for activations


def switch(num_experts: int, **sizes) -> dict:
    """A SwitchTransformers config.json as Google's checkpoints on the hub have it (base sizes by
    default: d_model 768, d_ff 3072, 12 + 12 layers, every other one sparse, expert_capacity 64)."""
    config = dict(
        model_type="switch_transformers", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12,
        num_layers=12, num_decoder_layers=12, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
        encoder_sparse_step=2, decoder_sparse_step=2, num_experts=num_experts, expert_capacity=64,
        dense_act_fn="relu", tie_word_embeddings=True,
    )  # fmt: skip
    config.update(sizes)
    return config


T5_SMALL = dict(model_type="t5", vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6)
T5_BASE = dict(model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12)
T5_V1_1_BASE = dict(
    model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12,
    num_decoder_layers=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)  # fmt: skip

# name -> (config.json values, where they come from)
CHECKPOINTS = {
    "google/switch-base-8": (switch(8), "hub config.json (via fine-tuned copies naming it)"),
    "google/switch-base-16": (switch(16), "as switch-base-32/256, experts 16 (not seen)"),
    "google/switch-base-32": (switch(32), "hub config.json"),
    "google/switch-base-64": (switch(64), "as switch-base-32/256, experts 64 (not seen)"),
    "google/switch-base-128": (switch(128), "hub layout (12+12 layers, 6+6 sparse) in public code"),
    "google/switch-base-256": (switch(256), "hub config.json"),
    "google/switch-large-128": (
        switch(
            128,
            d_model=1024,
            d_ff=4096,
            num_heads=16,
            num_layers=24,
            num_decoder_layers=24,
            num_sparse_encoder_layers=12,
            num_sparse_decoder_layers=12,
        ),
        "not seen: T5-Large shape with 128 experts; matches the 26.4B published for it",
    ),  # fmt: skip
    "google/switch-xxl-128": (
        switch(
            128,
            d_model=4096,
            d_ff=10240,
            num_heads=64,
            num_layers=24,
            num_decoder_layers=24,
            num_sparse_encoder_layers=12,
            num_sparse_decoder_layers=12,
        ),
        "not seen: the paper's Switch-XXL shape (Table 9) with 128 experts, ungated; the paper counts 395B "
        "(GEGLU experts)",
    ),  # fmt: skip
    "google/switch-c-2048": (
        switch(
            2048,
            d_model=2080,
            d_ff=6144,
            num_heads=30,
            num_layers=15,
            num_decoder_layers=12,
            num_sparse_encoder_layers=15,
            num_sparse_decoder_layers=15,
            encoder_sparse_step=1,
            decoder_sparse_step=0,
        ),
        "hub config.json as published: 15 sparse encoder layers, 12 dense decoder layers (what "
        "transformers builds from it)",
    ),  # fmt: skip
    "switch-c-2048 weights": (
        switch(
            2048,
            d_model=2080,
            d_ff=6144,
            num_heads=30,
            num_layers=15,
            num_decoder_layers=15,
            num_sparse_encoder_layers=15,
            num_sparse_decoder_layers=15,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
        ),
        "the paper's Switch-C (Table 9: 15 layers a stack, every one sparse), which the hub's 3.1 TB of "
        "bf16 weights hold",
    ),  # fmt: skip
    "t5-small": (T5_SMALL, "hub config.json"),
    "t5-base": (T5_BASE, "not seen (T5 v1.0 base)"),
    "google/t5-v1_1-base": (T5_V1_1_BASE, "hub config.json (via copies naming it)"),
}


def meta_model(hf_config: dict) -> SwitchT5:
    config = config_from_hf(hf_config)
    with torch.device("meta"):
        return SwitchT5(config)


def adafactor_state_numel(model: torch.nn.Module) -> int:
    """Elements of torch.optim.Adafactor's state for ``model``: a row and a column vector per
    matrix (over the last two dims; leading dims, such as the experts of a stacked weight, each
    get their own), the full second moment of a vector."""
    total = 0
    for p in model.parameters():
        shape = p.shape
        if p.dim() >= 2:
            lead = math.prod(shape[:-2])
            total += lead * (shape[-2] + shape[-1])
        else:
            total += p.numel()
    return total


def sizes(name: str) -> dict:
    hf_config, source = CHECKPOINTS[name]
    model = meta_model(hf_config)
    counts = parameter_counts(model)
    params = counts["total"]
    adafactor = 8 * params + 4 * adafactor_state_numel(model)
    return dict(
        name=name,
        source=source,
        params=params,
        active=counts["active"],
        bf16=2 * params,
        fp32=4 * params,
        adamw=16 * params,
        adafactor=adafactor,
    )


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:,}"


def gib(n: float) -> str:
    return f"{n / GIB:,.1f}" if n < 10 * GIB else f"{n / GIB:,.0f}"


def verdict(row: dict) -> str:
    """Which machine fits fine-tuning with Adafactor (and, failing that, inference in bf16)."""
    cpu, gpu = HEADROOM * CPU_RAM_GIB * GIB, HEADROOM * GPU_GIB * GIB
    if row["adafactor"] <= cpu:
        return "this CPU: fine-tunes (slow), also every GPU"
    if row["adafactor"] <= gpu:
        optimizer = " (Adafactor; AdamW needs more)" if row["adamw"] > gpu else ""
        return f"one 80 GB GPU fine-tunes{optimizer}" + ("; this CPU: inference only" if row["bf16"] <= cpu else "")
    gpus = math.ceil(row["adafactor"] / gpu)
    serve = "inference on one 80 GB GPU" if row["bf16"] <= gpu else f"{math.ceil(row['bf16'] / gpu)} GPUs to serve"
    return f"expert parallelism: >= {gpus} GPUs of 80 GB to fine-tune; {serve}"


def table(rows: list[dict]) -> str:
    head = (
        "| checkpoint | parameters | active per token | weights bf16 / fp32 (GiB) | fine-tuning AdamW "
        "(GiB) | fine-tuning Adafactor (GiB) | fits |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['name']} | {human(r['params'])} | {human(r['active'])} | {gib(r['bf16'])} / {gib(r['fp32'])} "
            f"| {gib(r['adamw'])} | {gib(r['adafactor'])} | {verdict(r)} |"
        )
    return "\n".join(lines)


def measure_cpu_step(steps: int = 3, batch: int = 8, length: int = 32) -> str:
    """Seconds per fine-tuning step of switch-base-8 here: random weights, ``batch`` pairs of
    ``length`` source and target tokens, forward, backward and an Adafactor step (fp32)."""
    from switchformer.models import SwitchT5

    torch.manual_seed(0)
    model = SwitchT5(config_from_hf(CHECKPOINTS["google/switch-base-8"][0]))
    model.train()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 32000, (batch, length))
    labels = torch.randint(3, 32000, (batch, length))
    times = []
    for _ in range(steps + 1):  # the first step allocates the optimizer state: not timed
        start = time.perf_counter()
        out = model(ids, labels=labels)
        (out.loss + out.aux_loss + out.z_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    per_step = sorted(times[1:])[len(times[1:]) // 2]
    tokens = 2 * batch * length
    return (
        f"switch-base-8 fine-tuning on this CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads): "
        f"{per_step:.1f} s per step of {batch} pairs x {length}+{length} tokens (median of {steps}), "
        f"{tokens / per_step:.0f} tokens/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-cpu-step", action="store_true", help="time switch-base-8 steps on this CPU")
    args = parser.parse_args()
    rows = [sizes(name) for name in CHECKPOINTS]
    print(table(rows))
    print()
    for r in rows:
        print(f"- {r['name']}: {r['source']}")
    if args.measure_cpu_step:
        print()
        print(measure_cpu_step())


if __name__ == "__main__":
    main()
