"""SwitchT5 against Hugging Face's SwitchTransformersForConditionalGeneration on the same weights.

Training step (forward, backward, AdamW) throughput and greedy generation speed, interleaved in one
process, medians; outputs are checked to be identical (logits within 1e-4, same generated tokens).

    python benchmarks/vs_transformers.py
    python benchmarks/vs_transformers.py --experts 8 --steps 5 --gen-repeats 3   # quicker
    python benchmarks/vs_transformers.py --device cuda                           # on a GPU (fp32, no TF32)
    python benchmarks/vs_transformers.py --device cuda --size base --dtype bfloat16 --experts 8 \
        --batch 16 --seq 512 --gen-batches 1 32                                  # Switch-Base-8, bf16 autocast

``--size base`` is Switch-Base (d_model 768, 12+12 layers, 12 heads, d_ff 3072, vocab 32128, sparse
every other layer). ``--dtype bfloat16`` runs both models under bf16 autocast with float32 weights
(training and generation alike); outputs are then compared, not required to be identical, since
the two sum in different orders. Training TFLOP/s counts 3x the forward matmul FLOPs of
``parameter_counts`` (attention over ``--seq`` keys) for every input and label token.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

from switchformer.interop.hf import from_hf
from switchformer.models.accounting import parameter_counts
from switchformer.runtime import reuse_freed_memory

SIZES = {
    "small": dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4),
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),  # Switch-Base
}


def hf_model(
    experts: int,
    vocab: int,
    seed: int = 0,
    d_model: int = 256,
    d_kv: int = 64,
    d_ff: int = 1024,
    num_layers: int = 4,
    num_heads: int = 4,
    device: str | torch.device = "cpu",
):
    """A randomly initialised HF Switch model, built directly on ``device`` (fast on a GPU)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.SwitchTransformersConfig(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        num_experts=experts,
        num_sparse_encoder_layers=num_layers // 2,
        num_sparse_decoder_layers=num_layers // 2,
        expert_capacity=64,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        eos_token_id=1,
    )
    with torch.device(device):
        return transformers.SwitchTransformersForConditionalGeneration(config)


AUTOCAST: dict = {"dtype": None}  # set by main(): the autocast dtype of every timed call, or None


def precision(device: torch.device):
    dtype = AUTOCAST["dtype"]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads the work itself and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


HF_ROUTER_LOSSES = {"on": True}


def hf_training_forward(model, batch):
    """HF's loss with its router losses, as ours; transformers 5.17 fails to collect the encoder's
    router logits when asked (``torch.cat`` of an empty list), and is then timed without them."""
    if HF_ROUTER_LOSSES["on"]:
        try:
            return model(input_ids=batch["ids"], labels=batch["labels"], output_router_logits=True)
        except ValueError as err:
            HF_ROUTER_LOSSES["on"] = False
            print(f"note: HF's output_router_logits=True failed ({err}); HF timed without router losses")
    return model(input_ids=batch["ids"], labels=batch["labels"])


def train_step(model, optimizer, batch, is_hf):
    optimizer.zero_grad(set_to_none=True)
    device = batch["ids"].device
    synchronize(device)
    start = time.perf_counter()
    with precision(device):
        if is_hf:
            out = hf_training_forward(model, batch)
        else:
            out = model(batch["ids"], labels=batch["labels"])
    out.loss.backward()
    optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_train_times(models: dict, optimizers: dict, batch: dict, steps: int) -> dict[str, list[float]]:
    """Seconds per training step of each model (``"hf"`` and ``"ours"``), alternating which goes
    first; the first round warms up allocators and caches and is not kept."""
    times = {name: [] for name in models}
    for step in range(steps + 1):
        for name in ("hf", "ours") if step % 2 else ("ours", "hf"):
            elapsed = train_step(models[name], optimizers[name], batch, name == "hf")
            if step:
                times[name].append(elapsed)
    return times


def generate(model, ids, new_tokens, is_hf):
    synchronize(ids.device)
    start = time.perf_counter()
    with torch.no_grad(), precision(ids.device):
        if is_hf:
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
        else:
            out = model.generate(ids, max_new_tokens=new_tokens, routing="eval")
    synchronize(ids.device)
    return time.perf_counter() - start, out


def interleaved_generate_times(models: dict, ids, new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """Seconds per greedy generation of each model (``"hf"`` and ``"ours"``), alternating which goes
    first, and each model's last output; the first round warms up and is not kept."""
    times = {name: [] for name in models}
    outputs = {}
    for rep in range(repeats + 1):
        for name in ("hf", "ours") if rep % 2 else ("ours", "hf"):
            seconds, outputs[name] = generate(models[name], ids, new_tokens, name == "hf")
            if rep:
                times[name].append(seconds)
    return times, outputs


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"threads {torch.get_num_threads()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7, help="timed training steps; 0: no training")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen-repeats", type=int, default=5)
    parser.add_argument("--reuse-freed-memory", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: autocast")
    parser.add_argument("--gen-batches", type=int, nargs="+", default=None, help="default: 1 and --batch")
    parser.add_argument("--no-generate", action="store_true", help="time training only")
    parser.add_argument(
        "--gen-weights",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: generate with copies of both models cast to bf16 weights and no autocast (how a "
        "server runs), instead of float32 weights under --dtype's autocast",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    # exact fp32 on both sides: TF32 would make "identical outputs" a question of rounding
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    AUTOCAST["dtype"] = None if args.dtype == "float32" else torch.bfloat16
    if args.reuse_freed_memory:
        reuse_freed_memory()
    size = SIZES[args.size]
    print(
        f"torch {torch.__version__}, {describe_device(device)}, {args.dtype}, d_model {size['d_model']}, "
        f"{size['num_layers']}+{size['num_layers']} layers, d_ff {size['d_ff']}, {size['num_heads']} heads, "
        f"vocab {args.vocab}, sparse every other layer, batch {args.batch} x {args.seq}"
    )
    print("| E | measure | HF | switchformer | speed-up |")
    print("|---:|:---|---:|---:|---:|")
    for experts in args.experts:
        hf = hf_model(experts, args.vocab, device=device, **size).train()
        ours = from_hf(hf).to(device).train()
        g = torch.Generator().manual_seed(1)
        batch = {
            "ids": torch.randint(2, args.vocab, (args.batch, args.seq), generator=g).to(device),
            "labels": torch.randint(2, args.vocab, (args.batch, args.seq), generator=g).to(device),
        }
        with torch.no_grad(), precision(device):
            hf.eval(), ours.eval()
            theirs = hf(input_ids=batch["ids"], labels=batch["labels"]).logits.float()
            mine = ours(batch["ids"], labels=batch["labels"]).logits.float()
            diff = (theirs - mine).abs().max().item()
            scale = theirs.abs().max().item()
            same_argmax = (theirs.argmax(-1) == mine.argmax(-1)).float().mean().item()
            del theirs, mine
            hf.train(), ours.train()
        if AUTOCAST["dtype"] is None:
            assert diff < 1e-3, f"logits differ by {diff}"  # fp32 summation order over 8 layers and 8192 logits
        print(f"| {experts} | max abs logit difference (largest logit {scale:.1f}) | | {diff:.1e} | |")
        print(f"| {experts} | positions with the same arg-max token | | {same_argmax:.4f} | |")
        models = {"hf": hf, "ours": ours}

        # generation first, while both hold the very same weights (training moves them apart)
        hf.eval(), ours.eval()
        gen_models, gen_autocast = models, AUTOCAST["dtype"]
        if args.gen_weights == "bfloat16" and not args.no_generate:
            gen_models = {name: copy.deepcopy(m).to(torch.bfloat16) for name, m in models.items()}
            AUTOCAST["dtype"] = None
            print(f"| {experts} | generation below: bf16 weights, no autocast | | | |")
        for gen_batch in () if args.no_generate else args.gen_batches or (1, args.batch):
            g = torch.Generator().manual_seed(2)
            ids = torch.randint(2, args.vocab, (gen_batch, 64), generator=g).to(device)
            times, outputs = interleaved_generate_times(gen_models, ids, args.new_tokens, args.gen_repeats)
            same = torch.equal(outputs["hf"], outputs["ours"])
            new = outputs["ours"].shape[1] - 1
            hf_t, our_t = statistics.median(times["hf"]), statistics.median(times["ours"])
            print(
                f"| {experts} | greedy tokens/s, batch {gen_batch}, {new} new{'' if same else ' (OUTPUTS DIFFER)'} | "
                f"{gen_batch * new / hf_t:,.0f} | {gen_batch * new / our_t:,.0f} | {hf_t / our_t:.2f}x |",
                flush=True,
            )

        AUTOCAST["dtype"] = gen_autocast
        del gen_models

        # the same optimizer for both: fused AdamW (one pass per tensor), as the trainer uses
        hf.train(), ours.train()
        optimizers = {
            "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True),
            "ours": torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True),
        }
        if args.steps < 1:
            del models, optimizers, hf, ours
            continue
        times = interleaved_train_times(models, optimizers, batch, args.steps)
        hf_t, our_t = statistics.median(times["hf"]), statistics.median(times["ours"])
        tokens = args.batch * args.seq * 2
        print(
            f"| {experts} | training tokens/s (fwd+bwd+fused AdamW) | {tokens / hf_t:,.0f} | {tokens / our_t:,.0f} | "
            f"{hf_t / our_t:.2f}x |",
            flush=True,
        )
        flops = 3 * parameter_counts(ours, context_len=args.seq)["flops_per_token"] * tokens
        print(
            f"| {experts} | training TFLOP/s (3x forward matmul FLOPs) | {flops / hf_t / 1e12:.1f} | "
            f"{flops / our_t / 1e12:.1f} | |",
            flush=True,
        )
        del models, optimizers, hf, ours
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
