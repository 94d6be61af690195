"""Shared pieces of the server tests: tiny models with a tokenizer, and a server on a free port of
127.0.0.1 in a thread of the test process (stopped afterwards; its engine reachable for hooks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch

from switchformer.data.tokenizer import train_tokenizer
from switchformer.models import SwitchLM, SwitchLMConfig, SwitchT5, SwitchT5Config
from switchformer.serve.app import create_app
from switchformer.serve.engine import Engine
from switchformer.serve.prompts import PromptFormatter
from switchformer.serve.protocol import Limits

WORDS = "the a cat dog sat on mat ran fast slow big small red blue green house tree sun moon river".split()


def corpus(n: int = 400) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (10,), generator=g)) + "." for _ in range(n)]


def tokenizer():
    return train_tokenizer(corpus(), 400, "bpe")


def tiny_lm(seed: int = 0) -> SwitchLM:
    """Random weights at T5's init scale (1.0): varied, confident enough outputs, and EOS rare."""
    torch.manual_seed(seed)
    config = SwitchLMConfig(
        vocab_size=400, d_model=64, num_layers=2, num_heads=4, d_ff=128, num_experts=4, sparse_step=1,
        max_seq_len=128, init_scale=1.0,
    )  # fmt: skip
    return SwitchLM(config).eval()


def tiny_t5(seed: int = 0) -> SwitchT5:
    torch.manual_seed(seed)
    config = SwitchT5Config(
        vocab_size=400, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_experts=4,
        encoder_sparse_step=1, decoder_sparse_step=1, init_scale=1.0, dropout_rate=0.0,
    )  # fmt: skip
    return SwitchT5(config).eval()


def make_app(model, tok, *, api_key=None, request_timeout=60.0, limits=None, **engine_options):
    lm = isinstance(model, SwitchLM)
    limits = limits or (Limits(100, 100, 128) if lm else Limits(64, 64, None))
    options = dict(max_batch_size=16, max_queue=64, max_request_tokens=128 if lm else limits.max_tokens + 1)
    if not lm:
        options["max_source_tokens"] = limits.max_prompt_tokens
    options.update(engine_options)
    engine = Engine(model, tok, **options)
    app = create_app(
        engine, PromptFormatter(tok, model), model_name="tiny", limits=limits, api_key=api_key,
        request_timeout=request_timeout, shutdown_timeout=5.0,
    )  # fmt: skip
    return app, engine


@contextlib.contextmanager
def serving(app, timeout: float = 20.0):
    """The application served on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP: asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


def client(url: str, **options):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=options.pop("api_key", "unused"), max_retries=0, timeout=30, **options)


# Greedy tokens are promised equal under load only where the choice is not a near tie: a batched step
# sums in another order than one row alone (other kernels, other thread counts), which moves logits by
# about 1e-6. Every reference below asserts that each chosen token leads the next by more than this.
NEAR_TIE = 1e-3


def assert_no_near_tie(logits: torch.Tensor, chosen: list[int], what: str) -> None:
    """``logits`` ``[steps, vocab]``: the scores each chosen token was picked from."""
    top = logits[: len(chosen)].float().topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == chosen, f"{what}: the recomputed argmax is not the generated token"
    margins = top.values[:, 0] - top.values[:, 1]
    step = int(margins.argmin())
    assert float(margins[step]) > NEAR_TIE, (
        f"{what}: step {step} is a near tie (margin {float(margins[step]):.2g}); exact equality under load is "
        "not promised there: choose another prompt for this test"
    )


@contextlib.contextmanager
def recorded_choices():
    """The logits each greedy step of ``generate`` chose from (a list of ``[rows, vocab]``)."""
    from switchformer.inference import generation

    recorded, choose = [], generation.choose

    def recording(logits, cfg):
        recorded.append(logits.detach().clone())
        return choose(logits, cfg)

    generation.choose = recording
    try:
        yield recorded
    finally:
        generation.choose = choose


def reference_lm(model, tok, prompt: str, max_tokens: int) -> tuple[str, int]:
    """``generate`` alone, greedy: the text up to EOS and the number of new tokens (no near tie)."""
    ids = torch.tensor([tok.encode(prompt).ids])
    with recorded_choices() as logits:
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
    assert_no_near_tie(torch.cat(logits), out, repr(prompt))
    return _text(tok, out, model.config.eos_token_id)


def reference_t5(model, tok, prompt: str, max_tokens: int) -> tuple[str, int]:
    ids = torch.tensor([tok.encode(prompt).ids + [model.config.eos_token_id]])
    with recorded_choices() as logits:
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, 1:].tolist()
    assert_no_near_tie(torch.cat(logits), out, repr(prompt))
    return _text(tok, out, model.config.eos_token_id)


def _text(tok, out: list[int], eos: int) -> tuple[str, int]:
    count = len(out)
    if eos in out:
        out, count = out[: out.index(eos)], out.index(eos) + 1
    return tok.decode(out, skip_special_tokens=True), count
