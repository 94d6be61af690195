"""Token bytes: what each token writes into decoded text, exact for tokens that are not whole
characters (byte-level BPE pieces of an emoji, SentencePiece byte fallback), on every kind of
decoder the tokenizers we train or import use; checked against ``tokenizers``' own decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchformer.data.token_bytes import PieceStream, TokenBytes, token_text
from switchformer.data.tokenizer import train_tokenizer

TEXTS = ["héllo wörld 😀 日本語 café", "naïve 🚀 rocket 東京 ñandú", "plain ascii words", "Ça coûte 5 €"] * 40


def _llama_style():
    """A SentencePiece-style BPE with byte fallback: Replace, ByteFallback, Fuse, Strip."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁▁": 4, "a": 5, "▁a": 6, "a▁b": 7, "b": 8, "é": 9}
    vocab.update({f"<0x{b:02X}>": 10 + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def _metaspace_bpe():
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "▁": 1, "▁▁": 2, "a": 3, "▁a": 4, "a▁b": 5, "é": 6, "<pad>": 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["<pad>"])
    return tok


@pytest.fixture(scope="module")
def tokenizers():
    bpe = train_tokenizer(TEXTS, 400, "bpe")
    bpe.add_tokens(["über", "<de>", "日本"])  # added tokens pass through the decoder too (über is lossy there)
    return {"bpe": bpe, "unigram": train_tokenizer(TEXTS, 150, "unigram"), "llama": _llama_style(),
            "metaspace": _metaspace_bpe()}  # fmt: skip


KINDS = ["bpe", "unigram", "llama", "metaspace"]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_pieces_decode_to_what_the_tokenizer_decodes(tokenizers, kind, data):
    tok = tokenizers[kind]
    ids = data.draw(st.lists(st.integers(0, tok.get_vocab_size() - 1), max_size=12))
    pieces = TokenBytes(tok).pieces(ids)
    joined = b"".join(p for p in pieces if p is not None)
    want = tok.decode(ids, skip_special_tokens=True)
    if kind == "llama":  # byte fallback writes one U+FFFD per byte token of an invalid run: exact when valid
        try:
            assert joined.decode("utf-8") == want
        except UnicodeDecodeError:
            assert "\ufffd" in want
    else:
        assert joined.decode("utf-8", "replace") == want
    special = {i for i, added in tok.get_added_tokens_decoder().items() if added.special}
    assert [token for token, piece in zip(ids, pieces) if piece is None] == [t for t in ids if t in special]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_pieces_in_context_are_the_differences_of_decoded_prefixes(tokenizers, kind, data):
    """Where every prefix decodes to whole characters, a token's piece is what it added to the text."""
    tok = tokenizers[kind]
    text = data.draw(st.sampled_from(TEXTS[:4]))
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = TokenBytes(tok).pieces(ids)
    done = b""
    for n in range(1, len(ids) + 1):
        done += pieces[n - 1] or b""
        decoded = tok.decode(ids[:n], skip_special_tokens=True)
        if "\ufffd" not in decoded:
            assert done.decode("utf-8") == decoded


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_stream_of_pieces_equals_the_pieces_of_the_whole(tokenizers, kind, data):
    """Token by token, as the server sees them: each chosen token's piece, and each candidate's piece
    at that position, are what the whole sequence's decoding attributes to them."""
    tok = tokenizers[kind]
    table = TokenBytes(tok)
    vocab = st.integers(0, tok.get_vocab_size() - 1)
    ids = data.draw(st.lists(vocab, max_size=10))
    # starts that exercise the start-of-text rules: spaces, special tokens
    ids = [i for i in (tok.token_to_id(t) for t in ("▁", "<pad>", "</s>", "Ġ")) if i is not None][:2] + ids
    stream = PieceStream(table)
    for n, token in enumerate(ids):
        candidate = data.draw(vocab)
        assert stream.piece(candidate) == table.pieces([*ids[:n], candidate])[-1]
        assert stream.add(token) == table.pieces(ids[: n + 1])[-1]


def test_an_emoji_split_over_byte_tokens_keeps_its_bytes(tokenizers):
    tok = tokenizers["bpe"]
    table = TokenBytes(tok)
    emoji = "🚀".encode()
    ids = [tok.token_to_id(c) for c in "ðŁļĢ"]  # the byte-level alphabet's characters of 🚀's four bytes
    assert None not in ids
    pieces = table.pieces(ids)
    assert pieces == [emoji[i : i + 1] for i in range(4)]
    assert [token_text(p, table.name(t)) for p, t in zip(pieces, ids)] == ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\x9a",
                                                                          "bytes:\\x80"]  # fmt: skip
    assert token_text("é".encode(), "Ã©") == "é" and token_text(None, "</s>") == "</s>"


def test_the_first_token_loses_its_leading_space_as_the_decoder_says(tokenizers):
    tok = tokenizers["metaspace"]
    table = TokenBytes(tok)
    a = tok.token_to_id("▁a")
    assert table.pieces([a, a]) == [b"a", b" a"]
    assert table.inside(a) == b" a" and table.pieces([a])[0] == b"a"
    llama = TokenBytes(tokenizers["llama"])
    assert llama.pieces([6, 6]) == [b"a", b" a"]  # Strip after Fuse: the joined text's first space only


def test_a_decoder_not_mirrored_falls_back_to_decoded_prefixes():
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "un": 1, "##able": 2, "do": 3}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    table = TokenBytes(tok)
    assert not table.exact
    assert table.pieces([3, 1, 2]) == [b"do", b" un", b"able"]
    assert table.pieces([1, 2], first=False) == [b" un", b"able"]
