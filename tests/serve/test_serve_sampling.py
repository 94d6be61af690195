"""One request's decoding pieces against plain references: the text stream with stop strings
(property: the pieces sent add up to the text cut where the first stop string to be complete
begins, and no stop string is ever sent), OpenAI's additive penalties, and the engine's
cache layout (a row's keys stay right-aligned and its own across shifts)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from switchformer.serve.sampling import RowSampler, SamplingParams, TextStream


class CharTokenizer:
    """Token i is the i-th character of a fixed alphabet (decoding is joining)."""

    alphabet = "abc d\n"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids)


texts = st.text(alphabet=CharTokenizer.alphabet, min_size=0, max_size=40)
stops = st.lists(st.text(alphabet=CharTokenizer.alphabet, min_size=1, max_size=4), max_size=4)


@settings(max_examples=300, deadline=None)
@given(texts, stops)
def test_streamed_pieces_add_up_to_the_text_cut_at_the_first_stop(text, stop):
    stream = TextStream(CharTokenizer(), stop)
    sent = []
    for ch in text:
        sent.append(stream.add(CharTokenizer.alphabet.index(ch)))
        # never sent: anything at or after a stop string's start
        assert not any(s in "".join(sent) for s in stop)
        if stream.stopped:
            break
    sent.append(stream.finish())
    want, stopped = text, False
    for end in range(1, len(text) + 1):  # the first stop string to be complete, as tokens come
        found = [i for s in stop if (i := text[:end].find(s)) >= 0]
        if found:
            want, stopped = text[: min(found)], True
            break
    assert "".join(sent) == want
    assert stream.stopped == stopped


def test_an_incomplete_character_is_held_back_then_given_as_the_decoder_gives_it():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["plain text"], trainers.BpeTrainer(vocab_size=300,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    ids = tok.encode("ü").ids  # two byte tokens
    assert len(ids) == 2
    stream = TextStream(tok, [])
    assert stream.add(ids[0]) == ""  # half a character: nothing yet
    assert stream.add(ids[1]) == "ü"
    stream = TextStream(tok, [])
    stream.add(ids[0])
    assert stream.finish() == tok.decode(ids[:1])  # the request ended there: what the decoder says


def naive_penalised(logits, generated, presence, frequency):
    out = logits.clone()
    for token in set(generated):
        out[token] -= presence + frequency * generated.count(token)
    return out


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.7), (1.5, -0.4)])
def test_presence_and_frequency_penalties_as_openai_defines_them(presence, frequency):
    torch.manual_seed(0)
    logits = torch.randn(50)
    generated = [3, 7, 7, 9, 3, 3]
    params = SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency)
    sampler = RowSampler(params, [], "cpu")
    for t in generated:
        sampler.record(t)
    want = int(naive_penalised(logits, generated, presence, frequency).argmax())
    # make the penalised tokens the unpenalised favourites, so the penalty decides
    boosted = logits.clone()
    boosted[[3, 7, 9]] += 2.0
    want = int(naive_penalised(boosted, generated, presence, frequency).argmax())
    assert sampler.choose(boosted).token == want


def test_greedy_logprobs_and_alternatives():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    choice = RowSampler(SamplingParams(temperature=0, logprobs=2), [], "cpu").choose(logits)
    reference = torch.log_softmax(logits, -1)
    assert choice.token == 1 and choice.logprob == pytest.approx(float(reference[1]))
    assert [t for t, _ in choice.top] == [1, 2]


def test_cache_shifts_keep_each_rows_keys():
    """Batch bookkeeping alone: rows placed with different prompt lengths, shifted left when the
    columns run out and right by a longer prompt, and moved when a row leaves, keep their keys in
    order and right-aligned at the shared column."""
    from switchformer.serve.batch import Batch

    batch = Batch(slots=3, columns=8, self_kv=[torch.zeros(3, 1, 8, 1)], device="cpu")

    def keys(slot):
        valid = batch.key_valid[slot, : batch.length]
        assert valid[-1] and (valid.long().diff() >= 0).all()  # contiguous, ending at the shared column
        return batch.self_kv[0][slot, 0, : batch.length, 0][valid].tolist()

    def step(values):
        batch.make_room()
        n = len(batch.rows)
        batch.self_kv[0][:n, 0, batch.length, 0] = torch.tensor(values)
        batch.key_valid[:n, batch.length] = True
        batch.length += 1

    batch.place([torch.tensor([[[1.0], [2.0], [3.0]]])])
    batch.rows.append("a")
    batch.place([torch.tensor([[[5.0]]])])
    batch.rows.append("b")
    assert batch.length == 3 and keys(0) == [1.0, 2.0, 3.0] and keys(1) == [5.0]
    for i in range(3):
        step([10.0 + i, 20.0 + i])
    assert keys(0) == [1.0, 2.0, 3.0, 10.0, 11.0, 12.0] and keys(1) == [5.0, 20.0, 21.0, 22.0]
    batch.remove(0)  # a finished: b takes slot 0
    assert batch.rows == ["b"] and keys(0) == [5.0, 20.0, 21.0, 22.0]
    step([23.0])
    step([24.0])
    assert batch.length == 8
    batch.make_room()  # every column taken: shift left by the padding b has
    assert batch.length == 6 and keys(0) == [5.0, 20.0, 21.0, 22.0, 23.0, 24.0]
    batch.place([torch.arange(7.0).view(1, 7, 1)])  # a longer prompt: b shifts right
    batch.rows.append("c")
    assert batch.length == 7 and keys(0) == [5.0, 20.0, 21.0, 22.0, 23.0, 24.0] and keys(1) == list(range(7))


def test_an_engine_whose_columns_cannot_hold_a_request_is_refused():
    from serve_helpers import tiny_lm, tokenizer

    from switchformer.serve.engine import Engine

    with pytest.raises(ValueError, match="columns: 48 must exceed max_request_tokens=64"):
        Engine(tiny_lm(), tokenizer(), max_request_tokens=64, columns=48)
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(tiny_lm(), tokenizer(), max_request_tokens=64, max_batch_size=0)


def test_the_engine_refuses_a_request_its_cache_cannot_hold():
    from serve_helpers import tiny_lm, tiny_t5, tokenizer

    from switchformer.serve.engine import Engine, Request
    from switchformer.serve.sampling import SamplingParams

    def request(prompt, max_tokens):
        return Request([5] * prompt, SamplingParams(max_tokens=max_tokens), lambda *a: None)

    lm = Engine(tiny_lm(), tokenizer(), max_request_tokens=64)
    with pytest.raises(ValueError, match="max_request_tokens=64"):
        lm.submit(request(60, 5))
    lm.submit(request(60, 4))  # exactly fits (not started: it only waits)
    t5 = Engine(tiny_t5(), tokenizer(), max_request_tokens=17, max_source_tokens=32)
    with pytest.raises(ValueError, match="max_source_tokens=32"):
        t5.submit(request(33, 4))
    with pytest.raises(ValueError, match="max_request_tokens=17"):
        t5.submit(request(8, 17))
    with pytest.raises(ValueError, match="needs a prompt"):
        t5.submit(request(0, 4))
