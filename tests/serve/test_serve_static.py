"""``serve --cache static``: the continuous-batching engine stepping the running rows with the
model's static ``decode_step`` (fixed shapes per power-of-two row count, idle slots routed nowhere)
gives every request what ``generate`` gives it alone, counts each expert's tokens as the growing
step does, and refuses a model it cannot run before serving."""

from __future__ import annotations

import concurrent.futures

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'switchformer[serve]'")
pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")

import httpx  # noqa: E402
from serve_helpers import client, make_app, reference_lm, reference_t5, serving, tiny_lm, tiny_t5, tokenizer  # noqa: E402

from switchformer.moe.offload import StoredExperts  # noqa: E402
from switchformer.serve.engine import Engine  # noqa: E402
from switchformer.serve.protocol import Limits  # noqa: E402

pytestmark = pytest.mark.timeout(180)

PROMPTS = [
    "the cat", "a dog sat on the mat", "green", "the big red house by the river", "sun", "a small tree",
    "moon ran fast", "the dog", "blue river house", "a cat sat", "the sun and the moon", "red",
    "big small big small", "tree house", "the slow dog ran on the mat by the green tree", "river",
]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _concurrently(fn, items, workers=16):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def expert_totals(metrics: str) -> dict[str, float]:
    layers: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("switchformer_expert_tokens_total{"):
            layer = line.split('layer="')[1].split('"')[0]
            layers[layer] = layers.get(layer, 0) + float(line.rsplit(" ", 1)[1])
    return layers


def test_sixteen_concurrent_requests_through_the_static_step_equal_generate_alone(tok):
    # six slots for sixteen requests of different lengths, columns short enough that rows shift: the
    # static step runs at 1, 2, 4 and 8 rows (capped at 6) with idle slots among them
    lm = tiny_lm()
    app, engine = make_app(lm, tok, max_batch_size=6, limits=Limits(60, 60, 64), max_request_tokens=64, columns=80,
                           cache="static")  # fmt: skip
    with serving(app) as url:
        c = client(url)

        def ask(i):
            kwargs = dict(model="tiny", prompt=PROMPTS[i], max_tokens=5 + 3 * i, temperature=0)
            if i % 2:
                return "".join(p.choices[0].text for p in c.completions.create(stream=True, **kwargs) if p.choices)
            return c.completions.create(**kwargs)

        got = _concurrently(ask, range(16))
    for i, out in enumerate(got):
        text = out if isinstance(out, str) else out.choices[0].text
        assert text == reference_lm(lm, tok, PROMPTS[i], 5 + 3 * i)[0], f"request {i}"
    assert sorted(engine.batch._static_caches) == [1, 2, 4, 6]  # the row counts the step ran at


def test_metrics_of_the_static_step_count_only_the_running_rows(tok):
    # dropless: each layer's counts add up to the prompts' tokens plus every generated token but the
    # last of each request, exactly as the growing step's (idle slots count nothing)
    lm = tiny_lm()
    app, _ = make_app(lm, tok, routing="dropless", cache="static")
    with serving(app) as url:
        c = client(url)
        usages = _concurrently(
            lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).usage, PROMPTS[:5]
        )
        totals = expert_totals(httpx.get(url + "/metrics", timeout=30).text)
    fed = sum(u.prompt_tokens + u.completion_tokens - 1 for u in usages)
    assert totals == {"layers.0": fed, "layers.1": fed}


def test_an_encoder_decoder_under_load_through_the_static_step_equals_generate_alone(tok):
    model = tiny_t5()
    app, engine = make_app(model, tok, max_batch_size=5, limits=Limits(64, 36, None), columns=40, cache="static")
    with serving(app) as url:
        c = client(url)
        got = _concurrently(
            lambda i: c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=4 + 2 * i, temperature=0),
            range(16),
        )
    for i, out in enumerate(got):
        want, count = reference_t5(model, tok, PROMPTS[i], 4 + 2 * i)
        assert out.choices[0].text == want, f"request {i}"
        assert out.usage.completion_tokens == count
    assert 5 in engine.batch._static_caches  # five slots: the step's largest row count is five, not eight


def test_the_row_counts_are_powers_of_two_up_to_the_slots(tok):
    engine = Engine(tiny_lm(), tok, max_batch_size=12, max_request_tokens=64, cache="static")
    assert [engine.batch.static_rows(n) for n in range(1, 13)] == [1, 2, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12]


def test_a_model_the_static_step_cannot_run_is_refused_before_serving(tok):
    lm = tiny_lm()
    layer = lm.blocks[0].ffn.mlp
    experts = layer.experts
    layer.experts = StoredExperts(4, 64, 128, experts.activation, lambda e: (experts.w_in[e], experts.w_out[e]),
                                  dtype=experts.w_in.dtype, quantize=True)  # fmt: skip
    message = r"static decoding needs every expert resident .*; int8-stored experts \(--dtype int8\) .*--cache dynamic"
    with pytest.raises(ValueError, match=message):
        Engine(lm, tok, max_request_tokens=64, cache="static")
    with pytest.raises(ValueError, match="compile: only the static decoding step compiles whole"):
        Engine(tiny_lm(), tok, max_request_tokens=64, compile=True)


def test_a_static_step_that_fails_is_dropped_once_and_the_growing_cache_answers(tok, caplog):
    # the step raising (a compile error, an out-of-memory) must not cost a request nor be retried at
    # every step: one logged failure, then the growing cache's tokens
    lm = tiny_lm()
    app, engine = make_app(lm, tok, max_batch_size=4, limits=Limits(60, 60, 64), max_request_tokens=64, cache="static")
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no graph for you")

    engine.static_step = failing_step
    with caplog.at_level("ERROR", logger="switchformer"), serving(app) as url:
        c = client(url)
        got = _concurrently(
            lambda i: c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=6, temperature=0), range(4)
        )
    for i, out in enumerate(got):
        assert out.choices[0].text == reference_lm(lm, tok, PROMPTS[i], 6)[0], f"request {i}"
    assert len(calls) == 1 and engine.static_step is None
    assert sum("static decoding step failed" in r.getMessage() for r in caplog.records) == 1
