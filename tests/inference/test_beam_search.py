"""Beam search (switchformer.inference.beam): scoring and the three ``early_stopping`` rules against exhaustive
search over tiny vocabularies, against Hugging Face's own beam search, and degenerate sizes."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import switchformer.inference.beam as beam_module
from switchformer.inference.beam import beam_search, check_beam_arguments
from switchformer.inference.sampling import SamplingConfig

EOS, PAD, START = 1, 0, 0
LAYERS = 2


# ----------------------------------------------------------------------------- a table model


class _TableCache:
    """Each row's source id and decoder prefix; ``reorder`` as the real cache's."""

    def __init__(self, sources: list[int]):
        self.sources = sources
        self.prefixes: list[tuple[int, ...]] = [() for _ in sources]

    def reorder(self, index: torch.Tensor) -> None:
        index = index.tolist()
        self.sources = [self.sources[i] for i in index]
        self.prefixes = [self.prefixes[i] for i in index]


class TableModel:
    """A fake encoder-decoder whose next-token log-probs are a fixed random table indexed by the
    source row (the first source token) and the decoder prefix, start token included; ``fixed``
    overrides the table for given prefixes (probabilities, any source)."""

    def __init__(self, vocab: int, seed: int = 0, spread: float = 1.5, fixed: dict | None = None):
        self.vocab, self.seed, self.spread = vocab, seed, spread
        self.fixed = {prefix: torch.tensor(p).log() for prefix, p in (fixed or {}).items()}
        self.config = SimpleNamespace(decoder_start_token_id=START)
        self.table: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def logprobs(self, source: int, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix in self.fixed:
            return self.fixed[prefix]
        if (source, prefix) not in self.table:
            code = sum(t * (self.vocab + 1) ** i for i, t in enumerate(prefix)) * (self.vocab + 1) + len(prefix)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + source * 10_007 + code)
            self.table[source, prefix] = (self.spread * torch.randn(self.vocab, generator=g)).log_softmax(-1)
        return self.table[source, prefix]

    def encode(self, input_ids, attention_mask=None):
        return input_ids[:, :1].float()

    def new_cache(self, memory, attention_mask, length):
        return _TableCache([int(s) for s in memory[:, 0].tolist()])

    def decode(self, tokens, memory, attention_mask, cache):
        cache.prefixes = [p + (t,) for p, t in zip(cache.prefixes, tokens[:, 0].tolist())]
        rows = [self.logprobs(s, p) for s, p in zip(cache.sources, cache.prefixes)]
        return torch.stack(rows)[:, None]

    def project(self, h):
        return h


def score(model: TableModel, source: int, tokens: tuple[int, ...], length_penalty: float) -> float:
    """``sum_logprob / length ** length_penalty`` of new ``tokens``, as Hugging Face scores them."""
    prefix, total = (START,), 0.0
    for t in tokens:
        total += model.logprobs(source, prefix)[t].item()
        prefix += (t,)
    return total / len(tokens) ** length_penalty


def hypotheses(vocab: int, steps: int, eos: int | None = EOS):
    """Every finished hypothesis: EOS only as its last token, or ``steps`` tokens long."""
    for length in range(1, steps + 1):
        for tokens in itertools.product(range(vocab), repeat=length):
            if eos in tokens[:-1] or (length < steps and tokens[-1] != eos):
                continue
            yield tokens


def exhaustive(model, source, steps, length_penalty, eos=EOS):
    return max(hypotheses(model.vocab, steps, eos), key=lambda t: score(model, source, t, length_penalty))


def run_beams(model, sources, steps, num_beams, length_penalty, early_stopping, eos=EOS, **sampling):
    cfg = SamplingConfig(max_new_tokens=steps, eos_token_id=eos, pad_token_id=PAD, **sampling)
    ids = torch.tensor(sources)[:, None]
    return beam_search(model, ids, None, cfg, num_beams, length_penalty, early_stopping)


def new_tokens(row: torch.Tensor, eos=EOS) -> tuple[int, ...]:
    """The hypothesis of an output row: after the start token, up to and including EOS."""
    tokens = row[1:].tolist()
    return tuple(tokens[: tokens.index(eos) + 1]) if eos in tokens else tuple(tokens)


def full_length_search(monkeypatch):
    """Make every row run all ``max_new_tokens`` steps: no stopping rule at all."""
    monkeypatch.setattr(beam_module, "_row_done", lambda finished, live, *args: not live)


MODES = [False, True, "never"]
PENALTIES = [-1.0, 0.0, 0.5, 1.0, 2.0]


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- exhaustive search


@pytest.mark.parametrize("vocab,steps", [(4, 4), (5, 3)])
@pytest.mark.parametrize("early_stopping", MODES)
def test_beam_search_that_prunes_nothing_is_exhaustive_search(vocab, steps, early_stopping):
    # enough beams to keep every candidate of every step: nothing pruned, no row full before the end
    num_beams = vocab * (vocab - 1) ** (steps - 1)
    for seed in range(2):
        model = TableModel(vocab, seed)
        sources = [0, 1, 2]
        for lp in PENALTIES:
            out = run_beams(model, sources, steps, num_beams, lp, early_stopping)
            for source, row in zip(sources, out):
                best = exhaustive(model, source, steps, lp)
                got = new_tokens(row)
                assert score(model, source, got, lp) == pytest.approx(score(model, source, best, lp), abs=1e-5)
                assert got == best, (seed, lp, source)
                assert row.numel() == out.shape[1] and (row[1 + len(got) :] == PAD).all()


def test_without_eos_every_hypothesis_is_max_new_tokens_long():
    model = TableModel(4, seed=3)
    out = run_beams(model, [0, 1], 3, 64, 1.0, False, eos=None)
    assert out.shape == (2, 4)
    for source, row in zip([0, 1], out):
        assert new_tokens(row, eos=None) == exhaustive(model, source, 3, 1.0, eos=None)


def test_each_early_stopping_rule_on_a_table_where_the_best_hypothesis_is_long():
    # One beam, length_penalty 2. Step 1: EOS (p 0.45) is the best candidate and finishes with
    # score log 0.45 = -0.80; token 2 (p 0.40) stays live. After 2, EOS has p 0.88: [2, EOS] scores
    # (log 0.40 + log 0.88) / 2**2 = -0.26, the exhaustive optimum.
    model = TableModel(4, fixed={(START,): [0.10, 0.45, 0.40, 0.05], (START, 2): [0.04, 0.88, 0.04, 0.04]}, spread=0.0)
    best = exhaustive(model, 0, 3, 2.0)
    assert best == (2, EOS)
    # True: one finished hypothesis fills the one beam; stop.
    assert new_tokens(run_beams(model, [0], 3, 1, 2.0, True)[0]) == (EOS,)
    # False: the live beam at its current length, -0.92 / 1**2, does not beat -0.80; stop.
    assert new_tokens(run_beams(model, [0], 3, 1, 2.0, False)[0]) == (EOS,)
    # "never": the live beam could still score -0.92 / 3**2 = -0.10 at max_new_tokens; go on.
    assert new_tokens(run_beams(model, [0], 3, 1, 2.0, "never")[0]) == best
    # With length_penalty <= 0, False is exact: a longer hypothesis can only score lower.
    for lp in (0.0, -1.0):
        assert new_tokens(run_beams(model, [0], 3, 1, lp, False)[0]) == exhaustive(model, 0, 3, lp) == (EOS,)


def test_never_is_the_full_length_search_and_false_and_true_stop_no_later(monkeypatch):
    vocab, steps, sources = 5, 4, list(range(6))
    results = {}
    for seed, num_beams, lp in itertools.product(range(3), (1, 2, 3), PENALTIES):
        model = TableModel(vocab, seed, spread=1.0)
        for mode in MODES:
            results[seed, num_beams, lp, mode] = run_beams(model, sources, steps, num_beams, lp, mode)
    with monkeypatch.context() as patch:
        full_length_search(patch)
        for seed, num_beams, lp in itertools.product(range(3), (1, 2, 3), PENALTIES):
            results[seed, num_beams, lp, "full"] = run_beams(
                TableModel(vocab, seed, spread=1.0), sources, steps, num_beams, lp, False
            )
    differs = {"heuristic": 0, "true": 0}
    for seed, num_beams, lp in itertools.product(range(3), (1, 2, 3), PENALTIES):
        model = TableModel(vocab, seed, spread=1.0)
        got = {mode: results[seed, num_beams, lp, mode] for mode in [*MODES, "full"]}
        assert torch.equal(got["never"], got["full"]), (seed, num_beams, lp)
        if lp <= 0:
            assert torch.equal(got[False], got["full"]), (seed, num_beams, lp)  # exact for lp <= 0
        for source, *rows in zip(sources, got[True], got[False], got["never"]):
            s_true, s_false, s_never = (score(model, source, new_tokens(r), lp) for r in rows)
            optimum = score(model, source, exhaustive(model, source, steps, lp), lp)
            # each rule takes a superset of the finished hypotheses of the one before
            assert s_true <= s_false + 1e-6 and s_false <= s_never + 1e-6 and s_never <= optimum + 1e-6
            differs["heuristic"] += s_false < s_never - 1e-6
            differs["true"] += s_true < s_false - 1e-6
    assert differs["heuristic"] > 0 and differs["true"] > 0  # the rules do differ on these tables


def test_more_beams_than_the_vocabulary_leaves_beams_empty():
    model = TableModel(3, seed=1)
    out = run_beams(model, [0, 1], 3, 10, 1.0, "never")
    for source, row in zip([0, 1], out):
        assert new_tokens(row) == exhaustive(model, source, 3, 1.0)
    # a vocabulary of EOS alone: every beam finishes at the first step
    out = run_beams(TableModel(2, seed=0, fixed={(START,): [0.0, 1.0]}), [0], 3, 4, 1.0, False, eos=1)
    assert out.tolist() == [[START, EOS]]


# ----------------------------------------------------------------------------- degenerate sizes


def test_zero_new_tokens_and_an_empty_batch_give_the_start_tokens():
    model = TableModel(4)
    assert run_beams(model, [0, 1], 0, 3, 1.0, False).tolist() == [[START], [START]]
    cfg = SamplingConfig(max_new_tokens=5, eos_token_id=EOS)
    assert beam_search(model, torch.zeros(0, 4, dtype=torch.long), None, cfg, 3).shape == (0, 1)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=-2), "num_beams"),
        (dict(num_beams=2.5), "num_beams"),
        (dict(num_beams=True), "num_beams"),
        (dict(length_penalty=math.nan), "length_penalty"),
        (dict(length_penalty=math.inf), "length_penalty"),
        (dict(length_penalty="1"), "length_penalty"),
        (dict(early_stopping="always"), "early_stopping"),
        (dict(early_stopping=None), "early_stopping"),
        (dict(early_stopping=1), "early_stopping"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    args = dict(num_beams=2, length_penalty=1.0, early_stopping=False) | kwargs
    with pytest.raises(ValueError, match=name):
        check_beam_arguments(**args)
    with pytest.raises(ValueError, match=name):
        run_beams(TableModel(4), [0], 3, args["num_beams"], args["length_penalty"], args["early_stopping"])


def test_sampling_is_refused():
    with pytest.raises(ValueError, match="do_sample"):
        run_beams(TableModel(4), [0], 3, 2, 1.0, False, do_sample=True)


# ----------------------------------------------------------------------------- through the model


def tiny_t5(**overrides):
    from switchformer import SwitchT5, SwitchT5Config

    torch.manual_seed(0)
    config = dict(vocab_size=16, d_model=16, d_kv=4, d_ff=16, num_heads=2, num_layers=1, num_decoder_layers=1)
    config.update(
        dropout_rate=0.0,
        num_experts=2,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        decoder_start_token_id=START,
        **overrides,
    )
    return SwitchT5(SwitchT5Config(**config)).eval()


def test_generate_validates_and_passes_early_stopping():
    model = tiny_t5()
    ids = torch.randint(2, 16, (2, 5))
    assert model.generate(ids, max_new_tokens=0, num_beams=3).tolist() == [[START], [START]]
    assert model.generate(ids, max_new_tokens=4, num_beams=40).shape[0] == 2  # beams beyond the vocabulary
    for mode in MODES:
        assert model.generate(ids, max_new_tokens=4, num_beams=2, early_stopping=mode).shape[0] == 2
    with pytest.raises(ValueError, match="early_stopping"):
        model.generate(ids, max_new_tokens=4, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="early_stopping"):  # also where no beam search runs
        model.generate(ids, max_new_tokens=4, early_stopping="sometimes")
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, max_new_tokens=4, num_beams=0)
    with pytest.raises(ValueError, match="length_penalty"):
        model.generate(ids, max_new_tokens=4, num_beams=2, length_penalty=math.nan)
    with pytest.raises(ValueError, match="streamer"):
        model.generate(ids, max_new_tokens=4, num_beams=2, streamer=print)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=True)


# ----------------------------------------------------------------------------- against Hugging Face


def hf_model(kind: str, seed: int):
    """A tiny Hugging Face model over 8 tokens whose EOS competes with the other tokens."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    shape = dict(vocab_size=8, d_model=16, d_kv=4, d_ff=16, num_heads=2, num_layers=LAYERS, num_decoder_layers=LAYERS)
    shape.update(dropout_rate=0.0, decoder_start_token_id=START, tie_word_embeddings=False)
    if kind == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(feed_forward_proj="gated-gelu", **shape))
    else:
        config = transformers.SwitchTransformersConfig(
            num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=3, **shape
        )
        config.router_jitter_noise = 0.0
        model = transformers.SwitchTransformersForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, 0.3)
        model.lm_head.weight[EOS] += 3.0 * model.lm_head.weight[2:].mean(0)
        model.decoder.final_layer_norm.weight.fill_(1.0)
        for stack in (model.encoder, model.decoder):  # switchformer shares one embedding matrix
            stack.embed_tokens.weight.copy_(model.shared.weight)
    return model.eval()


def hf_tokens(out: torch.Tensor) -> torch.Tensor:
    """Hugging Face fills after EOS with EOS where ``pad_token_id`` is 0; switchformer with pad."""
    out = out.clone()
    for row in out:
        ends = (row[1:] == EOS).nonzero()
        if len(ends):
            row[2 + ends[0, 0] :] = PAD
    return out


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["t5", "switch"])
def test_same_tokens_as_hugging_face(kind):
    from switchformer.interop.hf import from_hf

    differs = {"heuristic": 0, "true": 0}
    for seed in range(2):
        hf = hf_model(kind, seed)
        ours = from_hf(hf).eval()
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, 8, (10, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        mask[4, -3:] = 0
        cases = [(2, 1.0, 1.0), (3, 2.0, 1.0), (2, 3.0, 1.0), (3, -1.0, 1.0), (3, 1.0, 1.3)]
        for num_beams, lp, rp in cases:
            got = {}
            for mode in MODES:
                kwargs = dict(num_beams=num_beams, length_penalty=lp, early_stopping=mode, repetition_penalty=rp)
                want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, **kwargs)
                got[mode] = ours.generate(ids, mask, max_new_tokens=7, **kwargs)
                assert torch.equal(got[mode], hf_tokens(want)), (seed, num_beams, lp, rp, mode)
            differs["heuristic"] += not torch.equal(got[False], got["never"])
            differs["true"] += not torch.equal(got[False], got[True])
    assert differs["heuristic"] > 0 and differs["true"] > 0


@pytest.mark.parametrize("kind", ["t5", "switch"])
def test_no_repeat_ngram_size_gives_hugging_faces_tokens_greedy_and_beams(kind):
    """``no_repeat_ngram_size`` bans, at each step, every token that would complete an n-gram the
    row already holds (decoder start token included, as Hugging Face counts it): greedy and beam
    search give Hugging Face's tokens, and on these looping random models the ban changes them."""
    from switchformer.interop.hf import from_hf

    changed = 0
    for seed in range(2):
        hf = hf_model(kind, seed)
        ours = from_hf(hf).eval()
        ids = torch.randint(2, 8, (6, 5), generator=torch.Generator().manual_seed(seed))
        for num_beams, n in [(1, 1), (1, 2), (1, 3), (3, 2), (2, 3)]:
            kwargs = dict(num_beams=num_beams, no_repeat_ngram_size=n, max_new_tokens=9)
            want = hf.generate(input_ids=ids, do_sample=False, **kwargs)
            got = ours.generate(ids, **kwargs)
            assert torch.equal(got, hf_tokens(want)), (seed, num_beams, n)
            changed += not torch.equal(got, ours.generate(ids, num_beams=num_beams, max_new_tokens=9))
    assert changed >= 5
