"""n-gram repetition blocking (``no_repeat_ngram_size``): the banned tokens against Hugging Face's
``NoRepeatNGramLogitsProcessor`` and a naive reading of the rule, and the property it promises:
no n-gram occurs twice in what is generated, greedy, sampled or beam-searched."""

from __future__ import annotations

import pytest
import torch

from switchformer.inference.sampling import SamplingConfig, process_logits, repeated_ngram_ends
from switchformer.models import SwitchLM, SwitchLMConfig, SwitchT5, SwitchT5Config


def naive_banned(row: list[int], n: int, vocab: int) -> set[int]:
    """The rule as words: a token is banned if the row's last n - 1 tokens followed by it occur
    somewhere in the row already."""
    if len(row) < n - 1:
        return set()
    tail = tuple(row[len(row) - (n - 1) :])
    return {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i : i + n - 1]) == tail}


def test_banned_tokens_equal_the_naive_rule_and_hugging_face():
    processor = pytest.importorskip("transformers.generation.logits_process").NoRepeatNGramLogitsProcessor
    g = torch.Generator().manual_seed(0)
    seen_bans = 0
    for _ in range(400):
        n = int(torch.randint(1, 5, (1,), generator=g))
        length = int(torch.randint(0, 14, (1,), generator=g))
        rows = torch.randint(0, 3, (3, length), generator=g)  # 3 symbols: repeats are common
        got = repeated_ngram_ends(rows, n, 5)
        for r, row in enumerate(rows.tolist()):
            assert set(got[r].nonzero().flatten().tolist()) == naive_banned(row, n, 5), (row, n)
        hf = processor(n)(rows, torch.zeros(3, 5)) == float("-inf")
        assert torch.equal(got, hf)
        seen_bans += int(got.any())
    assert seen_bans > 100


def test_process_logits_bans_with_minus_infinity_and_leaves_the_rest():
    logits = torch.arange(6.0).repeat(2, 1)
    history = torch.tensor([[4, 5, 4], [1, 2, 3]])  # row 0 holds (4, 5): after 4, 5 is banned
    out = process_logits(logits, history, SamplingConfig(no_repeat_ngram_size=2))
    assert out[0, 5] == float("-inf") and torch.equal(out[0, :5], logits[0, :5])
    assert torch.equal(out[1], logits[1])
    assert torch.equal(process_logits(logits, history, SamplingConfig()), logits)


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_a_bad_size_is_refused_by_name(value):
    with pytest.raises(ValueError, match="no_repeat_ngram_size: must be an integer >= 0"):
        SamplingConfig(no_repeat_ngram_size=value)


def has_repeated_ngram(row: list[int], n: int) -> bool:
    grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


def looping_t5() -> SwitchT5:
    """A tiny random T5 that, left alone, repeats one token to the end."""
    torch.manual_seed(0)
    return SwitchT5(SwitchT5Config(vocab_size=6, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=2,
                                   num_decoder_layers=2, num_experts=2, eos_token_id=1)).eval()  # fmt: skip


def up_to_eos(row: list[int], eos: int = 1) -> list[int]:
    """The hypothesis: what follows its EOS is padding, not generated."""
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("num_beams,do_sample", [(1, False), (1, True), (3, False)])
@pytest.mark.parametrize("n", [2, 3])
def test_no_ngram_occurs_twice_in_what_t5_generates(n, num_beams, do_sample):
    model = looping_t5()
    ids = torch.randint(2, 6, (8, 6), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=30, num_beams=num_beams, do_sample=do_sample)
    free = model.generate(ids, generator=torch.Generator().manual_seed(0), **settings)
    assert any(has_repeated_ngram(up_to_eos(row), n) for row in free.tolist())  # the premise: it loops
    out = model.generate(ids, no_repeat_ngram_size=n, generator=torch.Generator().manual_seed(0), **settings)
    for row in out.tolist():  # the start token counts, as Hugging Face counts it
        assert not has_repeated_ngram(up_to_eos(row), n), row


def test_no_ngram_occurs_twice_in_what_the_lm_generates_after_its_prompt():
    torch.manual_seed(0)
    model = SwitchLM(SwitchLMConfig(vocab_size=10, d_model=16, num_heads=2, num_layers=2, d_ff=32, num_experts=2,
                                    max_seq_len=64)).eval()  # fmt: skip
    prompt = torch.tensor([[2, 3, 2, 3, 4]])  # the prompt repeats (2, 3): 2 may not follow 3 again... after 2
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, no_repeat_ngram_size=2, eos_token_id=None)
    row = out[0].tolist()
    new_grams = [tuple(row[i : i + 2]) for i in range(len(prompt[0]) - 1, len(row) - 1)]
    prompt_grams = {tuple(row[i : i + 2]) for i in range(len(prompt[0]) - 1)}
    assert len(new_grams) == len(set(new_grams)) and not set(new_grams) & prompt_grams
