"""Named starting points of a training run (``--preset``): each a dict of :class:`TrainConfig` fields,
applied before a config file, ``--set`` and the flags."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # the main job: a few minutes on a 2-core CPU
    "tiny": dict(
        d_model=192,
        num_layers=4,
        num_heads=4,
        d_ff=512,
        num_experts=8,
        seq_len=128,
        batch_size=16,
        max_steps=1000,
        warmup_steps=50,
        lr=3e-3,
        eval_every=200,
        checkpoint_every=200,
        vocab_size=4096,
    ),
    # seconds: tests and smoke checks
    "test": dict(
        d_model=32,
        num_layers=2,
        num_heads=2,
        d_ff=64,
        num_experts=4,
        seq_len=32,
        batch_size=4,
        max_steps=12,
        warmup_steps=2,
        eval_every=6,
        eval_batches=2,
        checkpoint_every=4,
        log_every=1,
        vocab_size=400,
        sample_tokens=8,
        lr=3e-3,
    ),
    # the sparse-vs-dense comparison of `switchformer compare`
    "compare": dict(
        d_model=192,
        num_layers=4,
        num_heads=4,
        d_ff=512,
        num_experts=16,
        sparse_step=2,
        seq_len=128,
        batch_size=32,
        max_steps=800,
        warmup_steps=80,
        lr=3e-3,
        eval_every=50,
        eval_batches=20,
        checkpoint_every=400,
        vocab_size=4096,
        corpus="docs",
    ),
}
# Where the paper's effect shows on a laptop: the compare pair made small and trained long on the
# larger corpus (6000 steps of 4096 tokens: about 6 passes over the 4.2M training tokens of
# docs+source), with 64 experts, dropless routing and the paper's inverse-square-root decay; docs/results/paper.md.
PRESETS["compare-long"] = {
    **PRESETS["compare"],
    "d_model": 96,
    "d_ff": 256,
    # 64 experts in every other layer (compare's sparse_step 2, as Switch-Base); 16 experts in every
    # layer reached the dense loss later (1.30x and 1.32x fewer steps against 1.34x and 1.58x; docs/results/paper.md)
    "num_experts": 64,
    # Dropless in training and evaluation: each token still gets exactly one expert (same FLOPs per
    # token), but none is dropped. With 64 uneven experts, training at capacity 1.25 cost 0.03-0.05
    # validation loss at every step, and evaluating at 2.0 dropped 3-9% of a Switch layer's tokens
    # (11-22% for a model trained dropless); seed 0 reached the dense loss in 1.76x fewer steps
    # instead of 1.34x (docs/results/paper.md).
    "capacity_factor": None,
    "eval_capacity_factor": None,
    "max_steps": 6000,
    "schedule": "inverse_sqrt",
    "eval_every": 200,
    "checkpoint_every": 2000,
    "vocab_size": 2048,
    "corpus": "docs+source",
}

# The paper's comparison at a size a CPU cannot train (one H200, minutes per model): the
# compare-long recipe (64 experts every other layer, dropless, inverse-square-root decay) at
# d_model 512 and 8 layers, 32k tokens a step, on the standard library and the installed packages'
# source, which on a machine with PyTorch/JAX/transformers holds more tokens than a run reads.
PRESETS["compare-gpu"] = {
    **PRESETS["compare-long"],
    "d_model": 512,
    "num_layers": 8,
    "num_heads": 8,
    "d_ff": 2048,
    "seq_len": 512,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_steps": 200,
    "max_steps": 1500,
    "eval_every": 100,
    "eval_batches": 16,
    "checkpoint_every": 100000,
    "vocab_size": 8192,
    "corpus": "docs+packages",
    "corpus_max_mb": 256.0,
    "validation_fraction": 0.02,
}

# Translation from scratch on tens of thousands of sentence pairs in at most 30 minutes of a 2-core
# CPU (Multi30k de->en: docs/translation.md). A T5 of d_model 256, 3+3 layers, 8
# experts in every other layer, routed dropless (small batches route unevenly, and a dropped token
# is a lost word), label smoothing 0.1, dropout 0.1, AdamW at 7e-4 (2e-3 stalled with growing
# router logits) and 100x that for the embedding tables, with warmup and cosine decay; one shared 8k
# BPE vocabulary; decoded with 4 beams and no repeated 3-gram (greedy output loops: "green green
# ..."; beam search less so), length penalty 1.5 (blocking the loops shortens the output). seq_len
# 64 cuts no Multi30k sentence (the longest is 57 tokens), and costs nothing: a batch is padded
# only to its own longest row.
PRESETS["mt-small"] = {
    "model": "t5",
    "objective": "seq2seq",
    "d_model": 256,
    "num_layers": 3,
    "num_heads": 4,
    "d_ff": 512,
    "num_experts": 8,
    "sparse_step": 2,
    "capacity_factor": None,
    "eval_capacity_factor": None,
    "dropout": 0.1,
    "expert_dropout": 0.1,
    "label_smoothing": 0.1,
    "tokenizer_kind": "bpe",
    "vocab_size": 8000,
    # a separate output layer (as T5 v1.1 and Google's Switch checkpoints): T5's tied one scales its
    # input by d_model ** -0.5 and shares the embeddings' large init, so under AdamW the output
    # logits move about ten times slower; at step 600 the tuning loss was 3.25 against 4.46 tied
    # (benchmarks/mt_probe.py, docs/translation.md)
    "tie_embeddings": False,
    "seq_len": 64,
    "batch_size": 64,
    "optimizer": "adamw",
    "lr": 7e-4,
    # the embedding tables at 100x the rate: under Adam each element moves by about lr a step, and the
    # embeddings start at std 0.32 while the position biases must grow to several units to order words;
    # at the base rate both barely moved (tuning loss at step 800: 3.01; 10x: 2.42; 30x: 2.24;
    # 100x at step 1000: 2.12; docs/translation.md)
    "embedding_lr_scale": 100.0,
    "beta2": 0.98,
    "weight_decay": 0.01,
    "schedule": "cosine",
    "warmup_steps": 300,
    # the paper's reduced initialisation (init_scale 0.1) is kept: T5's own (1.0) led by step 250
    # (validation loss 5.72 against 6.53) but not from step 400 on, and 2000 steps of it ended at
    # 4.0 where these 1500 ended at 3.79 (docs/translation.md)
    # batches of similar length: a step 0.41 s instead of 0.62 (benchmarks/bucketing.py); dropout 0.1
    # everywhere: with the embeddings learning, the model without it overfitted from step 3,000 (tuning
    # loss 1.84 against 1.73 at the end, tuning BLEU 39.10 against 40.62; docs/translation.md)
    "bucket_by_length": True,
    # 3,600 steps: 0.48 s a step and about 4 s an evaluation on the 2-core CPU of the current figures,
    # about 29 minutes in all; validation BLEU 41.22 (evaluations draw no random numbers: their
    # number changes nothing else)
    "max_steps": 3600,
    "eval_every": 500,
    "eval_batches": 16,
    "checkpoint_every": 500,
    "log_every": 20,
    "num_beams": 4,
    "length_penalty": 1.5,
    "no_repeat_ngram_size": 3,
    "validation_fraction": 0.02,
}
