"""Greedy decoding with the growing cache against the static decoding step (and the step compiled
whole), for both model families, on the same weights, interleaved in one process, medians; the
tokens of every variant are checked to be identical. With ``--hf`` the encoder-decoder is also
timed through Hugging Face's ``generate`` on the same weights, the baseline of the GPU targets.

    python benchmarks/static_decoding.py                                   # CPU, small models
    python benchmarks/static_decoding.py --compile --repeats 5             # and the compiled step
    python benchmarks/static_decoding.py --device cuda --dtype bfloat16 --size base --experts 8 \\
        --batches 1 32 --compile --hf                                      # Switch-Base-8 on a GPU

Variants: ``dynamic`` (the default cache: attention over the filled columns, Switch layers sorting
each step's tokens with host reads), ``static`` (``decode_step`` over a fixed-size cache: fixed
shapes, no host reads), ``compiled`` (that step through ``torch.compile(fullgraph=True)``; CUDA
graphs on a GPU). Milliseconds per generated token (the whole ``generate`` call, prefill included,
over ``--new-tokens`` tokens; no early stop at EOS). The compiled variant's first call compiles and
is not kept (every variant's first round is a warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from switchformer.models import SwitchLM, SwitchLMConfig, SwitchT5, SwitchT5Config

SIZES = {
    "small": dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4),
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),  # Switch-Base
}


def build(family: str, size: str, experts: int, device, dtype, vocab: int = 8192) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = SIZES[size]
    if family == "t5":
        config = SwitchT5Config(vocab_size=vocab, num_experts=experts, expert_capacity=64, dropout_rate=0.0,
                                init_scale=1.0, **shape)  # fmt: skip
        model = SwitchT5(config)
    else:
        lm_shape = {k: v for k, v in shape.items() if k != "d_kv"}
        model = SwitchLM(SwitchLMConfig(vocab_size=vocab, num_experts=experts, max_seq_len=512, init_scale=1.0,
                                        activation="relu", **lm_shape))  # fmt: skip
    return model.to(device=device, dtype=dtype).eval()


def timed(fn, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def variants(model, ids, new_tokens: int, compile: bool, hf=None) -> dict:
    """name -> a call that generates ``new_tokens`` greedy tokens for ``ids``."""
    common = dict(max_new_tokens=new_tokens, eos_token_id=None)
    calls = {
        "dynamic": lambda: model.generate(ids, **common),
        "static": lambda: model.generate(ids, cache_implementation="static", **common),
    }
    if compile:
        calls["compiled"] = lambda: model.generate(ids, cache_implementation="static", compile=True, **common)
    if hf is not None:

        def hf_call():
            with torch.no_grad():
                return hf.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, num_beams=1)  # fmt: skip

        calls["transformers"] = hf_call
    return calls


def measure(calls: dict, repeats: int, device) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    times = {name: [] for name in calls}
    outputs = {}
    names = list(calls)
    for rep in range(repeats + 1):
        for name in names if rep % 2 else reversed(names):
            seconds, outputs[name] = timed(calls[name], device)
            if rep:
                times[name].append(seconds)
    return times, outputs


def hf_twin(model: SwitchT5):
    """Hugging Face's model with ``model``'s weights (``to_hf`` through a folder)."""
    import tempfile

    import transformers

    from switchformer.interop.hf import to_hf

    with tempfile.TemporaryDirectory() as folder:
        to_hf(model.float().cpu(), folder)
        hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(folder)
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=["t5", "lm"], default=["t5", "lm"])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--experts", type=int, nargs="+", default=[8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also the step compiled whole")
    parser.add_argument("--hf", action="store_true", help="the encoder-decoder through transformers too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, {args.size}, ms per token (medians of {args.repeats})")
    rows = []
    for family in args.families:
        for experts in args.experts:
            model = build(family, args.size, experts, device, dtype, args.vocab)
            hf = None
            if args.hf and family == "t5":
                hf = hf_twin(build(family, args.size, experts, "cpu", torch.float32, args.vocab)).to(
                    device=device, dtype=dtype
                )
                hf.eval()
            for batch in args.batches:
                ids = torch.randint(
                    2, args.vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1)
                )
                ids = ids.to(device)
                times, outputs = measure(variants(model, ids, args.new_tokens, args.compile, hf), args.repeats, device)
                reference = outputs["dynamic"]
                for name in ("static", "compiled"):
                    if name in outputs and not torch.equal(outputs[name], reference):
                        if dtype == torch.float32:
                            raise AssertionError(f"{family} E={experts} batch {batch}: {name} tokens differ")
                        print(f"note: {family} E={experts} batch {batch}: {name} tokens differ in {args.dtype}")
                row = {"family": family, "experts": experts, "batch": batch, "size": args.size, "dtype": args.dtype,
                       "device": where, "new_tokens": args.new_tokens}  # fmt: skip
                for name, values in times.items():
                    row[f"{name}_ms_per_token"] = statistics.median(values) / args.new_tokens * 1e3
                rows.append(row)
                cells = "  ".join(f"{name} {row[f'{name}_ms_per_token']:.2f}" for name in times)
                base = row["dynamic_ms_per_token"]
                ratios = "  ".join(
                    f"{name} {base / row[f'{name}_ms_per_token']:.2f}x" for name in times if name != "dynamic"
                )
                print(f"{family} E={experts} batch {batch}: {cells}   (speed-up over dynamic: {ratios})", flush=True)
    print(
        "\n| family | E | batch | "
        + " | ".join(k.removesuffix("_ms_per_token") for k in rows[0] if k.endswith("_ms_per_token"))
        + " | speed-up of static (dynamic ms / static ms) |"
    )
    print("|---|---:|---:|" + "---:|" * (sum(k.endswith("_ms_per_token") for k in rows[0]) + 1))
    for row in rows:
        cells = " | ".join(f"{v:.2f}" for k, v in row.items() if k.endswith("_ms_per_token"))
        ratio = row["dynamic_ms_per_token"] / row["static_ms_per_token"]
        print(f"| {row['family']} | {row['experts']} | {row['batch']} | {cells} | {ratio:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
