"""Training configuration: one flat dataclass, presets, TOML/YAML files and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from switchformer.data.corpus import CORPORA
from switchformer.data.formatting import is_language_code, prefix_fields
from switchformer.models import SwitchLMConfig, SwitchT5Config


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
        choices = {
            "model": ("lm", "t5"),
            "optimizer": ("adamw", "adafactor"),
            "schedule": ("cosine", "inverse_sqrt", "constant"),
            "precision": ("auto", "fp32", "bf16"),
            "tokenizer_kind": ("bpe", "unigram"),
            "corpus": CORPORA,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: unknown {getattr(self, name)!r}; choose one of {allowed}")
        if self.objective not in (None, "causal", "chat", "span_corruption", "seq2seq"):
            raise ValueError(f"objective: unknown {self.objective!r}")
        if self.model == "lm" and self.objective not in (None, "causal", "chat"):
            raise ValueError(f"objective: the lm model trains with 'causal' or 'chat', not {self.objective!r}")
        if self.model == "t5" and self.objective in ("causal", "chat"):
            raise ValueError(
                f"objective: {self.objective!r} trains the decoder-only lm model (--model lm); the t5 model trains "
                "with 'span_corruption' or 'seq2seq'"
            )
        positive = (
            "d_model",
            "num_heads",
            "d_ff",
            "vocab_size",
            "seq_len",
            "batch_size",
            "max_steps",
            "grad_accum",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_last",
            "max_bad_steps",
            "num_beams",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "grad_clip", "init_scale", "dist_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "sparse_step", "num_experts", "weight_decay", "aux_loss_coef", "z_loss_coef",
                     "router_jitter_noise", "sample_tokens", "seed", "no_repeat_ngram_size"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "expert_dropout", "router_jitter_noise", "label_smoothing"):
            if not getattr(self, name) < 1:
                raise ValueError(f"{name}: must be < 1, got {getattr(self, name)}")
        for name in ("validation_fraction", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in (0, 1), got {getattr(self, name)}")
        for name in ("capacity_factor", "eval_capacity_factor", "corpus_max_mb", "group_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0 (or none), got {value}")
        if self.expert_parallel < 1:
            raise ValueError(f"expert_parallel: must be >= 1, got {self.expert_parallel}")
        for name in ("data", "valid_data"):
            if any(not path for path in getattr(self, name)):
                raise ValueError(f"{name}: an empty path in {getattr(self, name)}")
        if self.label_smoothing < 0:
            raise ValueError(f"label_smoothing: must be >= 0, got {self.label_smoothing}")
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
        vocab = vocab_size or self.vocab_size
        common = dict(
            vocab_size=vocab,
            d_model=self.d_model,
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            num_experts=self.num_experts,
            top_k=self.top_k,
            normalize_gates=self.normalize_gates,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            router_jitter_noise=self.router_jitter_noise,
            router_aux_loss_coef=self.aux_loss_coef,
            router_z_loss_coef=self.z_loss_coef,
            init_scale=self.init_scale,
            dropout_rate=self.dropout,
            pad_token_id=0,
            eos_token_id=1,
        )
        if self.model == "lm":
            return SwitchLMConfig(
                **common,
                num_layers=self.num_layers,
                activation=self.activation or "swiglu",
                sparse_step=self.sparse_step,
                routing=self.routing,
                expert_dropout=self.expert_dropout,
                group_size=self.group_size,
                max_seq_len=max(self.seq_len, 64) * 2,
            )
        if self.routing != "token_choice":
            raise ValueError("routing: the t5 trainer path supports token_choice routing")
        return SwitchT5Config(
            **common,
            d_kv=self.d_model // self.num_heads,
            num_layers=self.num_layers,
            activation=self.activation or "relu",
            encoder_sparse_step=self.sparse_step,
            decoder_sparse_step=self.sparse_step,
            expert_dropout=self.expert_dropout,
            decoder_start_token_id=0,
        )

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
# docs+source), with 64 experts, dropless routing and the paper's inverse-square-root decay; README.
PRESETS["compare-long"] = {
    **PRESETS["compare"],
    "d_model": 96,
    "d_ff": 256,
    # 64 experts in every other layer (compare's sparse_step 2, as Switch-Base); 16 experts in every
    # layer reached the dense loss later (1.30x and 1.32x fewer steps against 1.34x and 1.58x; README)
    "num_experts": 64,
    # Dropless in training and evaluation: each token still gets exactly one expert (same FLOPs per
    # token), but none is dropped. With 64 uneven experts, training at capacity 1.25 cost 0.03-0.05
    # validation loss at every step, and evaluating at 2.0 dropped 3-9% of a Switch layer's tokens
    # (11-22% for a model trained dropless); seed 0 reached the dense loss in 1.76x fewer steps
    # instead of 1.34x (README).
    "capacity_factor": None,
    "eval_capacity_factor": None,
    "max_steps": 6000,
    "schedule": "inverse_sqrt",
    "eval_every": 200,
    "checkpoint_every": 2000,
    "vocab_size": 2048,
    "corpus": "docs+source",
}

# The paper's comparison at a size a CPU cannot train (issue 19; one H200, minutes per model): the
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
# CPU (issue 15; Multi30k de->en: README, "Translation"). A T5 of d_model 256, 3+3 layers, 8
# experts in every other layer, routed dropless (small batches route unevenly, and a dropped token
# is a lost word), label smoothing 0.1, dropout only inside the experts (0.1: the model underfits
# in 30 minutes; no dropout elsewhere was 0.12 lower in validation loss after 1,000 steps), AdamW
# at 7e-4 (2e-3 stalled with growing router logits) with warmup and cosine decay; one shared 8k
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
    "dropout": 0.0,
    "expert_dropout": 0.1,
    "label_smoothing": 0.1,
    "tokenizer_kind": "bpe",
    "vocab_size": 8000,
    "seq_len": 64,
    "batch_size": 64,
    "optimizer": "adamw",
    "lr": 7e-4,
    "beta2": 0.98,
    "weight_decay": 0.01,
    "schedule": "cosine",
    "warmup_steps": 300,
    # the paper's reduced initialisation (init_scale 0.1) is kept: T5's own (1.0) led by step 250
    # (validation loss 5.72 against 6.53) but not from step 400 on, and 2000 steps of it ended at
    # 4.0 where these 1500 ended at 3.79 (README, "Translation")
    # batches of similar length: 0.41 s a step instead of 0.62, so 3800 steps (8.4 epochs) fit
    # the 30 minutes: validation loss 3.19 and BLEU 18.7 where 1500 plain steps gave 3.76 and 15.1;
    # without dropout outside the experts a step is cheaper still, and 4000 fit: validation loss
    # 2.97 and BLEU 23.4 (4 beams, no repeated 3-gram) in 25.5 minutes
    "bucket_by_length": True,
    "max_steps": 4000,
    "eval_every": 250,
    "eval_batches": 16,
    "checkpoint_every": 500,
    "log_every": 20,
    "num_beams": 4,
    "length_penalty": 1.5,
    "no_repeat_ngram_size": 3,
    "validation_fraction": 0.02,
}


def parse_setting(name: str, text: str):
    """Parse a ``--set key=value`` value with the type of the config field. Spaces around a
    number, a flag, ``none`` or list items are ignored; a string is kept exactly as given."""
    hints = {f.name: str(f.type) for f in fields(TrainConfig)}
    if name not in hints:
        close = difflib.get_close_matches(name, hints, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; the README's settings table lists them"
        raise ValueError(f"{name}: no such config field{hint}")
    base = hints[name].replace("| None", "").strip()
    raw, text = text, text.strip()
    if "None" in hints[name] and text.lower() in ("none", "null"):
        return None
    if base.startswith("list"):
        return [part.strip() for part in text.split(",") if part.strip()]
    if base == "bool":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if base in ("int", "float"):
        try:
            return int(text) if base == "int" else float(text)
        except ValueError:
            raise ValueError(f"{name}: expected {base}, got {text!r}") from None
    return raw


def read_config_file(path: str | Path) -> dict:
    """The settings of a ``.toml``, ``.yaml`` or ``.json`` file. Every error is one line naming the
    file (and the line, for a syntax error)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: config file not found")
    from switchformer.data.files import decode_text

    text = decode_text(path.read_bytes(), path)  # as every text file is read: a leading BOM is no setting
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML ({err})") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML configs need `pip install pyyaml`") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    else:
        raise ValueError(f"{path}: config files are .toml, .yaml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    return data


# Where a command-line override comes from, for error messages.
FLAG_NAMES = {
    "model": "--model",
    "data": "--data",
    "max_steps": "--max-steps",
    "out_dir": "--out-dir",
    "run_name": "--run-name",
    "expert_parallel": "--expert-parallel",
    "init_from": "--init-from",
    "valid_data": "--valid",
    "source_lang": "--source-lang",
    "target_lang": "--target-lang",
}


def config_from_sources(values: dict, sources: dict[str, str]) -> TrainConfig:
    """``TrainConfig(**values)`` with every error naming the field and where its value came from
    (``sources[field]``: a preset, a file, ``--set``, a flag, a run's ``config.json``)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = sorted({sources.get(name, "settings") for name in unknown})
        raise ValueError(f"{unknown[0]}: no such config field (from {', '.join(where)}; unknown: {unknown})")
    try:
        return TrainConfig(**values)
    except ValueError as err:
        message = str(err)
        name = message.split(":", 1)[0]
        if name in sources:
            message = f"{message} (from {sources[name]})"
        raise ValueError(message) from None


def resolve_paths(values: dict) -> None:
    """Relative data and tokenizer paths against the working directory, so that the run's
    ``config.json`` holds paths that work from any folder (``eval``, ``--resume``)."""
    for name in ("data", "valid_data"):
        paths = values.get(name)
        if isinstance(paths, str):
            paths = [paths]
        if isinstance(paths, list) and all(isinstance(p, str) and p for p in paths):
            values[name] = [str(Path(p).expanduser().resolve()) for p in paths]
    for name in ("tokenizer", "init_from"):
        path = values.get(name)
        if isinstance(path, str) and path:
            values[name] = str(Path(path).expanduser().resolve())


def settings_given(config_file: str | None, sets: list[str] | None) -> tuple[dict, dict[str, str]]:
    """The settings a config file and ``key=value`` strings give (the later winning), and where
    each came from (the file's path, ``--set key=value``): what a user asked for, before presets."""
    values, sources = {}, {}
    if config_file:
        from_file = read_config_file(config_file)
        values.update(from_file)
        sources.update(dict.fromkeys(from_file, str(config_file)))
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()  # the value is kept as given: a source_prefix ends in a space
        values[key], sources[key] = parse_setting(key, text), f"--set {item}"
    return values, sources


def build_config(
    preset: str = "tiny",
    config_file: str | None = None,
    overrides: dict | None = None,
    sets: list[str] | None = None,
    flag_names: dict[str, str] | None = None,
) -> TrainConfig:
    """Preset, then the config file, then ``key=value`` strings, then explicit overrides (flags;
    ``flag_names`` maps their fields to the flags' names for messages). One validation of the
    result, every error naming the field and its source; relative paths resolved."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    sources = dict.fromkeys(values, f"preset {preset}")
    from_user, user_sources = settings_given(config_file, sets)
    values.update(from_user)
    sources.update(user_sources)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    sources.update({k: (flag_names or {}).get(k, "overrides") for k in given})
    resolve_paths(values)
    return config_from_sources(values, sources)


# Settings `train --resume` may change: bookkeeping and the run's length. Anything else would make
# the resumed run differ from the one its checkpoints belong to (model, data, optimisation).
RESUMABLE_FIELDS = (
    "max_steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_last",
    "max_bad_steps",
    "tensorboard",
    "sample_prompt",
    "sample_tokens",
    "dist_timeout_s",
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    # the layout: DCP checkpoints reshard to any; batch_size is per rank, so a run resumed on another
    # number of processes changes it (the trainer checks the global batch stays the same)
    "expert_parallel",
    "fsdp",
    "batch_size",
    "grad_accum",
)


def resume_config(saved: dict, saved_source: str, changes: dict, change_sources: dict[str, str]) -> TrainConfig:
    """The config of a resumed run: the run's own (``saved``, from ``saved_source``) with
    ``changes`` applied. Only :data:`RESUMABLE_FIELDS` may change; any other field given with a
    different value is refused by name (given with the same value, it is accepted)."""
    saved_config = config_from_sources(saved, dict.fromkeys(saved, saved_source))
    current = saved_config.to_dict()
    known = set(current)
    for name in changes:
        if name not in known:
            raise ValueError(f"{name}: no such config field (from {change_sources.get(name, 'settings')})")
    refused = [n for n, v in changes.items() if n not in RESUMABLE_FIELDS and v != current[n]]
    if refused:
        name = refused[0]
        raise ValueError(
            f"{name}: --resume cannot change it (the run has {current[name]!r}, "
            f"{change_sources.get(name, 'settings')} gives {changes[name]!r}); --resume may change only "
            f"{', '.join(RESUMABLE_FIELDS)}; start a new run to change the rest"
        )
    values = dict(current, **changes)
    return config_from_sources(values, dict(dict.fromkeys(current, saved_source), **change_sources))
