"""``switchformer serve`` as users start it: a run in a real subprocess (health, a completion, a
graceful Ctrl-C), a Hugging Face directory whose served greedy output equals ``transformers``'
``generate``, and bad flags refused in one line."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'switchformer[serve]'")

import httpx  # noqa: E402
from serve_helpers import corpus, serving  # noqa: E402

from switchformer.cli import build_parser, main  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = root / "corpus.txt"
    data.write_text("\n".join(corpus(600)))
    args = ["train", "--preset", "test", "--model", "lm", "--data", str(data), "--no-progress", "--out-dir", str(root)]
    assert main([*args, "--run-name", "lm", "--max-steps", "3", "--set", "vocab_size=400"]) == 0
    return root / "lm"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_a_run_in_a_subprocess_and_stop_it_gracefully(lm_run, stop):
    """Every graceful stop (Ctrl-C, or SIGTERM as container runtimes and systemd send it) exits 0."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "switchformer", "serve", str(lm_run), "--port", str(port)]
    command += ["--log-level", "warning", "--cors-origin", "https://app.example.com"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up within 60 s"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"] == "lm"
        out = httpx.post(url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 4}, timeout=30).json()
        assert out["usage"]["completion_tokens"] <= 4 and out["model"] == "lm"
        # what probes and browsers send, through the real HTTP server: HEAD has GET's headers and no body
        get, head = httpx.get(url + "/health", timeout=10), httpx.head(url + "/health", timeout=10)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"]
        preflight = httpx.options(url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        process.send_signal(stop)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "serving 'lm': decoder-only" in err


def test_serve_a_hugging_face_directory_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from switchformer.commands.serve import check_flags
    from switchformer.data.tokenizer import train_tokenizer
    from switchformer.serve.server import build_server

    tok = train_tokenizer(corpus(), 400, "bpe")
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        expert_capacity=8, router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    hf = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    folder = tmp_path / "hf-switch"
    hf.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    args = build_parser().parse_args(["serve", str(folder), "--max-tokens", "12"])
    check_flags(args)
    server = build_server(args.source, max_tokens=args.max_tokens)
    app, limits, name = server.app, server.limits, server.name
    assert name == "hf-switch" and limits.max_tokens == 12 and limits.context is None
    prompts = ["the cat sat", "a big red house", "moon"]
    with serving(app) as url:
        got = [
            httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0}, timeout=30)
            .json()["choices"][0]["text"]
            for p in prompts
        ]
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([tok.encode(prompt).ids + [1]])
        out = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, 1:].tolist()
        out = out[: out.index(1)] if 1 in out else out
        assert text == tok.decode(out, skip_special_tokens=True), prompt


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port: must be in 1-65535"),
        (["--max-batch-size", "0"], "--max-batch-size: must be an integer >= 1"),
        (["--request-timeout", "nan"], "--request-timeout: must be a finite number > 0"),
        (["--max-prompt-tokens", "500"], "--max-prompt-tokens: 500; the model's context is"),
        (["--max-tokens", "100000"], "--max-tokens: 100000; the model's context is"),
        (["--api-key", " "], "--api-key: empty"),
        (["--served-model-name", ""], "--served-model-name: empty"),
        (["--cors-origin", "https://a.example/app"], "--cors-origin: 'https://a.example/app' is not an origin"),
        (["--compile"], "--compile: only the static decoding step compiles whole; add --cache static"),
    ],
)
def test_bad_flags_are_one_line(lm_run, flags, message, capsys):
    assert main(["serve", str(lm_run), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_source_is_named(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "nothing: not found" in capsys.readouterr().err
    (tmp_path / "chats.jsonl").write_text("{}\n")
    assert main(["serve", str(tmp_path / "chats.jsonl")]) == 2
    assert "chats.jsonl: a file; serve takes a run directory" in capsys.readouterr().err


def test_a_port_in_use_is_one_line(lm_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(lm_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port: cannot listen on 127.0.0.1:{port}" in err and "serving" not in err


def test_serve_flags_are_parsed(lm_run):
    args = build_parser().parse_args(["serve", str(lm_run)])
    assert isinstance(args, argparse.Namespace) and (args.host, args.port, args.routing) == ("127.0.0.1", 8000, "eval")
    assert (args.cache, args.compile) == ("dynamic", False)
    args = build_parser().parse_args(["serve", str(lm_run), "--cache", "static", "--compile"])
    assert (args.cache, args.compile) == ("static", True)
