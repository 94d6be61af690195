"""``switchformer upcycle``: sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints", ICLR 2023). A dense model's FFN in every
``sparse_step``-th layer becomes a Switch layer of ``num_experts`` experts, each a copy of that FFN;
everything else (attention, embeddings, norms, the other FFNs) is carried over unchanged; only the
routers are new.

**Which settings keep the dense model's function at step 0.** With ``top_k`` >= 2 the gates are
renormalised over the chosen experts (``normalize_gates``), so they sum to one and identical
experts give exactly the dense FFN's output, whatever the new router says (the paper's decoders
route top-2). With Switch's top-1 the output is the chosen expert's times its router probability,
about ``1 / num_experts`` for a fresh router: not the dense function (and renormalising a single
gate would make it exactly one, so the router would never learn from the loss). So the default is
``--top-k 2``; ``--top-k 1`` is Switch's own routing, starting from a damped FFN. Routing must also
keep every token: capacity factors are kept only if the user gives them; the default is dropless.

**Breaking the symmetry.** Identical experts receive different tokens and so diverge; with top-2
the router learns only once they differ (its gradient is the difference of the two experts'
outputs). ``expert_noise`` adds independent Gaussian noise to each expert's copy (standard
deviation ``expert_noise`` times the copied weight's own standard deviation), which breaks the
exact equality at step 0 by about that relative amount.

OUT is a run directory (``config.json``, ``model.safetensors``, ``tokenizer.json``) like a
converted checkpoint's: ``train --init-from OUT`` (or ``train --resume OUT``) trains it further;
``eval``, ``generate``, ``serve`` read it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from switchformer.interop.hf import from_hf
from switchformer.interop.tokenizers import source_tokenizer
from switchformer.lifecycle.convert import train_settings_of
from switchformer.models.layers import DenseFFN, FeedForward
from switchformer.runs.directory import is_hugging_face_source, run_dir_of, write_run
from switchformer.train.run import build_model_from_dict, load_run


def _ffn_slots(model) -> list[tuple[str, FeedForward]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FeedForward)]


def sparse_config(dense_config, num_experts: int, sparse_step: int, top_k: int,
                  capacity_factor=None, eval_capacity_factor=None):  # fmt: skip
    """The upcycled model's config: the dense config with Switch layers every ``sparse_step``
    layers, ``num_experts`` experts, ``top_k`` routing (gates renormalised for top-k > 1),
    dropless unless capacity factors are given, no router jitter (it would perturb step 0)."""
    if num_experts < 2:
        raise ValueError(f"--num-experts: must be >= 2 (one expert is the dense FFN again), got {num_experts}")
    if sparse_step < 1:
        raise ValueError(f"--sparse-step: must be >= 1, got {sparse_step}")
    if top_k not in (1, 2) or top_k > num_experts:
        raise ValueError(f"--top-k: 1 or 2 (and at most --num-experts), got {top_k}")
    common = dict(num_experts=num_experts, top_k=top_k, normalize_gates=top_k > 1, router_jitter_noise=0.0,
                  capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor)  # fmt: skip
    if hasattr(dense_config, "encoder_sparse_step"):
        config = replace(dense_config, encoder_sparse_step=sparse_step, decoder_sparse_step=sparse_step, **common)
        config.expert_capacity = None  # an imported per-sequence capacity would drop tokens
        return config
    # a dense run's routing setting never ran; expert choice could not route causally or dropless
    routing = dense_config.routing if dense_config.routing == "aux_loss_free" else "token_choice"
    return replace(dense_config, sparse_step=sparse_step, routing=routing, **common)


def check_dense(model, source) -> None:
    sparse = [name for name, slot in _ffn_slots(model) if slot.sparse]
    if sparse:
        raise ValueError(f"{source}: already sparse (Switch layers at {', '.join(sparse[:3])}...); upcycle takes a "
                         "dense model (a dense twin, sparse_step=0)")  # fmt: skip


@torch.no_grad()
def upcycle_model(dense, sparse, expert_noise: float = 0.0, generator: torch.Generator | None = None):
    """Copy ``dense``'s weights into ``sparse`` (built from :func:`sparse_config`): every weight
    with the same name as it is, and each Switch layer's experts from the dense FFN in its place.
    The routers keep their fresh initialisation. Returns ``sparse``."""
    dense_state = dense.state_dict()
    target = sparse.state_dict()
    for name, value in dense_state.items():
        if name in target and target[name].shape == value.shape:
            target[name].copy_(value)
    slots = list(zip(_ffn_slots(sparse), _ffn_slots(dense), strict=True))
    if not any(slot.sparse for (_, slot), _ in slots):
        raise ValueError(f"--sparse-step: no layer of this {len(slots)}-FFN model becomes a Switch layer; choose a "
                         "smaller step")  # fmt: skip
    for (_, slot), (_, dense_slot) in slots:
        if not slot.sparse:
            continue
        ffn: DenseFFN = dense_slot.mlp
        experts = slot.mlp.experts
        for weight, copy in ((experts.w_in, ffn.w_in), (experts.w_out, ffn.w_out)):
            weight.copy_(copy.unsqueeze(0).expand_as(weight))
            if expert_noise:
                noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
                weight.add_(noise.to(weight.device) * expert_noise * copy.std())
    return sparse


def upcycle(
    source: str | Path, out: str | Path, num_experts: int, sparse_step: int = 2, top_k: int = 2,
    expert_noise: float = 0.0, seed: int = 0, capacity_factor=None, eval_capacity_factor=None,
) -> dict:  # fmt: skip
    """Upcycle ``source`` (a dense switchformer run or checkpoint, or a dense Hugging Face T5
    directory) into the new run directory ``out``. Reads ``source`` only; writes ``out`` (a new or
    empty folder) atomically file by file. Returns a summary (parameters before and after)."""
    from safetensors.torch import save

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: {'a file' if source.exists() else 'not found'}; upcycle takes a run, "
                                "a checkpoint or a Hugging Face directory")  # fmt: skip
    if out.is_file():
        raise ValueError(f"{out}: a file; upcycle writes a run into a new or empty folder")
    if out.resolve().is_relative_to(run_dir_of(source).resolve()):
        raise ValueError(f"{out}: inside the source {source}; upcycle writes nothing into what it reads")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: already holds files; upcycle writes into a new or empty folder")
    if not (expert_noise >= 0 and math.isfinite(expert_noise)):  # nan or inf would write a broken model
        raise ValueError(f"--expert-noise: must be a finite number >= 0, got {expert_noise}")
    if is_hugging_face_source(source):
        dense, family, train = from_hf(source), "t5", None
        folder = source
    else:
        dense, _, train = load_run(source, need_tokenizer=False)
        family, folder = train.model, run_dir_of(source)
    check_dense(dense, source)
    config = sparse_config(dense.config, num_experts, sparse_step, top_k, capacity_factor, eval_capacity_factor)
    torch.manual_seed(seed)  # the routers' initialisation
    sparse = build_model_from_dict(family, config.to_dict(), "upcycled config")
    upcycle_model(dense.eval(), sparse, expert_noise, torch.Generator().manual_seed(seed))
    tokenizer_file, _ = source_tokenizer(folder)
    train = train_settings_of(config) if train is None else train
    train = replace(train, num_experts=num_experts, sparse_step=sparse_step, top_k=top_k, normalize_gates=top_k > 1,
                    capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                    router_jitter_noise=0.0, init_from=None, tokenizer=None, run_name=None)  # fmt: skip
    weights = save({k: v.contiguous() for k, v in sparse.state_dict().items()}, metadata={"format": "pt"})
    write_run(out, train.run_section(), config.to_dict(), weights=weights, tokenizer=Path(tokenizer_file),
              extra={"upcycled_from": str(source.resolve())})  # fmt: skip
    before, after = dense.num_parameters(), sparse.num_parameters()
    return {"before": before, "after": after, "family": family, "config": config}
