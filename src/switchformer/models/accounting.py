"""Parameter and FLOP accounting: total parameters, parameters a token uses, FLOPs per token."""

from __future__ import annotations

from torch import nn

from switchformer.models.layers import DenseFFN
from switchformer.moe.layer import SwitchMoE, switch_layers


def _expert_params(layer: SwitchMoE) -> int:
    experts = getattr(layer.experts, "local", layer.experts)  # an expert-parallel shard holds `local`
    return experts.params_per_expert


def _absent_expert_params(layer: SwitchMoE) -> int:
    """Parameters of experts other ranks hold (expert parallelism), so totals are global."""
    held = getattr(layer.experts, "local", layer.experts).num_experts
    return (layer.num_experts - held) * _expert_params(layer)


def _holds_parameters(layer: SwitchMoE) -> bool:
    """False for experts loaded for inference (int8 or offloaded: ``StoredExperts``), whose weights
    are not parameters."""
    return any(True for _ in layer.experts.parameters())


def parameter_counts(model: nn.Module, context_len: int | None = None) -> dict[str, int]:
    """``total``: every parameter. ``active``: those one token uses (k of E experts per sparse layer;
    embeddings counted once). ``flops_per_token``: forward matmul FLOPs of one token, 2 per
    multiply-add, attention over ``context_len`` keys (default: ``max_seq_len`` for SwitchLM, 512
    for SwitchT5); for the encoder-decoder, the mean of one encoder and one decoder token."""
    moe_layers = switch_layers(model)
    total = sum(p.numel() for p in model.parameters()) + sum(_absent_expert_params(m) for m in moe_layers)
    total += sum(m.num_experts * _expert_params(m) for m in moe_layers if not _holds_parameters(m))
    inactive = sum((m.num_experts - m.top_k) * _expert_params(m) for m in moe_layers)
    config = model.config
    if context_len is None:
        context_len = 512 if model.is_encoder_decoder else config.max_seq_len

    flops = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features
        elif isinstance(module, DenseFFN):
            flops += 2 * (module.w_in.numel() + module.w_out.numel())
        elif isinstance(module, SwitchMoE):
            flops += 2 * (module.top_k * _expert_params(module) + module.router.weight.numel())
        if hasattr(module, "key_width"):  # an attention layer: scores and weighted values
            flops += 2 * 2 * context_len * module.key_width
    if config.tie_word_embeddings:
        flops += 2 * config.vocab_size * config.d_model  # the output projection reuses the embedding
    if model.is_encoder_decoder:
        flops //= 2
    return {"total": total, "active": total - inactive, "flops_per_token": flops}
