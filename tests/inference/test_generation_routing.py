"""One routing truth per model: forward in eval, ``evaluate`` and ``generate``
route the same way by default, with the model's own eval routing; dropless is an explicit choice."""

from __future__ import annotations

import pytest
import torch

import switchformer as sf
from switchformer.inference.routing import inference_routing, routing_description
from switchformer.moe.layer import SwitchMoE


def sparse_outputs(model):
    """Record every Switch layer's output, in call order."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda m, inp, out: seen.append(out[0].detach().clone()))
        for m in model.modules()
        if isinstance(m, SwitchMoE)
    ]
    return seen, hooks


def tight_t5(seed=0):
    """Capacity that drops tokens in eval: the default and dropless routings must differ here."""
    torch.manual_seed(seed)
    config = sf.SwitchT5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, num_experts=4,
        encoder_sparse_step=1, decoder_sparse_step=1, dropout_rate=0.0,
        capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1,
    )  # fmt: skip
    model = sf.SwitchT5(config).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SwitchMoE):
                layer.router.weight.normal_(0, 1.0)  # spread routers so that capacity binds
    return model


def test_generate_routes_the_encoder_as_eval_forward_does_by_default():
    model = tight_t5()
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    seen, hooks = sparse_outputs(model)
    with torch.no_grad():
        model.encode(ids)
    forward_encoder = list(seen)
    seen.clear()
    model.generate(ids, max_new_tokens=2)
    default_encoder = seen[: len(forward_encoder)]
    seen.clear()
    model.generate(ids, max_new_tokens=2, routing="dropless")
    dropless_encoder = seen[: len(forward_encoder)]
    for h in hooks:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(forward_encoder, default_encoder))
    # the test has teeth: capacity binds, so dropless routing gives other encoder outputs
    assert any(not torch.allclose(a, b) for a, b in zip(forward_encoder, dropless_encoder))


def test_default_generation_equals_explicit_eval_routing_and_differs_from_dropless():
    model = tight_t5()
    ids = torch.randint(2, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    default = model.generate(ids, max_new_tokens=6)
    assert torch.equal(default, model.generate(ids, max_new_tokens=6, routing="eval"))
    seen, hooks = sparse_outputs(model)
    aux_dropped = []
    for m in model.modules():
        if isinstance(m, SwitchMoE):
            hooks.append(m.register_forward_hook(lambda m, i, out: aux_dropped.append(out[1].dropped_fraction)))
    model.generate(ids, max_new_tokens=2, routing="dropless")
    assert max(aux_dropped) == 0.0
    aux_dropped.clear()
    model.generate(ids, max_new_tokens=2)
    assert max(aux_dropped) > 0.0
    for h in hooks:
        h.remove()


def test_lm_generation_first_step_equals_eval_forward():
    torch.manual_seed(0)
    config = sf.SwitchLMConfig(
        vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=48, num_experts=4, sparse_step=1,
        max_seq_len=64, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1, init_scale=1.0,
    )  # fmt: skip
    model = sf.SwitchLM(config).eval()
    ids = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits[:, -1].argmax(-1)
    got = model.generate(ids, max_new_tokens=1)[:, -1]
    assert torch.equal(got, want)
    with torch.no_grad(), inference_routing(model, "dropless"):
        dropless = model(ids).logits[:, -1]
    with torch.no_grad():
        eval_logits = model(ids).logits[:, -1]
    assert not torch.allclose(dropless, eval_logits)  # capacity binds: the two routings differ


def test_routing_description_names_what_each_layer_does():
    model = tight_t5()
    assert routing_description(model) == "eval: capacity factor 0.5"
    assert routing_description(model, "dropless").startswith("dropless")
    for m in model.modules():
        if isinstance(m, SwitchMoE):
            m.expert_capacity = 3
    assert routing_description(model) == "eval: expert_capacity 3 per sequence"
    dense = sf.SwitchT5(sf.SwitchT5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                          num_experts=0))  # fmt: skip
    assert routing_description(dense) == "dense"
    with pytest.raises(ValueError, match="routing"):
        routing_description(model, "capacity")


transformers = pytest.importorskip("transformers")


def test_hf_import_generates_hf_tokens_by_default_when_capacity_drops_tokens():
    """The issue's case: HF's per-sequence expert_capacity drops encoder tokens; our default
    generation must keep HF's semantics and so HF's tokens."""
    from switchformer.interop.hf import from_hf

    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=3, num_decoder_layers=2,
        num_experts=4, num_sparse_encoder_layers=3, num_sparse_decoder_layers=0, expert_capacity=3,
        router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0, encoder_sparse_step=1,
        initializer_factor=3.0,  # outputs that depend on the input (at 1.0 every row repeats one token)
    )  # fmt: skip
    hf = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "router" in name:
                p.normal_(0, 1.0)
    ours = from_hf(hf).eval()
    ids = torch.randint(2, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    want = hf.generate(input_ids=ids, max_new_tokens=10, do_sample=False, num_beams=1)
    assert torch.equal(ours.generate(ids, max_new_tokens=10), want)
    # the case has teeth: 20 tokens over 4 experts of capacity 3 drop tokens, dropless routes otherwise
    dropless = ours.generate(ids, max_new_tokens=10, routing="dropless")
    assert not torch.equal(dropless, want)


def test_a_model_routed_in_fixed_groups_still_generates_with_its_eval_capacity():
    """Decoding steps hold a step's rows, no multiple of group_size: each step is one routing group
    (eval itself keeps the groups: it runs whole sequences)."""
    torch.manual_seed(0)
    config = sf.SwitchLMConfig(
        vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=48, num_experts=4, sparse_step=1,
        max_seq_len=64, group_size=32,
    )  # fmt: skip
    model = sf.SwitchLM(config).eval()
    out = model.generate(torch.randint(2, 64, (2, 16)), max_new_tokens=3)
    assert out.shape == (2, 19)
    assert all(m.group_size == 32 for m in model.modules() if isinstance(m, SwitchMoE))  # restored
    with pytest.raises(ValueError, match="group_size"):  # a forward itself keeps the training groups
        model(torch.randint(2, 64, (1, 5)))
