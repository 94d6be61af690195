"""The OpenAI-compatible server through the real ``openai`` client and raw HTTP on 127.0.0.1:
results equal ``generate`` alone under load, streams, disconnects, every bad request's status and
error shape, a failing request alone, timeouts, queue limits, metrics, shutdown."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'switchformer[serve]'")
pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")

import httpx  # noqa: E402
import openai  # noqa: E402
from serve_helpers import (  # noqa: E402
    client,
    make_app,
    reference_lm,
    reference_t5,
    serving,
    tiny_lm,
    tiny_t5,
    tokenizer,
)

from switchformer.serve.protocol import Limits  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PROMPTS = [
    "the cat", "a dog sat on the mat", "green", "the big red house by the river", "sun", "a small tree",
    "moon ran fast", "the dog", "blue river house", "a cat sat", "the sun and the moon", "red",
    "big small big small", "tree house", "the slow dog ran on the mat by the green tree", "river",
]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def lm_server(lm, tok):
    # few slots, and columns between one request's longest and twice it: queueing and shifts
    app, engine = make_app(lm, tok, max_batch_size=6, limits=Limits(60, 60, 64), max_request_tokens=64, columns=80)
    with serving(app) as url:
        yield url, engine


def _concurrently(fn, items, workers=16):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


# ----------------------------------------------------------------------------- results


def test_completions_and_chat_through_the_openai_client(lm_server, lm, tok):
    url, _ = lm_server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    want, count = reference_lm(lm, tok, "the cat", 12)
    out = c.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    assert out.choices[0].text == want
    assert out.usage.completion_tokens == count and out.usage.prompt_tokens == len(tok.encode("the cat").ids)
    assert out.choices[0].finish_reason == ("stop" if count < 12 else out.choices[0].finish_reason)
    pieces = list(c.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want
    assert pieces[-1].choices[0].finish_reason in ("length", "stop")

    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                     temperature=0)  # fmt: skip
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 10
    chunks = list(c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens  # the usage chunk comes last


def test_sixteen_concurrent_greedy_requests_equal_generate_alone(lm_server, lm, tok):
    """Different prompt lengths and lengths asked, six slots for sixteen requests: each result is
    exactly what generate gives the request alone, streamed or not."""
    url, engine = lm_server
    c = client(url)
    steps_before = engine.stats.steps

    def ask(i):
        kwargs = dict(model="tiny", prompt=PROMPTS[i], max_tokens=5 + 3 * i, temperature=0)
        if i % 2:
            return "".join(p.choices[0].text for p in c.completions.create(stream=True, **kwargs) if p.choices)
        return c.completions.create(**kwargs).choices[0].text

    got = _concurrently(ask, range(16))
    for i, text in enumerate(got):
        assert text == reference_lm(lm, tok, PROMPTS[i], 5 + 3 * i)[0], f"request {i}"
    assert engine.stats.steps - steps_before < sum(5 + 3 * i for i in range(16))  # steps were shared


def test_encoder_decoder_under_load_equals_generate_alone(tok):
    model = tiny_t5()
    app, engine = make_app(model, tok, max_batch_size=5, limits=Limits(64, 36, None), columns=40)
    with serving(app) as url:
        c = client(url)

        def ask(i):
            return c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=4 + 2 * i, temperature=0)

        got = _concurrently(ask, range(16))
    for i, out in enumerate(got):
        want, count = reference_t5(model, tok, PROMPTS[i], 4 + 2 * i)
        assert out.choices[0].text == want, f"request {i}"
        assert out.usage.completion_tokens == count


def test_seeded_sampling_is_reproducible_and_differs_between_seeds(lm_server):
    url, _ = lm_server
    c = client(url)

    def sample(seed):
        out = c.completions.create(model="tiny", prompt="the", max_tokens=20, temperature=1.0, seed=seed)
        return out.choices[0].text

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(4)}) > 1


def test_a_tiny_temperature_is_greedy_not_nan(lm_server, lm, tok):
    url, _ = lm_server
    out = client(url).completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=1e-40)
    assert out.choices[0].text == reference_lm(lm, tok, "the cat", 8)[0]


def test_stop_strings_cut_the_text_streamed_or_not(lm_server, lm, tok):
    url, _ = lm_server
    c = client(url)
    full = reference_lm(lm, tok, "a dog sat on the mat", 40)[0]
    stop = full[5:8]
    want = full[: full.index(stop)]
    out = c.completions.create(model="tiny", prompt="a dog sat on the mat", max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    streamed = c.completions.create(
        model="tiny", prompt="a dog sat on the mat", max_tokens=40, temperature=0, stop=stop, stream=True
    )
    assert "".join(p.choices[0].text for p in streamed if p.choices) == want


def test_logprobs_are_the_models_log_probabilities(lm_server, lm, tok):
    import torch

    url, _ = lm_server
    out = httpx.post(url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "temperature": 0,
                                                    "logprobs": 2}, timeout=30).json()  # fmt: skip
    lp = out["choices"][0]["logprobs"]
    ids = tok.encode("the cat").ids
    with torch.no_grad():
        first = torch.log_softmax(lm(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert lp["token_logprobs"][0] == pytest.approx(float(first.max()), abs=1e-4)
    assert len(lp["top_logprobs"][0]) == 2 and lp["text_offset"][0] == 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{bad json", 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        (b"[" * 100_000, 400, None),
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"prompt": [1, 2, 99999]}, 400, "prompt"),
        ({"prompt": "the", "max_tokens": "x"}, 400, "max_tokens"),
        ({"prompt": "the", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "the", "max_tokens": 101}, 400, "max_tokens"),
        ({"prompt": "the", "max_tokens": True}, 400, "max_tokens"),
        ({"prompt": "the", "temperature": 2.5}, 400, "temperature"),
        ({"prompt": "the", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "the", "top_p": 0}, 400, "top_p"),
        ({"prompt": "the", "n": 2}, 400, "n"),
        ({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "the", "stop": 5}, 400, "stop"),
        ({"prompt": "the", "logprobs": 6}, 400, "logprobs"),
        ({"prompt": "the", "stream": "yes"}, 400, "stream"),
        ({"prompt": "the", "presence_penalty": 3}, 400, "presence_penalty"),
        ({"prompt": "the " * 120}, 400, "prompt"),
        ({"prompt": "the " * 30, "max_tokens": 100}, 400, "max_tokens"),
        ({"prompt": "the", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "the", "model": 5}, 400, "model"),
        ({"prompt": "a \ud800 b"}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [1.5]}, 400, "prompt"),
        ({"prompt": "the", "seed": 2**64}, 400, "seed"),
        ({"prompt": "the", "seed": 1e300}, 400, "seed"),
        ({"prompt": "the", "logit_bias": {"5": 10}}, 400, "logit_bias"),
        ({"prompt": "the", "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"prompt": "the", "suffix": "end"}, 400, "suffix"),
    ],
)
def test_bad_completion_requests_get_their_status_and_an_openai_error(lm_server, body, status, param):
    url, _ = lm_server
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # json escapes a lone surrogate
    r = httpx.post(url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if param:
        assert error["message"].startswith(param)


@pytest.mark.parametrize(
    "messages, fragment",
    [(None, "messages"), ([], "messages"), ([{"role": "bot", "content": "x"}], "role"),
     ([{"role": "user", "content": 5}], "content"), ("hello", "messages"),
     ([{"role": "user", "content": "a \ud800"}], "not valid Unicode")],
)  # fmt: skip
def test_bad_chat_requests_name_the_field(lm_server, messages, fragment):
    url, _ = lm_server
    body = {} if messages is None else {"messages": messages}
    r = httpx.post(url + "/v1/chat/completions", content=json.dumps(body), timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("messages") and fragment in r.json()["error"]["message"]


def test_an_oversized_body_is_413_and_the_server_goes_on(lm_server):
    url, _ = lm_server
    big = json.dumps({"prompt": "the " * (1 << 20)}).encode()  # 4 MiB of prompt
    r = httpx.post(url + "/v1/completions", content=big, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(8):
            yield b"x" * (1 << 20)

    r = httpx.post(url + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413
    assert httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=30).status_code == 200


def test_unknown_fields_are_ignored_and_the_openai_client_sees_errors(lm_server):
    url, _ = lm_server
    r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 2, "user": "x", "whatever": [1]},
                   timeout=30)  # fmt: skip
    assert r.status_code == 200
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).completions.create(model="tiny", prompt="the", max_tokens=10_000)
    assert caught.value.status_code == 400 and "max_tokens" in str(caught.value)
    assert httpx.get(url + "/v1/nothing", timeout=30).json()["error"]["message"].startswith("GET /v1/nothing")


def test_api_key(lm, tok):
    app, _ = make_app(lm, tok, api_key="s3cret")
    with serving(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").completions.create(model="tiny", prompt="the", max_tokens=2)
        r = httpx.post(url + "/v1/completions", json={"prompt": "the"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client(url, api_key="s3cret").completions.create(model="tiny", prompt="the", max_tokens=2).choices
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # health and the page stay open
        assert httpx.get(url + "/", timeout=30).status_code == 200


# ----------------------------------------------------------------------------- load and failures


def _slow(engine, seconds):
    """Every sampled (non plain-greedy) token of every request takes ``seconds`` longer."""
    engine.fault_hook = lambda request: time.sleep(seconds)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(lm, tok):
    app, engine = make_app(lm, tok)
    _slow(engine, 0.02)
    with serving(app) as url:
        body = {"prompt": "the", "max_tokens": 100, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert engine.running() == 1
        deadline = time.monotonic() + 5
        while engine.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running() == 0 and engine.stats.requests_finished["cancelled"] == 1
        assert engine.stats.generation_tokens < 100
        engine.fault_hook = None
        assert client(url).completions.create(model="tiny", prompt="the", max_tokens=3).choices  # still serving


def test_a_client_that_leaves_a_non_streamed_request_frees_its_slot(lm, tok):
    app, engine = make_app(lm, tok)
    _slow(engine, 0.01)  # 100 tokens a second: faster than the server's half-second wait, so tokens keep coming
    with serving(app) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 100, "temperature": 1.0},
                       timeout=0.3)  # fmt: skip
        deadline = time.monotonic() + 5
        while engine.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running() == 0 and engine.stats.requests_finished["cancelled"] == 1
        assert engine.stats.generation_tokens < 100


def test_echo_and_its_logprob_offsets(lm_server, lm, tok):
    url, _ = lm_server
    out = httpx.post(url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "temperature": 0,
                                                    "echo": True, "logprobs": 1}, timeout=30).json()  # fmt: skip
    choice = out["choices"][0]
    want = reference_lm(lm, tok, "the cat", 3)[0]
    assert choice["text"] == "the cat" + want
    offsets, tokens = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
    assert offsets[0] == len("the cat") and offsets == sorted(offsets)
    for offset, token in zip(offsets, tokens):  # each token's text where its offset says (special ones write none)
        if tok.token_to_id(token) is None or token not in ("<pad>", "</s>", "<unk>") and not token.startswith("<extra"):
            assert choice["text"][offset : offset + len(token)] == token


@pytest.mark.slow
def test_a_model_by_its_id_and_the_busy_servers_retry_after(lm, tok):
    app, engine = make_app(lm, tok, max_batch_size=1, max_queue=0)
    _slow(engine, 0.05)
    with serving(app) as url:
        assert client(url).models.retrieve("tiny").id == "tiny"
        assert httpx.get(url + "/v1/models/other", timeout=30).status_code == 404
        body = {"prompt": "the", "max_tokens": 40, "temperature": 1.0}

        def post(_):
            r = httpx.post(url + "/v1/completions", json=body, timeout=30)
            return r.status_code, r.headers.get("retry-after")

        results = _concurrently(post, range(3), workers=3)
        assert (429, "1") in results, results


def test_shutdown_ends_every_stream_cleanly(lm, tok):
    """The drain the shutdown signal starts: at its deadline every running and waiting request
    gets an ending (an error event and [DONE] in a stream, a 503 otherwise), not a cut connection."""
    app, engine = make_app(lm, tok, max_batch_size=2)
    _slow(engine, 0.02)
    with serving(app) as url:
        def stream(_):
            body = {"prompt": "the", "max_tokens": 100, "temperature": 1.0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                return [line for line in r.iter_lines() if line.startswith("data: ")]

        def plain(_):
            r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 100, "temperature": 1.0},
                           timeout=30)  # fmt: skip
            return r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            streams = [pool.submit(stream, i) for i in range(3)]
            plains = [pool.submit(plain, i) for i in range(2)]
            time.sleep(0.3)
            engine.drain(0.2)
            for f in streams:
                lines = f.result(timeout=20)
                assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2], lines[-2:]
            for f in plains:
                status, body = f.result(timeout=20)
                assert status == 503 and "shutting down" in body["error"]["message"]
        assert httpx.get(url + "/health", timeout=30).status_code == 503  # draining: no longer healthy


def test_a_failure_inside_one_request_spares_the_others(lm, tok):
    app, engine = make_app(lm, tok)

    def fail(request):
        if request.params.seed == 666:
            raise RuntimeError("injected")

    engine.fault_hook = fail
    with serving(app) as url:
        c = client(url)

        def ask(seed):
            try:
                return c.completions.create(model="tiny", prompt="the cat", max_tokens=8, seed=seed).choices[0].text
            except openai.InternalServerError as err:
                return err

        results = _concurrently(ask, [1, 2, 666, 3, 4])
        assert isinstance(results[2], openai.InternalServerError) and "injected" in str(results[2])
        assert all(isinstance(r, str) for i, r in enumerate(results) if i != 2)
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"


@pytest.mark.slow
def test_a_full_queue_is_429_and_a_late_request_408(lm, tok):
    app, engine = make_app(lm, tok, max_batch_size=1, max_queue=1, request_timeout=1.0)
    _slow(engine, 0.05)
    with serving(app) as url:
        body = {"prompt": "the", "max_tokens": 60, "temperature": 1.0}

        def post(_):
            return httpx.post(url + "/v1/completions", json=body, timeout=30).status_code

        statuses = _concurrently(post, range(4), workers=4)
        assert statuses.count(429) >= 1, statuses  # one running, one waiting: the rest are refused
        assert 408 in statuses, statuses  # 60 slow tokens do not fit in the 1 s a request may take
        engine.fault_hook = None
        after = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=30)
        assert after.status_code == 200


@pytest.mark.slow
def test_bounded_load_loses_nothing_and_memory_stays_flat(lm, tok):
    """192 requests from 16 clients, loopback only, within the test's time limit: every one
    answered in full, no error, and the process's resident memory after the second half within
    a few MB of after the first."""
    psutil = pytest.importorskip("psutil", reason="psutil measures resident memory")
    app, engine = make_app(lm, tok)
    process = psutil.Process()
    with serving(app) as url:
        c = client(url)

        def ask(i):
            out = c.completions.create(model="tiny", prompt=PROMPTS[i % 16], max_tokens=16, temperature=0)
            return out.usage.completion_tokens

        assert len(_concurrently(ask, range(96))) == 96
        first = process.memory_info().rss
        counts = _concurrently(ask, range(96))
        second = process.memory_info().rss
    assert len(counts) == 96 and all(1 <= n <= 16 for n in counts)
    assert engine.stats.requests_finished["error"] == 0
    assert second - first < 32 * 2**20, f"resident memory grew by {(second - first) / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- metrics, shutdown


def test_metrics_count_each_experts_tokens(lm, tok):
    """Dropless routing: every token of a prompt and every token fed back to the model goes to one
    expert of each Switch layer, so each layer's counts add up to the prompts' tokens plus the
    generated tokens but the last of each request."""
    app, engine = make_app(lm, tok, routing="dropless")
    with serving(app) as url:
        c = client(url)
        usages = [c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).usage for p in PROMPTS[:4]]
        text = httpx.get(url + "/metrics", timeout=30).text
    fed = sum(u.prompt_tokens + u.completion_tokens - 1 for u in usages)
    layers = {}
    for line in text.splitlines():
        if line.startswith("switchformer_expert_tokens_total{"):
            layer = line.split('layer="')[1].split('"')[0]
            layers[layer] = layers.get(layer, 0) + float(line.rsplit(" ", 1)[1])
    assert set(layers) == {"layers.0", "layers.1"} and all(v == fed for v in layers.values()), (layers, fed)
    lines = text.splitlines()
    shares = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("switchformer_expert_token_share{")]
    assert sum(shares) == pytest.approx(2.0)
    names = [
        "switchformer_queue_length", "switchformer_running_requests", "switchformer_prompt_tokens_total",
        "switchformer_generation_tokens_total", "switchformer_time_to_first_token_seconds_count",
        "switchformer_generation_tokens_per_second",
        'switchformer_http_requests_total{endpoint="/v1/completions",status="200"} 4.0',
    ]  # fmt: skip
    for name in names:
        assert name in text


def test_shutdown_finishes_running_requests_or_ends_them(lm, tok):
    from switchformer.serve.engine import Engine, EngineStopped, Request
    from switchformer.serve.sampling import SamplingParams

    for timeout, want in ((10.0, "done"), (0.1, "error")):
        engine = Engine(lm, tok, max_request_tokens=128)
        _slow(engine, 0.02)
        events, finished = [], threading.Event()

        def emit(kind, payload, events=events, finished=finished):
            if kind != "token":
                events.append((kind, payload))
                finished.set()

        engine.start()
        engine.submit(Request(tok.encode("the").ids, SamplingParams(max_tokens=20), emit))
        time.sleep(0.1)
        engine.stop(timeout=timeout)
        assert finished.wait(5) and events[0][0] == want, events
        if want == "error":
            assert events[0][1]["status"] == 503
        with pytest.raises(EngineStopped):
            engine.submit(Request([5], SamplingParams(), emit))


def test_limits_of_an_encoder_decoder_server(tok):
    app, _ = make_app(tiny_t5(), tok, limits=Limits(8, 5, None))
    with serving(app) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "the " * 20}, timeout=30)
        assert r.status_code == 400 and "limit of 8" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 6}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        chat = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "the cat"}],
                                                              "temperature": 0}, timeout=30).json()  # fmt: skip
        plain = httpx.post(url + "/v1/completions", json={"prompt": "the cat", "temperature": 0, "max_tokens": 5},
                           timeout=30).json()  # fmt: skip
        assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]  # chat: the last user message


def test_a_multilingual_translation_run_takes_the_language_on_both_endpoints(tok):
    """A run whose prefix names the source language: completions and chat both format the source
    with the request's source_lang, as training did; without it the error names the field."""
    from switchformer.serve.prompts import PromptFormatter
    from switchformer.serve.protocol import APIError
    from switchformer.train.config import TrainConfig

    config = TrainConfig(model="t5", objective="seq2seq", source_prefix="<{source_lang}> ", source_lang="de,fr",
                         target_lang="en")  # fmt: skip
    formatter = PromptFormatter(tok, tiny_t5(), config)
    want = tok.encode("<fr> the cat").ids + [1]
    assert formatter.completion_ids("the cat", source_lang="fr") == want
    assert formatter.chat_ids([{"role": "user", "content": "the cat"}], source_lang="fr") == want
    for call in (lambda: formatter.completion_ids("the cat"),
                 lambda: formatter.chat_ids([{"role": "user", "content": "the cat"}])):  # fmt: skip
        with pytest.raises(APIError) as caught:
            call()
        assert caught.value.param == "source_lang" and 'give "source_lang"' in caught.value.message
    with pytest.raises(APIError) as caught:
        formatter.completion_ids("the cat", source_lang="cs")
    assert caught.value.param == "source_lang" and "'cs'" in caught.value.message
