"""Log-probabilities of tokens that are not whole characters, on both endpoints: a byte-level BPE
trained on text with emoji, CJK and accents splits most of them over tokens. Every field is exact for
every token: chat's ``bytes`` concatenate to the answer, completions' ``top_logprobs`` hold as many
entries as asked with each candidate's own value, and ``text_offset`` points at the token's character."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_helpers import make_app, serving, tiny_lm  # noqa: E402

from switchformer.data.tokenizer import train_tokenizer  # noqa: E402
from switchformer.serve.protocol import Limits  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TEXTS = ["café crème brûlée 😀 🚀 日本語のテキスト ñandú", "東京 タワー 🍣 naïve façade Ærø", "über 🙂 中文 文字"] * 60
PROMPTS = ["café", "日本", "🚀 rocket", "naïve", "東京"]


@pytest.fixture(scope="module")
def server():
    tok = train_tokenizer(TEXTS, 400, "bpe")  # 400 tokens: most non-ASCII characters stay split in bytes
    app, _ = make_app(tiny_lm(), tok, limits=Limits(60, 60, 64), max_request_tokens=64)
    with serving(app) as url:
        yield url, tok


def _token_bytes(token: str, special: set[str]) -> bytes:
    """A token's bytes from its shown text alone: OpenAI's ``bytes:\\xHH`` spelling, or its UTF-8; a
    special token (its name) writes nothing."""
    if token in special:
        return b""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:") :].split("\\x")[1:])
    return token.encode("utf-8")


def _ask(url, endpoint, prompt, seed, top):
    body = {"max_tokens": 30, "temperature": 1.0, "seed": seed}
    if endpoint == "chat":
        body.update(messages=[{"role": "user", "content": prompt}], logprobs=True, top_logprobs=top)
    else:
        body.update(prompt=prompt, logprobs=top)
    response = httpx.post(f"{url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body,
                          timeout=30)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def _special(tok) -> set[str]:
    return {added.content for added in tok.get_added_tokens_decoder().values() if added.special}


def test_chat_bytes_concatenate_to_the_answer(server):
    url, tok = server
    special = _special(tok)
    partial = 0
    for seed, prompt in enumerate(PROMPTS * 2):
        choice = _ask(url, "chat", prompt, seed, 5)
        content, entries = choice["message"]["content"], choice["logprobs"]["content"]
        joined = b"".join(bytes(e["bytes"]) for e in entries if e["bytes"] is not None)
        assert joined.decode("utf-8", "replace") == content, prompt
        for e in entries:
            if e["bytes"] is None:  # a special token: its name, writing nothing
                assert e["token"] in special
            else:  # the shown text spells the same bytes
                assert _token_bytes(e["token"], special) == bytes(e["bytes"])
            assert len(e["top_logprobs"]) == 5
            for alternative in e["top_logprobs"]:
                if alternative["bytes"] is not None:
                    assert _token_bytes(alternative["token"], special) == bytes(alternative["bytes"])
            partial += e["token"].startswith("bytes:")
    assert partial > 20  # the premise: many tokens were parts of characters


def test_completions_top_logprobs_hold_every_candidate_with_its_own_value(server):
    url, _ = server
    for seed, prompt in enumerate(PROMPTS * 2):
        lp = _ask(url, "completions", prompt, seed, 5)["logprobs"]
        for position, (token, value, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
            assert len(top) == 5, (prompt, position, top)
            values = list(top.values())
            assert values == sorted(values, reverse=True)
            if token in top:  # the chosen token among the candidates: its own log-probability, not another's
                assert math.isclose(top[token], value, abs_tol=1e-6), (prompt, position, token, top, value)
            else:
                assert value <= values[-1] + 1e-6


def test_text_offsets_point_at_each_tokens_character(server):
    url, tok = server
    special = _special(tok)
    checked = 0
    for seed, prompt in enumerate(PROMPTS * 2):
        choice = _ask(url, "completions", prompt, seed, 1)
        text, lp = choice["text"], choice["logprobs"]
        pieces = [_token_bytes(t, special) for t in lp["tokens"]]
        assert b"".join(pieces).decode("utf-8", "replace") == text
        offsets = lp["text_offset"]
        assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
        written = b""
        for token, piece, offset in zip(lp["tokens"], pieces, offsets):
            complete = written.decode("utf-8", "replace") if _complete(written) else None
            if complete is not None:  # the token starts a character: the text before it is complete
                assert offset == len(complete), (prompt, token, offset, len(complete))
                if not token.startswith("bytes:") and token not in special:
                    assert text[offset : offset + len(token)] == token
                    checked += 1
            written += piece
    assert checked > 50


def _complete(data: bytes) -> bool:
    """Whether ``data`` does not end inside a character (a later byte could still complete it)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    return decoder.getstate()[0] == b""
