"""The training configuration: one flat dataclass of every setting, each checked (types first, then
ranges and choices), and the model config it describes. Presets: :mod:`presets`; where settings
come from: :mod:`sources`."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from switchformer.data.corpus import CORPORA
from switchformer.data.formatting import is_language_code, prefix_fields
from switchformer.models import SwitchLMConfig, SwitchT5Config
from switchformer.models.layers import CONFIG_BOUNDS
from switchformer.moe.bounds import AT_LEAST_ONE, AT_LEAST_ZERO, FRACTION, OPEN_FRACTION, POSITIVE, Bound, check_bounds
from switchformer.moe.layer import LAYER_BOUNDS
from switchformer.train.model_settings import MODEL_SETTINGS, model_values, train_values

OBJECTIVES = ("causal", "chat", "span_corruption", "seq2seq")
CHOICES = {
    "model": ("lm", "t5"),
    "optimizer": ("adamw", "adafactor"),
    "schedule": ("cosine", "inverse_sqrt", "constant"),
    "precision": ("auto", "fp32", "bf16"),
    "tokenizer_kind": ("bpe", "unigram"),
    "corpus": CORPORA,
}


@dataclass
class TrainConfig:
    # model
    model: str = "lm"  # "lm" (SwitchLM) or "t5" (SwitchT5)
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 512
    activation: str | None = None  # default: swiglu for lm, relu for t5
    num_experts: int = 8
    sparse_step: int = 2  # 0: the dense baseline
    top_k: int = 1
    normalize_gates: bool = False  # top-k > 1: gates renormalised over the chosen experts
    routing: str = "token_choice"
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    group_size: int | None = None  # routing group in tokens (lm); None: each rank's whole batch
    router_jitter_noise: float = 0.0
    expert_dropout: float = 0.0
    dropout: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    init_scale: float = 0.1
    tie_embeddings: bool = True  # one matrix for the input embeddings and the output layer
    # data
    data: list[str] = field(default_factory=list)  # files or folders; empty: the embedded corpus
    corpus: str = "docs"  # embedded corpus: "docs", "docs+source" or "docs+packages"
    corpus_max_mb: float | None = None  # docs+packages: at most this many MB of package source
    # "causal" (lm), "chat" (lm on conversations), "span_corruption" (t5), "seq2seq" (t5 on pairs)
    objective: str | None = None
    tokenizer: str | None = None  # an existing tokenizer.json; else one is trained and saved with the run
    init_from: str | None = None  # start from these weights (HF directory, run, checkpoint); architecture too
    tokenizer_kind: str = "bpe"
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    validation_fraction: float = 0.1
    valid_data: list[str] = field(default_factory=list)  # a user's validation files; empty: carved from data
    # translation (seq2seq): languages of line-aligned files, and the encoder's task prefix, a
    # template that may name {source_lang}, {target_lang}, {source_language}, {target_language}
    source_lang: str | None = None
    target_lang: str | None = None
    source_prefix: str = ""
    # decoding defaults of translate, generate and eval --metric on a seq2seq run
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this many tokens twice (generate: any run)
    # optimisation
    optimizer: str = "adamw"  # or "adafactor"
    lr: float = 3e-3
    embedding_lr_scale: float = 1.0  # the embedding tables' learning rate, as a multiple of lr
    weight_decay: float = 0.01
    beta2: float = 0.95
    schedule: str = "cosine"  # "cosine", "inverse_sqrt" or "constant" (after warmup)
    warmup_steps: int = 50
    max_steps: int = 600
    grad_accum: int = 1
    grad_clip: float = 1.0
    label_smoothing: float = 0.0  # training cross-entropy only; eval scores the plain cross-entropy
    bucket_by_length: bool = False  # batches of rows of similar length (less padding; seq2seq, chat)
    precision: str = "auto"  # "auto" (bf16 autocast on GPUs that support it), "fp32", "bf16"
    seed: int = 0
    # scale (under torchrun): experts split over this many ranks; batch_size is per rank
    expert_parallel: int = 1
    fsdp: bool = True  # shard weights, gradients and optimizer state (FSDP2); false: replicate them
    dist_timeout_s: float = 300.0
    # bookkeeping
    out_dir: str = "runs"
    run_name: str | None = None
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 200
    keep_last: int = 2
    max_bad_steps: int = 5
    tensorboard: bool = False
    sample_prompt: str = "The "
    sample_tokens: int = 48

    def __post_init__(self):
        for name in ("data", "valid_data"):  # one path given as a string, not a list: a list of it
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        self.validate()

    def validate(self) -> None:
        """Types first (each field's annotation; a float must be finite, a bool is no number), then
        ranges and choices. Raises ``ValueError`` starting with the field's name."""
        for name, hint in _FIELD_TYPES.items():
            _check_type(name, getattr(self, name), hint)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: unknown {getattr(self, name)!r}; choose one of {allowed}")
        if self.objective not in (None, *OBJECTIVES):
            raise ValueError(f"objective: unknown {self.objective!r}")
        if self.model == "lm" and self.objective not in (None, "causal", "chat"):
            raise ValueError(f"objective: the lm model trains with 'causal' or 'chat', not {self.objective!r}")
        if self.model == "t5" and self.objective in ("causal", "chat"):
            raise ValueError(
                f"objective: {self.objective!r} trains the decoder-only lm model (--model lm); the t5 model trains "
                "with 'span_corruption' or 'seq2seq'"
            )
        check_bounds(self.to_dict(), TRAIN_BOUNDS)
        for name in ("data", "valid_data"):
            if any(not path for path in getattr(self, name)):
                raise ValueError(f"{name}: an empty path in {getattr(self, name)}")
        for name in ("source_lang", "target_lang"):  # source_lang: one code or several, "de,fr,cs"
            code = getattr(self, name)
            if code is None:
                continue
            if name == "target_lang" and "," in code:
                raise ValueError(f"target_lang: one language code, got {code!r} (one run per target language)")
            codes = code.split(",")
            for one in codes:
                if not is_language_code(one):
                    raise ValueError(
                        f"{name}: {one!r} is not a language code (letters, digits, '-' or '_'"
                        f"{'; several source languages: de,fr,cs' if name == 'source_lang' else ''})"
                    )
            if len(set(codes)) < len(codes):
                raise ValueError(f"source_lang: {code!r} names a language twice")
            if name == "source_lang" and self.target_lang in codes:
                raise ValueError(f"source_lang: {self.target_lang!r} is both a source and the target language")
        prefix_fields(self.source_prefix)
        for name in ("source_lang", "target_lang"):
            if getattr(self, name) is not None and self.resolved_objective != "seq2seq":
                raise ValueError(
                    f"{name}: languages are read only by the seq2seq objective (objective is "
                    f"{self.resolved_objective!r})"
                )
        if self.source_prefix and self.resolved_objective != "seq2seq":
            raise ValueError(
                f"source_prefix: only the seq2seq objective reads it (objective is {self.resolved_objective!r})"
            )
        if self.run_name is not None and (
            self.run_name in ("", ".", "..") or any(sep in self.run_name for sep in ("/", "\\"))
        ):
            raise ValueError(f"run_name: {self.run_name!r} must be a folder name (no path separators, not . or ..)")
        self.model_config()  # the model's own checks, with the field names they share

    @property
    def resolved_objective(self) -> str:
        return self.objective or ("causal" if self.model == "lm" else "span_corruption")

    def model_config(self, vocab_size: int | None = None):
        """The model config these settings describe (:mod:`switchformer.train.model_settings` maps each
        setting to its field); ``vocab_size``: the tokenizer's, when it differs from the asked one."""
        values = dict(model_values(self, self.model), vocab_size=vocab_size or self.vocab_size, pad_token_id=0,
                      eos_token_id=1)  # fmt: skip
        if self.model == "lm":
            return SwitchLMConfig(**values, max_seq_len=max(self.seq_len, 64) * 2)
        if self.routing != "token_choice":
            raise ValueError("routing: the t5 trainer path supports token_choice routing")
        return SwitchT5Config(**values, d_kv=self.d_model // self.num_heads, decoder_start_token_id=0)

    def run_section(self) -> dict:
        """The train section of a run's config.json: every setting but those the model section holds
        (the architecture is stored once; :func:`with_model_settings` puts them back on reading)."""
        mapped = {setting.train for setting in MODEL_SETTINGS}
        return {name: value for name, value in self.to_dict().items() if name not in mapped}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(name: str, value, hint) -> None:
    """``value`` fits the annotation ``hint`` (``int``, ``float``, ``str``, ``bool``, ``list[str]``,
    optionally ``| None``); ints are accepted for floats, nothing else is converted."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}: expected a list of strings (or one string), got {value!r}")
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                pass
            else:  # YAML 1.1 reads 1e-3 (no dot) as a string
                raise ValueError(
                    f"{name}: expected a number, got the string {value!r} (in YAML write 1.0e-3, not 1e-3)"
                )
        if ok and not math.isfinite(value):
            raise ValueError(f"{name}: must be a finite number, got {value!r}")
    else:
        ok = isinstance(value, hint)
    if not ok:
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))
        raise ValueError(f"{name}: expected {kind}, got {value!r} ({type(value).__name__})")


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


# Every numeric setting's bound. A setting the model or the layer also takes has their bound (written
# once, there); the training settings have their own.
TRAIN_BOUNDS: dict[str, Bound] = {
    **{name: CONFIG_BOUNDS[name] for name in ("d_model", "num_heads", "d_ff", "vocab_size")},
    "dropout": CONFIG_BOUNDS["dropout_rate"],
    "sparse_step": CONFIG_BOUNDS["sparse_step"],
    **{name: LAYER_BOUNDS[name] for name in ("capacity_factor", "eval_capacity_factor", "group_size",
                                             "expert_dropout", "init_scale")},  # fmt: skip
    "router_jitter_noise": LAYER_BOUNDS["jitter_eps"],
    "num_experts": AT_LEAST_ZERO,  # 0: the dense baseline
    **dict.fromkeys(("seq_len", "batch_size", "max_steps", "grad_accum", "log_every", "eval_every", "eval_batches",
                     "checkpoint_every", "keep_last", "max_bad_steps", "num_beams", "expert_parallel"),
                    AT_LEAST_ONE),  # fmt: skip
    **dict.fromkeys(("lr", "embedding_lr_scale", "grad_clip", "dist_timeout_s"), POSITIVE),
    **dict.fromkeys(("warmup_steps", "weight_decay", "aux_loss_coef", "z_loss_coef", "sample_tokens", "seed",
                     "no_repeat_ngram_size"), AT_LEAST_ZERO),  # fmt: skip
    "label_smoothing": FRACTION,
    **dict.fromkeys(("validation_fraction", "beta2"), OPEN_FRACTION),
    "corpus_max_mb": Bound(low=0, low_open=True, optional=True),
}


def with_model_settings(train: dict, model: dict) -> dict:
    """A run's train section completed with the settings its model section holds (the one truth for
    the architecture; an older run that stored them in both is read the same way)."""
    family = train.get("model", "lm")
    return {**train, **train_values(model, family)}


# One line of meaning per field: the configuration reference of the docs is generated from these, the
# types, the defaults, TRAIN_BOUNDS and CHOICES (a test holds every field to having a line).
FIELD_HELP = {
    "model": "model family: `lm` (decoder-only SwitchLM) or `t5` (encoder-decoder SwitchT5)",
    "d_model": "width of the residual stream",
    "num_layers": "blocks (per stack, for t5)",
    "num_heads": "attention heads; d_model / num_heads is the head size",
    "d_ff": "hidden width of each feed-forward network (each expert's, in a Switch layer)",
    "activation": "feed-forward activation; none: swiglu for lm, relu for t5",
    "num_experts": "experts per Switch layer",
    "sparse_step": "a Switch layer every sparse_step layers; 0: the dense baseline",
    "top_k": "experts each token is sent to (1: Switch routing)",
    "normalize_gates": "with top_k > 1: gates renormalised over the chosen experts",
    "routing": "`token_choice`, `expert_choice` or `aux_loss_free` (lm only for the last two)",
    "capacity_factor": "training capacity: tokens per expert = ceil(tokens / experts x factor); none: dropless",
    "eval_capacity_factor": "the same at evaluation and inference; none: dropless",
    "group_size": "routing group in tokens (lm); none: each rank's whole batch",
    "router_jitter_noise": "multiplicative noise U(1-eps, 1+eps) on the router input in training",
    "expert_dropout": "dropout inside the experts (the paper fine-tunes with 0.4)",
    "dropout": "dropout everywhere else",
    "aux_loss_coef": "weight of the load-balancing loss (Switch: 0.01)",
    "z_loss_coef": "weight of the router z-loss (ST-MoE: 0.001)",
    "init_scale": "truncated-normal init with std sqrt(init_scale / fan_in) (the paper's 0.1)",
    "tie_embeddings": "one matrix for the input embeddings and the output layer (false: a separate output layer, "
    "as T5 v1.1 and Google's Switch checkpoints)",
    "data": "training files or folders (text, JSONL, TSV, line-aligned pairs, datasets); empty: the embedded corpus",
    "corpus": "embedded corpus: `docs`, `docs+source` or `docs+packages`",
    "corpus_max_mb": "with docs+packages: at most this many MB of package source",
    "objective": "`causal`, `chat` (lm), `span_corruption`, `seq2seq` (t5); none: causal or span corruption",
    "tokenizer": "an existing tokenizer.json; none: one is trained on the data and saved with the run",
    "init_from": "start from these weights (a Hugging Face directory, a run or a checkpoint): architecture too",
    "tokenizer_kind": "a trained tokenizer's kind: byte-level `bpe` or `unigram`",
    "vocab_size": "size of a trained tokenizer (the model takes the tokenizer's)",
    "seq_len": "tokens per training row (each side, for seq2seq)",
    "batch_size": "rows per micro-batch on each process",
    "validation_fraction": "share of the data held out for validation when valid_data is empty",
    "valid_data": "validation files in data's formats; empty: carved from data",
    "source_lang": "seq2seq: the source language(s) of line-aligned files, one code or several (de,fr,cs)",
    "target_lang": "seq2seq: the target language",
    "source_prefix": "seq2seq: the encoder's task prefix, a template of {source_lang}, {target_language}, ...",
    "num_beams": "decoding default of translate, generate and eval --metric (1: greedy)",
    "length_penalty": "beam search length penalty (score / length ** length_penalty)",
    "no_repeat_ngram_size": "no n-gram of this many tokens twice in an output; 0: off",
    "optimizer": "`adamw` or `adafactor`",
    "lr": "peak learning rate",
    "embedding_lr_scale": "learning rate of the embedding tables (token embeddings, T5's relative-position biases) "
    "as a multiple of lr; AdamW's decoupled decay scales with it, and a tied output layer is the embedding table",
    "weight_decay": "decoupled weight decay (AdamW)",
    "beta2": "second-moment decay of AdamW",
    "schedule": "after the warmup: `cosine`, `inverse_sqrt` or `constant`",
    "warmup_steps": "linear warmup steps",
    "max_steps": "optimizer steps to train for",
    "grad_accum": "micro-batches per optimizer step",
    "grad_clip": "gradient norm clipped to this (over every shard)",
    "label_smoothing": "of the training cross-entropy only; evaluation scores the plain one",
    "bucket_by_length": "batches of rows of similar length (less padding; seq2seq and chat)",
    "precision": "`auto` (bf16 autocast on GPUs that support it), `fp32` or `bf16`",
    "seed": "initialisation, data order, dropout and jitter",
    "expert_parallel": "under torchrun: each layer's experts split over this many ranks",
    "fsdp": "under torchrun: shard weights, gradients and optimizer state (FSDP2); false: replicate them",
    "dist_timeout_s": "seconds a process waits for the others before it ends with a message",
    "out_dir": "parent folder of runs",
    "run_name": "the run's folder name; none: the family and the time",
    "log_every": "steps between metrics records",
    "eval_every": "steps between evaluations",
    "eval_batches": "evaluation batches (global batches) per evaluation",
    "checkpoint_every": "steps between checkpoints",
    "keep_last": "checkpoints kept",
    "max_bad_steps": "non-finite steps in a row that end the run",
    "tensorboard": "also write TensorBoard events (needs tensorboard)",
    "sample_prompt": "prompt of the sample printed at the end of training",
    "sample_tokens": "tokens of that sample; 0: none",
}


def reference_rows() -> list[dict]:
    """Every TrainConfig field with its type, default, bound (or choices) and meaning: the
    configuration reference of the docs (``docs/hooks/config_reference.py`` renders it)."""
    rows = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        bound = TRAIN_BOUNDS[f.name].describe() if f.name in TRAIN_BOUNDS else ""
        if f.name in CHOICES:
            bound = "one of " + ", ".join(f"`{c}`" for c in CHOICES[f.name])
        if f.name == "objective":
            bound = "one of " + ", ".join(f"`{c}`" for c in OBJECTIVES) + " (or none)"
        hint = _FIELD_TYPES[f.name]
        hint = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        rows.append({"name": f.name, "type": hint, "default": json.dumps(default), "bound": bound,
                     "meaning": FIELD_HELP[f.name]})  # fmt: skip
    return rows
