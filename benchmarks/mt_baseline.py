"""The from-scratch anchor for translation: a plain PyTorch Transformer encoder-decoder of the
tutorials' kind, trained on the same pairs, threads and wall-clock budget as a `switchformer train`
run, and scored with the same sacreBLEU call.

The model follows the published description of the tutorials' baseline (Vaswani et al. 2017, at
the size of bentrevett/pytorch-seq2seq's "Attention is All You Need" notebook): `torch.nn.Transformer`
with 3+3 post-norm layers, d_model 256, 8 heads, feed-forward 512, dropout 0.1, sinusoidal
positions added to embeddings scaled by sqrt(d_model), separate source and target embeddings, an
untied output layer, Xavier-uniform initialisation, Adam (betas 0.9/0.98) with linear warmup, batches
of similar length. What is shared with our run on purpose: the tokenizer (give the run's
`tokenizer.json`, or one is trained the same way: byte-level BPE over both sides), so validation
losses are per the same tokens and comparable; the metric (`switchformer.analysis.metrics`).

    D=../shared/data/multi30k
    OMP_WAIT_POLICY=PASSIVE python benchmarks/mt_baseline.py --data $D/train.de.gz $D/train.en.gz \\
        --valid $D/val.de.gz $D/val.en.gz --minutes 30 --tokenizer runs/de-en/tokenizer.json --out anchor.json

It prints the validation loss every `--eval-every` steps and, at the end, BLEU and chrF of greedy
and beam decoding of the validation sources, and writes them as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn


class Anchor(nn.Module):
    """Embeddings (scaled by sqrt(d_model)) + sinusoidal positions -> ``nn.Transformer`` -> a linear
    layer over the vocabulary. Token id ``pad`` is padding and also the decoder's start token."""

    def __init__(self, vocab_size: int, pad: int, d_model=256, num_heads=8, num_layers=3, d_ff=512, dropout=0.1):
        super().__init__()
        self.pad, self.d_model = pad, d_model
        self.src_embed = nn.Embedding(vocab_size, d_model, padding_idx=pad)
        self.tgt_embed = nn.Embedding(vocab_size, d_model, padding_idx=pad)
        self.transformer = nn.Transformer(d_model, num_heads, num_layers, num_layers, d_ff, dropout, batch_first=True)
        self.out = nn.Linear(d_model, vocab_size)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.register_buffer("positions", sinusoids(512, d_model), persistent=False)

    def _embed(self, table: nn.Embedding, ids: Tensor) -> Tensor:
        return self.dropout(table(ids) * math.sqrt(self.d_model) + self.positions[: ids.shape[1]])

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        pad_mask = src == self.pad
        return self.transformer.encoder(self._embed(self.src_embed, src), src_key_padding_mask=pad_mask), pad_mask

    def decode(self, memory: Tensor, memory_pad: Tensor, tgt_in: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], device=tgt_in.device)
        hidden = self.transformer.decoder(
            self._embed(self.tgt_embed, tgt_in),
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            memory_key_padding_mask=memory_pad,
        )
        return self.out(hidden)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, memory_pad = self.encode(src)
        return self.decode(memory, memory_pad, tgt_in)


def sinusoids(length: int, d_model: int) -> Tensor:
    """The sine/cosine position table of Vaswani et al. (2017), section 3.5: [length, d_model]."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)
    return table


def pad_rows(rows: list[list[int]], pad: int) -> Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def batches(sources, targets, batch_size: int, generator: torch.Generator, pool_batches: int = 50):
    """One epoch of (source, target) batches of similar length: the shuffled order cut into windows
    of ``pool_batches`` batches, each window sorted by length and cut, the batches shuffled (the
    bucketing of translation toolkits, as ``bucket_by_length`` does for our runs)."""
    order = torch.randperm(len(sources), generator=generator).tolist()
    out = []
    pool = batch_size * pool_batches
    for start in range(0, len(order), pool):
        window = sorted(order[start : start + pool], key=lambda i: len(sources[i]) + len(targets[i]))
        out += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    for i in torch.randperm(len(out), generator=generator).tolist():
        yield out[i]


@torch.no_grad()
def validation_loss(model: Anchor, sources, targets, pad: int, batch_size: int = 128) -> float:
    """Mean cross-entropy (nats) per target token, EOS included, without label smoothing."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sources), batch_size):
        src = pad_rows(sources[start : start + batch_size], pad)
        tgt = pad_rows(targets[start : start + batch_size], pad)
        tgt_in = torch.cat([torch.full((len(tgt), 1), pad), tgt[:, :-1]], dim=1)
        logits = model(src, tgt_in)
        mask = tgt != pad
        loss = nn.functional.cross_entropy(logits[mask], tgt[mask], reduction="sum")
        total, count = total + float(loss), count + int(mask.sum())
    model.train()
    return total / count


@torch.no_grad()
def greedy(model: Anchor, src: Tensor, eos: int, max_new: int) -> list[list[int]]:
    memory, memory_pad = model.encode(src)
    out = torch.full((len(src), 1), model.pad)
    done = torch.zeros(len(src), dtype=torch.bool)
    for _ in range(max_new):
        logits = model.decode(memory, memory_pad, out)[:, -1]
        logits[:, model.pad] = -math.inf  # the start token is never generated
        next_ids = logits.argmax(-1)
        next_ids = torch.where(done, torch.full_like(next_ids, model.pad), next_ids)
        out = torch.cat([out, next_ids[:, None]], dim=1)
        done |= next_ids == eos
        if done.all():
            break
    return [[t for t in row[1:].tolist() if t not in (model.pad, eos)] for row in _cut_at(out, eos)]


def _cut_at(out: Tensor, eos: int) -> list[Tensor]:
    rows = []
    for row in out:
        hits = (row[1:] == eos).nonzero()
        rows.append(row[: int(hits[0]) + 1] if len(hits) else row)
    return rows


@torch.no_grad()
def beam(model: Anchor, src: Tensor, eos: int, max_new: int, num_beams: int, length_penalty: float) -> list[int]:
    """Beam search of one source row [1, S]: hypotheses ranked by log-probability / length**penalty
    (the GNMT-style normalisation Hugging Face uses), finished when every live beam scores below the
    best finished one can."""
    memory, memory_pad = model.encode(src)
    memory, memory_pad = memory.expand(num_beams, -1, -1), memory_pad.expand(num_beams, -1)
    seqs = torch.full((1, 1), model.pad)
    scores = torch.zeros(1)
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new):
        n = len(seqs)
        logits = model.decode(memory[:n], memory_pad[:n], seqs)[:, -1]
        logits[:, model.pad] = -math.inf
        logp = logits.log_softmax(-1)
        total = (scores[:, None] + logp).view(-1)
        top = total.topk(2 * num_beams)
        keep_seqs, keep_scores = [], []
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            row, token = divmod(index, logp.shape[1])
            if token == eos:
                finished.append((value / (step + 1) ** length_penalty, seqs[row, 1:].tolist()))
            else:
                keep_seqs.append(torch.cat([seqs[row], torch.tensor([token])]))
                keep_scores.append(value)
            if len(keep_seqs) == num_beams:
                break
        best_done = max((s for s, _ in finished), default=-math.inf)
        if len(finished) >= num_beams and max(keep_scores) / (step + 1) ** length_penalty < best_done:
            break
        seqs, scores = torch.stack(keep_seqs), torch.tensor(keep_scores)
    if not finished:
        finished = [(float(scores[0]), seqs[0, 1:].tolist())]
    return max(finished, key=lambda item: item[0])[1]


def translate(model, tok, sources, eos, num_beams: int, length_penalty: float, batch_size: int = 64) -> list[str]:
    model.eval()
    out = []
    for start in range(0, len(sources), batch_size):
        rows = sources[start : start + batch_size]
        max_new = max(len(r) for r in rows) + 50
        if num_beams == 1:
            ids = greedy(model, pad_rows(rows, model.pad), eos, max_new)
        else:
            ids = [beam(model, pad_rows([r], model.pad), eos, max_new, num_beams, length_penalty) for r in rows]
        out += [tok.decode(row, skip_special_tokens=True).strip() for row in ids]
    model.train()
    return out


def read_pairs(paths: list[str], limit: int | None) -> tuple[list[str], list[str]]:
    from switchformer.data.files import read_file_lines

    if len(paths) != 2:
        raise SystemExit("--data/--valid: give the source file and the target file (train.de.gz train.en.gz)")
    source, target = (read_file_lines(Path(p)) for p in paths)
    if len(source) != len(target):
        raise SystemExit(f"{paths[0]} has {len(source)} lines and {paths[1]} {len(target)}: not line-aligned")
    return source[:limit], target[:limit]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs=2, required=True, metavar=("SOURCE", "TARGET"))
    parser.add_argument("--valid", nargs=2, required=True, metavar=("SOURCE", "TARGET"))
    parser.add_argument("--tokenizer", help="a tokenizer.json (a run's, so losses compare); else trained here")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=400)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--max-len", type=int, default=64, help="tokens a side (with EOS), as seq_len")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--limit-pairs", type=int, default=None, help="train on the first N pairs (a smoke test)")
    parser.add_argument("--limit-valid", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    from switchformer.analysis.metrics import corpus_scores
    from switchformer.data.tokenizer import EOS, PAD, load_tokenizer, train_tokenizer

    torch.manual_seed(args.seed)
    train_src, train_tgt = read_pairs(args.data, args.limit_pairs)
    valid_src, valid_tgt = read_pairs(args.valid, args.limit_valid)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer(train_src + train_tgt, args.vocab_size)
    pad, eos = tok.token_to_id(PAD), tok.token_to_id(EOS)

    def encode(texts):
        return [e.ids[: args.max_len - 1] + [eos] for e in tok.encode_batch(texts)]

    sources, targets = encode(train_src), encode(train_tgt)
    v_sources, v_targets = encode(valid_src), encode(valid_tgt)
    model = Anchor(tok.get_vocab_size(), pad, dropout=args.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    loss_fn = nn.CrossEntropyLoss(ignore_index=pad, label_smoothing=args.label_smoothing)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"anchor: {params / 1e6:.2f}M parameters, {len(sources)} training pairs, {torch.get_num_threads()} threads",
        flush=True,
    )

    generator = torch.Generator().manual_seed(args.seed)
    curve, step, epoch = [], 0, 0
    budget = args.minutes * 60
    start = time.perf_counter()
    stop = False
    while not stop:
        for index in batches(sources, targets, args.batch_size, generator):
            src = pad_rows([sources[i] for i in index], pad)
            tgt = pad_rows([targets[i] for i in index], pad)
            tgt_in = torch.cat([torch.full((len(tgt), 1), pad), tgt[:, :-1]], dim=1)
            logits = model(src, tgt_in)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            elapsed = time.perf_counter() - start
            if step % args.eval_every == 0:
                v = validation_loss(model, v_sources, v_targets, pad)
                curve.append({"step": step, "seconds": round(elapsed, 1), "valid_loss": round(v, 4)})
                print(
                    f"step {step} epoch {epoch} {elapsed:.0f}s train loss {float(loss):.3f} valid loss {v:.4f}",
                    flush=True,
                )
            if elapsed > budget or (args.max_steps and step >= args.max_steps):
                stop = True
                break
        epoch += 1
    seconds = time.perf_counter() - start
    result = {
        "parameters": params,
        "steps": step,
        "epochs": round(step * args.batch_size / len(sources), 2),
        "training_seconds": round(seconds, 1),
        "valid_loss": round(validation_loss(model, v_sources, v_targets, pad), 4),
        "curve": curve,
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "valid", "out")},
    }
    for beams in sorted({1, args.num_beams}):
        hypotheses = translate(model, tok, v_sources, eos, beams, args.length_penalty)
        scores = corpus_scores(hypotheses, valid_tgt)
        result[f"beams_{beams}"] = {name: round(s["score"], 2) for name, s in scores.items()}
        result.setdefault("signature", scores["bleu"]["signature"])
        print(f"{beams} beam(s): {scores['bleu']['text']}; chrF {scores['chrf']['score']:.2f}")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
