"""Derived weight copies (the transposed output matrix, the fused q/k/v matrix) never give a result
other than recomputation, whatever changed the weights in between."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import switchformer as sf
from switchformer.inference.scope import DecodingScope, DerivedWeight
from switchformer.models.layers import transposed_copy


def lm(seed=0):
    torch.manual_seed(seed)
    return sf.SwitchLM(
        sf.SwitchLMConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, d_ff=48, num_experts=4, max_seq_len=64)
    ).eval()


def t5(seed=0):
    torch.manual_seed(seed)
    config = sf.SwitchT5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, num_experts=4, dropout_rate=0.0
    )
    return sf.SwitchT5(config).eval()


def greedy_by_full_forward(model, ids, steps):
    """The uncached reference: every step re-runs the whole sequence, no derived copy involved."""
    with torch.no_grad():
        if isinstance(model, sf.SwitchLM):
            seq = ids
            for _ in range(steps):
                seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
            return seq
        seq = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
        for _ in range(steps):
            seq = torch.cat([seq, model(ids, decoder_input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        return seq


def changes(model):
    """Every kind of weight change a user makes between two generate calls."""
    head = model.embed if isinstance(model, sf.SwitchLM) else model.shared
    attention = [p for n, p in model.named_parameters() if ".attn." in n and "decoder" in n or ".qkv." in n]

    def data_edit():  # the issue's case: param.data does not bump the version counter
        head.weight.data[7:] *= -3

    def data_edit_attention():  # the T5 decoder's fused q/k/v copy must follow
        torch.manual_seed(1)
        for p in attention:
            p.data.normal_(0, 1.0)

    def in_place():
        with torch.no_grad():
            head.weight.add_(0.5 * torch.randn_like(head.weight))

    def load():
        state = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(state)

    def optimizer_step():
        opt = torch.optim.SGD(model.parameters(), lr=5.0)
        model.train()
        ids = torch.randint(2, 50, (2, 6))
        out = model(ids, labels=ids) if isinstance(model, sf.SwitchLM) else model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        model.eval()

    def swap_data():  # an EMA swap: a new tensor put in place through .data
        head.weight.data = torch.randn_like(head.weight)

    return [data_edit, data_edit_attention, in_place, load, optimizer_step, swap_data]


@pytest.mark.parametrize("family", ["lm", "t5"])
@pytest.mark.parametrize("change_index", range(6))
def test_generation_after_any_weight_change_equals_recomputation(family, change_index):
    model = lm() if family == "lm" else t5()
    ids = torch.tensor([[5, 6, 7]]) if family == "lm" else torch.tensor([[5, 6, 7, 8]])
    model.generate(ids, max_new_tokens=4, routing="dropless")  # builds and keeps the derived copies
    changes(model)[change_index]()
    got = model.generate(ids, max_new_tokens=4, routing="dropless")
    want = greedy_by_full_forward(model, ids, 4)
    assert torch.equal(got[:, -4:], want[:, -4:])


def test_the_issue_case_picks_the_recomputed_token():
    model = lm()
    ids = torch.tensor([[5, 6, 7]])
    model.generate(ids, max_new_tokens=1)
    model.embed.weight.data[7:] *= -3
    with torch.no_grad():
        want = model(ids).logits[0, -1].argmax().item()
    assert model.generate(ids, max_new_tokens=1)[0, -1].item() == want


def test_outside_a_scope_nothing_is_kept_and_a_new_scope_rebuilds():
    weight = torch.randn(6, 4)
    derived = DerivedWeight(transposed_copy)
    assert torch.equal(derived(weight), weight.t())
    assert derived._copy is None  # outside a scope: computed, not kept
    with DecodingScope().active():
        first = derived(weight)
        assert derived(weight) is first  # kept within the scope
    weight.data.mul_(2)  # invisible to the version counter
    with DecodingScope().active():
        assert torch.equal(derived(weight), weight.t())


def test_copies_are_never_pickled_or_deep_copied():
    model = lm()
    model.generate(torch.tensor([[1, 2]]), max_new_tokens=2)
    assert model._head_t._copy is not None
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone._head_t._copy is None
        assert torch.equal(
            clone.generate(torch.tensor([[1, 2]]), max_new_tokens=3),
            model.generate(torch.tensor([[1, 2]]), max_new_tokens=3),
        )
