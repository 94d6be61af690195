"""``switchformer distill``: a Switch teacher distilled into a dense student (Switch paper,
section 5.2 and Tables 6-7).

- The student is by default the teacher's FLOP-matched dense twin (every Switch layer an FFN of
  one expert's size); ``--set`` may make it smaller (``d_model``, ``num_layers``, ``d_ff``, ...),
  never of another vocabulary. It starts from the teacher's non-expert weights (every weight whose
  name and shape the student shares: embeddings, attention, norms, the dense layers' FFNs), as the
  paper's best students do; the FFNs in the Switch layers' places start fresh.
- The loss mixes the teacher's probabilities with the labels (paper: 0.75 and 0.25)::

      alpha * T^2 * CE(softmax(teacher / T), log_softmax(student / T)) + (1 - alpha) * CE(student, labels)

  over the tokens the labels score, ``T`` the temperature (Hinton et al. 2015; ``T^2`` keeps the
  soft term's gradient scale as ``T`` changes; at ``T`` = 1 it is the paper's mixture of targets).
- The teacher runs in eval mode, dropless (no token dropped by expert capacity), without gradients,
  on each batch in the same step as the student: no logits are cached on disk.
- Training is the trainer's own (the teacher's data, tokenizer and settings; checkpoints, resume,
  evaluation); the validation loss it reports is the student's plain cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from switchformer.inference.routing import inference_routing
from switchformer.models import dense_twin_config
from switchformer.models.lm import next_token_labels
from switchformer.moe.layer import switch_layers
from switchformer.runs.directory import run_dir_of
from switchformer.runs.files import write_json_atomic
from switchformer.runs.state import claim_run, looks_like_a_run
from switchformer.train.evaluation import evaluate, model_forward
from switchformer.train.run import build_model_from_dict, load_run
from switchformer.train.trainer import Trainer

SIZE_FIELDS = ("d_model", "num_layers", "num_heads", "d_ff", "activation")
# student settings distill decides itself: the teacher's family, data, tokenizer and vocabulary, a
# dense model, the step count of --max-steps, the run directory OUT
FIXED_FIELDS = {
    "model": "the student is of the teacher's family", "objective": "the student learns the teacher's task",
    "data": "the student trains on the teacher's data", "valid_data": "the student is validated as the teacher",
    "tokenizer": "the student uses the teacher's tokenizer",
    "tokenizer_kind": "the student uses the teacher's tokenizer",
    "vocab_size": "the student shares the teacher's vocabulary", "init_from": "the student starts from the teacher",
    "num_experts": "the student is dense", "sparse_step": "the student is dense", "top_k": "the student is dense",
    "normalize_gates": "the student is dense", "max_steps": "give --max-steps", "run_name": "OUT names the run",
    "out_dir": "OUT names the run",
}  # fmt: skip


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, scored: Tensor, temperature: float) -> Tensor:
    """``T^2 * CE(softmax(teacher / T), log_softmax(student / T))``, the mean over the positions
    ``scored`` (bool, the logits' leading shape) of the cross-entropy against the teacher's
    distribution; float32. Logits ``[..., vocab]``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits: the student's {tuple(student_logits.shape)} and the teacher's "
                         f"{tuple(teacher_logits.shape)} differ")  # fmt: skip
    student = torch.log_softmax(student_logits[scored].float() / temperature, -1)
    teacher = torch.softmax(teacher_logits[scored].float() / temperature, -1)
    return -(teacher * student).sum(-1).mean() * temperature**2


def scored_positions(model, batch: dict) -> Tensor:
    """Where the labels score a token, aligned with the logits (a causal LM's shifted targets)."""
    if "labels" in batch and model.is_encoder_decoder:
        return batch["labels"] != -100

    labels = batch.get("labels", batch["input_ids"])
    return next_token_labels(labels, batch.get("attention_mask")) != -100


@dataclass
class DistillOutput:
    """What the trainer reads of a forward: ``ce_loss`` is the distillation objective it trains
    on; ``label_ce_loss``, the labels' cross-entropy, is what it logs as ``ce_loss``."""

    loss: Tensor
    ce_loss: Tensor
    label_ce_loss: Tensor
    soft_loss: Tensor
    aux_loss: None = None
    z_loss: None = None


class DistillTrainer(Trainer):
    """The trainer with the distillation objective; the teacher is frozen and never in the optimizer."""

    def __init__(self, config, run_dir, *, teacher, alpha: float, temperature: float, **options):
        super().__init__(config, run_dir, **options)
        self.teacher = teacher.to(self.device).eval()
        self.teacher_layers = switch_layers(self.teacher)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def forward(self, batch: dict, label_smoothing: float = 0.0):

        with torch.no_grad(), inference_routing(self.teacher, "dropless", layers=self.teacher_layers):
            teacher_logits = model_forward(self.teacher, batch).logits
        out = model_forward(self.model, batch, label_smoothing)
        scored = scored_positions(self.model, batch)
        soft = distillation_loss(out.logits, teacher_logits, scored, self.temperature)
        loss = self.alpha * soft + (1 - self.alpha) * out.ce_loss
        return DistillOutput(loss, loss, out.ce_loss.detach(), soft.detach())

    def evaluate(self, max_batches: int | None = None):
        """The student's plain cross-entropy on the validation split, as any run reports it."""
        return evaluate(self.model, self.data.valid, self.config, self.device, max_batches)


def copy_shared_weights(student, teacher) -> list[str]:
    """Copy every teacher weight whose name and shape the student shares; returns their names."""
    target = student.state_dict()
    copied = []
    with torch.no_grad():
        for name, value in teacher.state_dict().items():
            if name in target and target[name].shape == value.shape:
                target[name].copy_(value)
                copied.append(name)
    return copied


def check_distill_settings(alpha: float, temperature: float, max_steps: int) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha: the teacher's weight must be in [0, 1], got {alpha}")
    if not (temperature > 0 and math.isfinite(temperature)):  # inf: every soft target uniform, an infinite loss
        raise ValueError(f"--temperature: must be a finite number > 0, got {temperature}")
    if max_steps < 1:
        raise ValueError(f"--max-steps: must be >= 1, got {max_steps}")


def build_student(teacher_source: str | Path, out: str | Path, sets: dict, max_steps: int):
    """(teacher model, student train config, student model config dict). Reads the teacher only.
    Raises ``ValueError`` for a setting in ``sets`` that distill decides itself (:data:`FIXED_FIELDS`)."""
    for key in sets:
        if key in FIXED_FIELDS:
            raise ValueError(f"--set {key}: {FIXED_FIELDS[key]}; distill does not take it")
    if not Path(teacher_source).is_dir():
        state = "a file" if Path(teacher_source).exists() else "not found"
        raise FileNotFoundError(f"{teacher_source}: {state}; the teacher is a Switch run or checkpoint")
    teacher, _, teacher_train = load_run(teacher_source, need_tokenizer=False)
    teacher_dir = run_dir_of(teacher_source)
    if Path(out).resolve().is_relative_to(teacher_dir.resolve()):
        raise ValueError(f"{out}: inside the teacher's run {teacher_dir}; distill writes nothing into what it reads")
    if not switch_layers(teacher):
        raise ValueError(f"{teacher_source}: the teacher is dense; distill makes a dense student of a Switch teacher")
    tokenizer = teacher_dir / "tokenizer.json"
    if not tokenizer.exists():
        raise FileNotFoundError(f"{tokenizer}: missing; the student trains with the teacher's tokenizer")
    vocab = teacher.config.vocab_size
    out = Path(out)
    fixed = dict(max_steps=max_steps, sparse_step=0, init_from=None, run_name=out.name, out_dir=str(out.parent),
                 tokenizer=str(tokenizer.resolve()))  # fmt: skip
    train = replace(teacher_train, **{**sets, **fixed})
    if any(field in sets for field in SIZE_FIELDS):
        model_values = train.model_config(vocab).to_dict()  # a smaller dense student of the same vocabulary
    else:
        top_k = teacher.config.top_k
        if top_k != 1:  # dense_twin_config is defined for top-1 only: say how to go on
            raise ValueError(f"{teacher_source}: the teacher routes top-{top_k}, so it has no FLOP-matched dense twin "
                             "of its sizes; give the student's size with --set (e.g. d_ff=...)")  # fmt: skip
        model_values = dense_twin_config(teacher.config).to_dict()
        if "dropout" in sets:
            model_values["dropout_rate"] = sets["dropout"]
    return teacher, train, model_values


def student_init_state(teacher, train, model_values: dict) -> tuple[dict, list[str]]:
    """The student's initial weights: a fresh model (the run's seed) with the teacher's shared
    weights copied in; and the names copied."""
    torch.manual_seed(train.seed)
    student = build_model_from_dict(train.model, model_values, "student config")
    copied = copy_shared_weights(student, teacher)
    return student.state_dict(), copied


def distill(teacher_source: str | Path, out: str | Path, max_steps: int, *, alpha: float = 0.75,
            temperature: float = 1.0, sets: dict | None = None, device: str | None = None, progress: bool = True,
            announce=print) -> dict:  # fmt: skip
    """Distil the Switch run ``teacher_source`` into a dense student run at ``out`` (new or empty; one
    stopped before its first checkpoint starts over) over ``max_steps`` steps; ``sets``: student
    settings (field -> value) instead of the FLOP-matched dense twin's. ``announce`` gets one line
    before training starts. Returns the trainer's summary."""
    check_distill_settings(alpha, temperature, max_steps)
    out = Path(out)
    if out.is_file():
        raise ValueError(f"{out}: a file; distill writes the student's run into a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not looks_like_a_run(out):
        raise FileExistsError(f"{out}: already holds files; distill writes into a new or empty folder")
    teacher, train, model_values = build_student(teacher_source, out, dict(sets or {}), max_steps)
    init_state, copied = student_init_state(teacher, train, model_values)
    try:  # a distillation stopped before its first checkpoint starts over; one with a checkpoint is kept
        lock = claim_run(out, resume=False)
    except FileExistsError:
        raise FileExistsError(
            f"{out}: already holds a run with a checkpoint; continue it with switchformer train --resume {out} (on "
            "labels only: the teacher is not part of the run), or choose another OUT"
        ) from None
    announce(f"distilling {teacher_source} -> {out}: a dense student ({len(init_state)} tensors, {len(copied)} of "
             f"them the teacher's), alpha {alpha}, temperature {temperature}, {max_steps} steps")  # fmt: skip
    try:
        # what made this student, which config.json (a training run's) cannot say
        record = {"teacher": str(Path(teacher_source).resolve()), "alpha": alpha, "temperature": temperature,
                  "copied_weights": copied}  # fmt: skip
        write_json_atomic(out / "distill.json", record)
        trainer = DistillTrainer(
            train, out, teacher=teacher, alpha=alpha, temperature=temperature, progress=progress, device=device,
            model_config=model_values, init_state=init_state,
        )  # fmt: skip
        return trainer.train()
    finally:
        if lock is not None:
            lock.release()
