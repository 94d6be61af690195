"""A deliberately plain mixture-of-experts: one token at a time, Python counters for capacity.

It shares no code with ``switchformer.moe.dispatch`` or ``switchformer.moe.routing``; it reads only the
layer's weights and settings, so it can serve as an independent reference, forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_ffn(layer, e: int, x_t: torch.Tensor) -> torch.Tensor:
    w_in, w_out = layer.experts.w_in[e], layer.experts.w_out[e]
    h = x_t @ w_in
    act = layer.experts.activation
    if act == "relu":
        h = torch.relu(h)
    elif act == "gelu":
        h = F.gelu(h)
    elif act in ("gelu_new", "gated-gelu", "silu", "swiglu"):
        if act in ("gated-gelu", "swiglu"):
            half = h.shape[-1] // 2
            gate, lin = h[..., :half], h[..., half:]
            f = (lambda v: F.gelu(v, approximate="tanh")) if act == "gated-gelu" else F.silu
            h = f(gate) * lin
        elif act == "gelu_new":
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        else:
            h = h * torch.sigmoid(h)
    return h @ w_out


def reference_forward(layer, x: torch.Tensor, token_mask: torch.Tensor | None = None):
    """Returns (y, counts_after_capacity, demand) for a SwitchMoE ``layer`` (jitter must be off)."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    n_tokens = flat.shape[0]
    mask = torch.ones(n_tokens, dtype=torch.bool) if token_mask is None else token_mask.reshape(-1)
    n_exp = layer.num_experts
    groups, group_len = layer.routing_groups(x)
    capacity = layer.capacity(group_len)
    w_router = layer.router.weight.float()
    out = [flat.new_zeros(d) for _ in range(n_tokens)]
    counts = [0] * n_exp
    demand = [0] * n_exp

    for g in range(groups):
        tokens = list(range(g * group_len, (g + 1) * group_len))
        probs = {t: torch.softmax(flat[t].float() @ w_router.t(), -1) for t in tokens}
        if layer.routing == "expert_choice":
            for e in range(n_exp):
                valid = [t for t in tokens if mask[t]]
                ranked = sorted(valid, key=lambda t: (-probs[t][e].item(), t))[: min(capacity, group_len)]
                for t in ranked:
                    out[t] = out[t] + probs[t][e].to(x.dtype) * expert_ffn(layer, e, flat[t])
                    counts[e] += 1
                    demand[e] += 1
            continue
        k = layer.top_k
        bias = getattr(layer.router, "expert_bias", torch.zeros(n_exp))
        choices = {t: torch.topk(probs[t] + bias, k).indices.tolist() for t in tokens}
        gates = {}
        for t in tokens:
            gs = [probs[t][e] for e in choices[t]]
            if layer.router.normalize_gates and k > 1:
                total = sum(gs)
                gs = [gv / total for gv in gs]
            gates[t] = gs
        order = tokens
        if layer.router.priority == "router_prob":
            order = sorted(tokens, key=lambda t: (-probs[t].max().item(), t))
        used = [0] * n_exp
        for rank in range(k):
            for t in order:
                if not mask[t]:
                    continue
                e = choices[t][rank]
                demand[e] += 1
                if capacity is not None and used[e] >= capacity:
                    continue  # dropped: contributes nothing
                used[e] += 1
                counts[e] += 1
                out[t] = out[t] + gates[t][rank].to(x.dtype) * expert_ffn(layer, e, flat[t])
    return torch.stack(out).reshape(x.shape), counts, demand


def reference_load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> float:
    """Paper formula with explicit loops: groups are the leading dims."""
    n = probs.shape[-1]
    probs = probs.reshape(-1, probs.shape[-2], n)
    idx = expert_index.reshape(probs.shape[0], probs.shape[1], -1)
    total = 0.0
    for g in range(probs.shape[0]):
        tokens = probs.shape[1]
        loss = 0.0
        for i in range(n):
            f_i = sum(1 for t in range(tokens) if i in idx[g, t].tolist()) / tokens
            p_i = sum(probs[g, t, i].item() for t in range(tokens)) / tokens
            loss += f_i * p_i
        total += n * loss
    return total / probs.shape[0]
