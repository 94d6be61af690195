"""Sentences per second of switchformer's ``translate`` (greedy and beam search, batches of 32)
against Hugging Face ``transformers``' ``generate`` on the same SwitchTransformers weights.

A random Hugging Face ``SwitchTransformersForConditionalGeneration`` is loaded into switchformer
with ``from_hf``; both translate the same synthetic sentences (random words, 4 to 40 of them), text
to text: tokenising (the same tokenizer and source formatting for both), decoding, detokenising.
``transformers`` runs two ways: batches of 32 in input order (the loop users write) and the very
batches ``translate`` forms (sorted by length), so the table shows what batching buys and what the
decoding itself costs. Runs are interleaved (the order alternates every round; the first round
warms up and is not kept) and medians are reported. Every run's translations must be identical to
``translate``'s, row by row; the script stops otherwise. A random model rarely emits EOS, so
every sentence decodes ``--max-new-tokens`` tokens.

    python benchmarks/translate_speed.py                          # CPU, small model (minutes)
    python benchmarks/translate_speed.py --sentences 64 --repeats 1 --max-new-tokens 8 --size tiny   # a check
    python benchmarks/translate_speed.py --device cuda --sentences 1024
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from vs_transformers import SIZES, describe_device, hf_model

from switchformer.data.tokenizer import special_ids, train_tokenizer
from switchformer.inference.translation import decode_output, encode_sources, translate
from switchformer.interop.hf import from_hf
from switchformer.train.config import TrainConfig

SIZES = dict(SIZES, tiny=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
_LETTERS = random.Random(0)
WORDS = ["".join(_LETTERS.choices("abcdefghijklmnoprstuvwz", k=_LETTERS.randint(2, 9))) for _ in range(3000)]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) for _ in range(count)]


def hf_translate(model, tokenizer, config, texts, batch_size, num_beams, max_new_tokens, sort: bool) -> list[str]:
    """Text to text with ``transformers``' ``generate``: the same source formatting and EOS as
    ``translate``, right padding with an attention mask; batches in input order, or sorted by
    length as ``translate`` sorts them."""
    ids = encode_sources(tokenizer, config, texts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort else list(range(len(ids)))
    eos, pad = special_ids(tokenizer)["eos"], model.config.pad_token_id
    device = next(model.parameters()).device
    out = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chosen)
        batch = torch.full((len(chosen), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for r, i in enumerate(chosen):
            batch[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=batch.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                length_penalty=1.0,
                early_stopping=False,
            )
        for i, row in zip(chosen, generated[:, 1:].tolist()):
            out[i] = decode_output(tokenizer, row, eos)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer size (trained on the synthetic text)")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4], help="1: greedy")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # identical outputs, not TF32's

    texts = sentences(args.sentences)
    tokenizer = train_tokenizer(sentences(5000, seed=1), args.vocab)
    size = SIZES[args.size]
    hf = hf_model(args.experts, tokenizer.get_vocab_size(), device=device, **size).eval()
    ours = from_hf(hf).to(device).eval()
    config = TrainConfig(model="t5", objective="seq2seq", seq_len=128)
    print(
        f"torch {torch.__version__}, {describe_device(device)}, d_model {size['d_model']}, "
        f"{size['num_layers']}+{size['num_layers']} layers, {args.experts} experts every other layer, vocab "
        f"{tokenizer.get_vocab_size()}, {args.sentences} sentences of 4-40 words, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens each"
    )
    print("| decoding | HF, input order | HF, sorted as ours | switchformer | vs HF input order | vs HF sorted |")
    print("|:---|---:|---:|---:|---:|---:|")
    for beams in args.beams:
        runs = {
            "ours": lambda b=beams: list(
                translate(
                    ours,
                    tokenizer,
                    config,
                    texts,
                    batch_size=args.batch_size,
                    num_beams=b,
                    length_penalty=1.0,
                    max_new_tokens=args.max_new_tokens,
                )
            ),
            "hf": lambda b=beams: hf_translate(
                hf, tokenizer, config, texts, args.batch_size, b, args.max_new_tokens, sort=False
            ),
            "hf_sorted": lambda b=beams: hf_translate(
                hf, tokenizer, config, texts, args.batch_size, b, args.max_new_tokens, sort=True
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        outputs: dict[str, list[str]] = {}
        names = list(runs)
        for rep in range(args.repeats + 1):
            for name in names if rep % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                outputs[name] = runs[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if rep:
                    times[name].append(time.perf_counter() - start)
        for name in ("hf", "hf_sorted"):
            differ = [i for i, (a, b) in enumerate(zip(outputs[name], outputs["ours"])) if a != b]
            assert not differ, f"{name} and switchformer differ at sentence {differ[0]}, {len(differ)} in all"
        rate = {name: args.sentences / statistics.median(t) for name, t in times.items()}
        label = "greedy" if beams == 1 else f"{beams} beams"
        print(
            f"| {label} (sentences/s) | {rate['hf']:.1f} | {rate['hf_sorted']:.1f} | {rate['ours']:.1f} | "
            f"{rate['ours'] / rate['hf']:.2f}x | {rate['ours'] / rate['hf_sorted']:.2f}x |",
            flush=True,
        )
    print("outputs identical to transformers' generate, sentence by sentence, for every setting")


if __name__ == "__main__":
    main()
