"""The training loop: optimiser and schedule, accumulation, clipping, mixed precision, evaluation
with routing statistics, metrics, checkpoints and exact resumption.

The model is built from the config and knows nothing of training; everything here wraps it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from switchformer.inference.routing import routing_description
from switchformer.inference.text import generate_text
from switchformer.models.outputs import weighted_router_loss
from switchformer.moe.routing import defer_bias_updates, discard_bias_updates, sync_bias_updates
from switchformer.parallel import (
    DCP_FOLDER,
    apply_expert_parallel,
    apply_fsdp,
    check_same_config,
    export_safetensors,
    init_distributed,
    local_tensor,
    reduce_gradients,
    save_dcp,
    sum_over_world,
    whole_weights,
)
from switchformer.parallel.memory import held_elements
from switchformer.runs.directory import write_run
from switchformer.runtime import resolve_device, reuse_freed_memory
from switchformer.train.checkpoint import (
    begin_checkpoint,
    finish_checkpoint,
    latest_checkpoint,
    save_checkpoint,
    write_json_atomic,
    write_state_file,
)
from switchformer.train.config import TrainConfig
from switchformer.train.data import Data, prepare_data, with_data_languages
from switchformer.train.evaluation import EvalResult, evaluate, model_forward, scored_tokens
from switchformer.train.layout import check_start_layout, global_batch
from switchformer.train.optimizer import build_optimizer, clip_grad_norm, learning_rate
from switchformer.train.precision import autocast_context
from switchformer.train.resume import resume as resume_run
from switchformer.train.run import build_model, check_tokenizer_fits
from switchformer.train.run_log import RunLog

log = logging.getLogger("switchformer")


class TrainingError(RuntimeError):
    """Training cannot go on (for example: too many non-finite losses in a row)."""


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        progress: bool = True,
        device: str | None = None,
        data: Data | None = None,
        model_config: dict | None = None,
        init_state: dict | None = None,
    ):
        """``data``: already prepared data for this config (``compare`` hands the Switch run's to its
        dense twin, whose data settings are the same); the run directory must hold its tokenizer.
        ``model_config``: the saved ``model`` section of the run being resumed (its architecture),
        or of the pretrained model a new run starts from; ``init_state``: that model's weights."""
        self.config = config
        self.run_dir = Path(run_dir)
        self.parallel = None
        check_start_layout(config, model_config)  # `train` checks it first too, before it writes anything
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.parallel = init_distributed(config.expert_parallel, config.dist_timeout_s, config.fsdp)
            check_same_config(config.to_dict(), self.parallel)
        self.is_main = self.parallel is None or self.parallel.is_main
        self.rank, self.world = (0, 1) if self.parallel is None else (self.parallel.rank, self.parallel.world_size)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_log = RunLog(self.run_dir, self.is_main, fresh=not resume, tensorboard=config.tensorboard)
        self._saved_step: int | None = None  # the step of the checkpoint on disk that this run wrote or loaded
        self.progress = progress and self.is_main
        default_device = "cpu"
        if torch.cuda.is_available():
            default_device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if self.parallel else "cuda"
        self.device = resolve_device(device or default_device)
        if self.device.type == "cpu":
            reuse_freed_memory()  # see runtime.py: large expert gradients are reused, not re-faulted
        torch.manual_seed(config.seed)
        self.data: Data = data if data is not None else self._prepare_data(resume)
        # the languages the pairs carry become the run's own, stated in config.json, so translate and
        # eval can name a language the model never saw
        config = self.config = with_data_languages(config, self.data)
        self.model = self._build_model(model_config, init_state)
        self.optimizer = build_optimizer(config, self.model)
        self.step = 0
        self.bad_steps = 0
        self.memory: dict | None = None  # this rank's parameters, gradients, optimizer state (elements)
        self.history: list[dict] = []
        self.time_offset = 0.0  # training seconds before this process (a resumed run's clock goes on)
        self._clock_start: float | None = None
        if resume:
            self._resume()
        # written once everything above succeeded: a failed start leaves the run's config as it was
        if self.is_main:
            self.run_log.claim()
            write_run(self.run_dir, config.run_section(), self.model.config.to_dict())

    def _prepare_data(self, resume: bool) -> Data:
        if resume and not (self.run_dir / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{self.run_dir / 'tokenizer.json'}: missing; --resume continues with the run's own tokenizer "
                "(a new one would give the model other token ids): put the tokenizer its weights were trained with"
            )
        if not (self.run_dir / "tokenizer.json").exists():
            self.run_log.claim()  # prepare_data writes it
        with self.main_first():  # rank 0 trains and saves the tokenizer; the others then load it
            return prepare_data(self.config, self.run_dir)

    def _build_model(self, model_config: dict | None, init_state: dict | None) -> torch.nn.Module:
        """The model, on this process's device and in its layout (expert shards, FSDP)."""
        torch.manual_seed(self.config.seed)  # the same initial weights whatever data preparation consumed
        model = build_model(self.config, self.data.vocab_size, model_config)
        if model_config is not None:  # a resumed run's architecture: its tokenizer must fit it
            check_tokenizer_fits(self.data.tokenizer, model, self.run_dir / "tokenizer.json")
        if init_state is not None:  # --init-from: the pretrained weights, before any expert slicing
            model.load_state_dict(init_state)
        defer_bias_updates(model)  # one selection-bias update per step, over all micro-batches and ranks
        if self.parallel is not None:  # full seeded init on every rank, then each keeps its experts
            apply_expert_parallel(model, self.parallel)
        model.to(self.device)
        if self.parallel is not None and self.parallel.fsdp:
            apply_fsdp(model, self.parallel)  # before the optimizer: it holds the sharded weights
        return model

    def _resume(self) -> None:
        self.run_log.claim()  # resuming rewrites metrics.jsonl
        state, _ = resume_run(self.run_dir, self.model, self.optimizer, self.parallel, self.config, self.world)
        self.step, self.bad_steps = state["step"], state.get("bad_steps", 0)
        if self.config.max_steps < self.step:
            raise ValueError(
                f"max_steps: {self.config.max_steps} is below the step {self.step} the run has reached; give at "
                f"least {self.step}"
            )
        self._saved_step = self.step
        self.time_offset = float(state.get("train_time", 0.0))
        self.history = self.run_log.records_up_to(self.step)

    # -- bookkeeping -----------------------------------------------------------------------

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it may write shared files), the other ranks after it."""
        if self.parallel is not None and not self.is_main:
            dist.barrier()
        yield
        if self.parallel is not None and self.is_main:
            dist.barrier()

    def log_metrics(self, record: dict) -> None:
        self.history.append(record)
        self.run_log.record(record)

    def train_time(self) -> float:
        """Seconds of training so far, across resumptions: the ``time`` of every metrics record."""
        if self._clock_start is None:
            return self.time_offset
        return self.time_offset + time.perf_counter() - self._clock_start

    def close(self) -> None:
        """Close metrics.jsonl and release the run directory's lock."""
        self.run_log.close()

    def _non_finite_state(self) -> str | None:
        """The first weight or optimizer-state tensor holding NaN or infinity (None: all finite;
        under torchrun, any rank's makes every rank's answer non-None)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        tensors = [(f"weight {n}", local_tensor(t)) for n, t in self.model.state_dict().items()]
        for param, entry in self.optimizer.state.items():
            for field, value in entry.items():
                if isinstance(value, torch.Tensor):
                    label = f"optimizer state {field} of {names.get(id(param), 'a parameter')}"
                    tensors.append((label, local_tensor(value)))
        tensors = [(n, t) for n, t in tensors if t.dtype.is_floating_point or t.dtype.is_complex]
        bad = [(~torch.isfinite(t.detach())).any() for _, t in tensors]
        flag = torch.zeros((), device=self.device)
        if bad:
            flag = torch.stack([b.to(self.device) for b in bad]).any().float()
        if self.parallel is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bool(flag.item()):
            return None
        found = [name for (name, _), b in zip(tensors, bad) if bool(b)]
        return found[0] if found else "another process's weights or optimizer state"

    def save(self) -> Path:
        self.run_log.claim()
        broken = self._non_finite_state()
        if broken is not None:  # never saved: it would replace (and prune) the good checkpoints
            last = latest_checkpoint(self.run_dir, warn=False)
            kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was saved before it"
            raise TrainingError(
                f"step {self.step}: {broken} holds non-finite values (NaN or infinity); its checkpoint is not "
                f"saved and {kept}; lower lr or raise warmup_steps"
            )
        self._saved_step = self.step
        extra = {
            "checkpoint_format": "single" if self.parallel is None else "dcp",  # dcp: its folder must be there
            "bad_steps": self.bad_steps,
            "world_size": self.world,
            "global_batch": global_batch(self.config, self.world),
            "train_time": self.train_time(),
        }
        if self.parallel is None:
            return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, extra, self.config.keep_last)
        # every rank writes its shards of model and optimizer state (DCP) and of the consolidated
        # model.safetensors; rank 0 then writes state.json and renames the folder into place
        holder = [str(begin_checkpoint(self.run_dir, self.step)) if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        tmp = Path(holder[0])
        try:
            save_dcp(tmp / DCP_FOLDER, self.model, self.optimizer, self.parallel)
            export_safetensors(tmp, self.model, self.parallel)
            final = None
            if self.is_main:
                write_state_file(tmp, self.step, extra)
                final = finish_checkpoint(tmp, self.config.keep_last)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        dist.barrier()
        return final or latest_checkpoint(self.run_dir)

    def _router_loss(self, out) -> torch.Tensor:
        """The router losses with the model's coefficients (zero for a dense model)."""
        if out.aux_loss is None:
            return torch.zeros((), device=self.device)
        return weighted_router_loss(self.model.config, out.aux_loss, out.z_loss)

    def _global_sum(self, value: int) -> int:
        """``value`` summed over the data-parallel ranks (itself in one process)."""
        if self.parallel is None:
            return value
        total = torch.tensor(value, dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: dict, label_smoothing: float = 0.0):
        return model_forward(self.model, batch, label_smoothing)

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, max_batches: int | None = None) -> EvalResult:
        if self.parallel is None:
            return evaluate(self.model, self.data.valid, self.config, self.device, max_batches, self.forward)
        return evaluate(
            self.model, self.data.valid, self.config, self.device, max_batches, self.forward,
            rank=self.rank, world=self.world, reduce_sum=sum_over_world,
        )  # fmt: skip

    # -- training --------------------------------------------------------------------------

    def train_step(self) -> dict | None:
        config = self.config
        lr = learning_rate(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        totals = {"loss": 0.0, "ce_loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0}
        tokens = 0
        finite = True
        batches = [self.data.batch(config, self.step, m, self.rank, self.world) for m in range(config.grad_accum)]
        scored = [scored_tokens(b) for b in batches]
        global_scored = self._global_sum(sum(scored))
        for micro, batch in enumerate(batches):
            batch = self.to_device(batch)
            with autocast_context(config, self.device):
                out = self.forward(batch, config.label_smoothing)
            # Cross-entropy: the mean over every scored token of the global batch (all micro-batches
            # and ranks), whatever the split: each micro-batch's mean weighs by its token count.
            # reduce_gradients averages over ranks, hence the factor world. Router losses: the mean
            # over micro-batches and ranks of each micro-batch's own (they are statistics of a
            # routing group, not sums over tokens).
            ce_weight = scored[micro] * self.world / max(global_scored, 1)
            loss = self._router_loss(out) / config.grad_accum
            if scored[micro]:  # a micro-batch with no label token has a NaN mean and adds nothing
                loss = loss + out.ce_loss * ce_weight
            # the model's own total guards too (any non-finite term of it skips the step)
            ok = bool(torch.isfinite(loss)) and (not scored[micro] or bool(torch.isfinite(out.loss)))
            if self.parallel is not None:  # every rank runs backward (its collectives) or none does
                flag = torch.tensor(float(ok), device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                ok = bool(flag.item())
            if not ok:
                finite = False
                break
            loss.backward()
            # logged values: this rank's share, so that the mean over ranks is the global figure
            totals["loss"] += float(loss.detach())
            # logged: the labels' cross-entropy (a distillation's objective mixes in the teacher's)
            label_ce = getattr(out, "label_ce_loss", out.ce_loss)
            totals["ce_loss"] += float(label_ce.detach()) * ce_weight if scored[micro] else 0.0
            for key in ("aux_loss", "z_loss"):
                value = getattr(out, key)
                totals[key] += float(value.detach()) / config.grad_accum if value is not None else 0.0
            # an encoder-decoder reads its inputs and its labels (the decoder's inputs); a language
            # model's labels (chat) are its inputs' own positions, not more tokens
            decoder_tokens = batch["labels"].numel() if "labels" in batch and config.model == "t5" else 0
            tokens += batch["input_ids"].numel() + decoder_tokens
        norm = None
        if finite:
            if self.parallel is None:
                sync_bias_updates(self.model)
            elif self.parallel.fsdp:  # FSDP reduced the gradients during backward
                sync_bias_updates(self.model, sum_over_world)
            else:
                reduce_gradients(self.model, self.parallel)  # syncs the routers' selection biases too
            norm = clip_grad_norm(self.model, config.grad_clip, self.parallel)
            finite = math.isfinite(norm)
        if not finite:
            self._skip_step()
            return None
        self.bad_steps = 0
        if self.parallel is not None:  # log the global batch's losses, not this rank's share
            values = torch.tensor([totals[k] for k in totals], device=self.device)
            dist.all_reduce(values)
            totals = dict(zip(totals, (values / self.world).tolist()))
            tokens *= self.world
        self.optimizer.step()
        if self.memory is None:  # what this rank holds through a step, once the optimizer state exists
            self.memory = held_elements(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return dict(totals, lr=lr, grad_norm=norm, tokens=tokens)

    def _skip_step(self) -> None:
        """A step whose loss or gradient is not finite: nothing applied, counted, logged; too many in a
        row end the run."""
        discard_bias_updates(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        # 1-based, as metrics.jsonl numbers the step (the one that would have made it step + 1)
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step + 1, self.bad_steps)
        self.log_metrics({"step": self.step + 1, "skipped": True})
        if self.bad_steps >= self.config.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} non-finite losses in a row at step {self.step + 1}; "
                "lower lr, raise warmup_steps or check the data"
            )
        self.step += 1

    def train(self) -> dict:
        """Train to ``max_steps``, evaluate, checkpoint, write summary.json; the run's lock and
        metrics file are released at the end, also on an error."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        config = self.config
        self.model.train()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.max_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True
        )
        self._clock_start = time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while self.step < config.max_steps:
                result = self.train_step()
                bar.update(1)
                if result is not None:
                    window_tokens += result["tokens"]
                    if self.step % config.log_every == 0 or self.step == config.max_steps:
                        elapsed = time.perf_counter() - window_start
                        record = {
                            "step": self.step,
                            **{k: v for k, v in result.items() if k != "tokens"},
                            "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                            "time": self.train_time(),
                        }
                        self.log_metrics(record)
                        bar.set_postfix(loss=f"{result['ce_loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                        window_tokens, window_start = 0, time.perf_counter()
                if self.step % config.eval_every == 0 and self.step < config.max_steps:
                    result_eval = self.evaluate()
                    self.log_metrics({"step": self.step, "time": self.train_time(), **result_eval.to_dict()})
                    if self.is_main:  # printed once, by rank 0
                        bar.write(
                            f"step {self.step}: validation loss {result_eval.loss:.4f}, "
                            f"perplexity {result_eval.perplexity:.2f}"
                        )
                if self.step % config.checkpoint_every == 0 and self.step < config.max_steps:
                    self.save()
        finally:
            bar.close()
        final = self.evaluate()
        # a run resumed after its last checkpoint (killed before summary.json, or finished) has its
        # final evaluation and checkpoint already: neither is written twice
        if not any(r.get("step") == self.step and "eval_loss" in r for r in self.history):
            self.log_metrics({"step": self.step, "time": self.train_time(), **final.to_dict()})
        checkpoint = self.save() if self._saved_step != self.step else latest_checkpoint(self.run_dir)
        summary = {
            "step": self.step,
            "eval_loss": final.loss,
            "perplexity": final.perplexity,
            "routing": final.routing,
            "routing_used": routing_description(self.model, "eval"),  # how the validation loss was routed
            "checkpoint": str(checkpoint),
            "run_dir": str(self.run_dir),
            "parameters": self.model.num_parameters(),
            "memory_per_rank": self.memory,  # rank 0's: elements of parameters, gradients, optimizer state
            "sample": self.sample() if self.config.sample_tokens else None,  # 0: none (FSDP gathers the model for it)
        }
        if self.config.resolved_objective == "seq2seq":  # sides cut to seq_len tokens (also logged at the start)
            summary["truncated"] = {
                split: {"sources": part.truncated_sources, "targets": part.truncated_targets, "rows": len(part)}
                for split, part in (("training", self.data.train), ("validation", self.data.valid))
            }
        if self.config.resolved_objective == "chat":  # conversations cut to seq_len tokens (also logged)
            summary["truncated"] = {
                split: {"conversations": part.truncated_conversations, "rows": len(part)}
                for split, part in (("training", self.data.train), ("validation", self.data.valid))
            }
        if self.is_main:
            self.run_log.claim()
            write_json_atomic(self.run_dir / "summary.json", summary)
        self.run_log.finish()
        return summary

    @torch.no_grad()
    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """A continuation of ``prompt`` (default: ``sample_prompt``); a seq2seq run translates
        its first validation source instead, formatted as in training, with that pair's languages;
        a chat run answers ``prompt`` as a user message, by default the first validation
        conversation's messages before its first answer."""
        pair = getattr(self.data, "sample_pair", None)
        extra = {}
        messages = getattr(self.data, "sample_messages", None)
        if prompt is None and messages and self.config.resolved_objective == "chat":
            extra = {"messages": messages}
        if prompt is None and pair is not None:
            prompt = pair[0]
            extra = {
                "source_lang": getattr(pair, "source_lang", None),
                "target_lang": getattr(pair, "target_lang", None),
            }
        sharded = self.parallel is not None and self.parallel.fsdp
        with whole_weights(self.model) if sharded else contextlib.nullcontext():
            return generate_text(
                self.model,
                self.data.tokenizer,
                prompt if prompt is not None else self.config.sample_prompt,
                max_new_tokens or self.config.sample_tokens,
                seed=self.config.seed,
                config=self.config,  # a seq2seq run samples as it translates (its formatting, greedy)
                **extra,
            )


