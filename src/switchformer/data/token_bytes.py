"""The bytes each token writes into decoded text, for tokens that are not whole characters.

A byte-level BPE splits most non-ASCII characters over several tokens (an emoji is four bytes), and a
SentencePiece BPE with byte fallback writes ``<0xE2>``-style tokens. Decoding one such token alone gives
U+FFFD, so a token's text cannot say what it contributes; its bytes can. :class:`TokenBytes` mirrors the
tokenizer's decoder (``tokenizers``' ``ByteLevel``, ``Metaspace``, ``Replace``, ``ByteFallback``,
``Fuse``, ``Strip`` and ``Sequence`` of them) in bytes, so that for any ids

    b"".join(TokenBytes(tok).pieces(ids)).decode("utf-8", "replace") == tok.decode(ids, skip_special_tokens=True)

(tested on each kind of tokenizer). Special tokens write nothing (``None``), as decoding skips them.

How the server shows a token (:func:`token_text`): its text when its bytes are whole UTF-8 characters,
else OpenAI's spelling of raw bytes, ``"bytes:\\xe2\\x80"``; a special token, its own name.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-to-character alphabet, inverted: the character ``tokenizers`` writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _byte_level(piece: bytes) -> bytes:
    table = _byte_level_table()
    return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in piece.decode("utf-8"))


class TokenBytes:
    """``pieces(ids)``: what each token of ``ids`` contributes to ``tokenizer.decode(ids,
    skip_special_tokens=True)``, in bytes (``None`` for a special token). ``tokenizer``: a
    ``tokenizers.Tokenizer``. A decoder not mirrored here (WordPiece, a regex Replace, a CTC
    decoder) falls back to differences of decoded prefixes: exact for whole characters, U+FFFD's
    bytes for a partial one (``exact`` is then False)."""

    def __init__(self, tokenizer):
        spec = json.loads(tokenizer.to_str())
        self.special = {entry["id"] for entry in spec.get("added_tokens", []) if entry.get("special")}
        self.tokenizer = tokenizer
        self._inside: dict[int, bytes | None] = {}
        try:
            self.steps, self.exact = _steps(spec.get("decoder")), True
        except ValueError:
            self.steps, self.exact = None, False

    def name(self, token: int) -> str:
        return self.tokenizer.id_to_token(token) or ""

    def pieces(self, ids: list[int], first: bool = True) -> list[bytes | None]:
        """Each token's bytes in the decoding of ``ids``; ``first``: ``ids`` begin the decoded text (a
        Metaspace or Strip decoder drops the first token's leading space)."""
        kept = [i for i, token in enumerate(ids) if token not in self.special]
        if self.steps is None:
            return self._by_prefixes(ids, kept, first)
        pieces, fused = [self.name(ids[i]).encode("utf-8") for i in kept], False
        for step in self.steps:
            if step == "fuse":
                fused = True
            else:
                pieces = step(pieces, first, fused)
        out: list[bytes | None] = [None] * len(ids)
        for i, piece in zip(kept, pieces):
            out[i] = piece
        return out

    def _by_prefixes(self, ids: list[int], kept: list[int], first: bool) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(ids)
        context = [] if first else [ids[kept[0]]] if kept else []  # a token before: no start-of-text rule
        done = self.tokenizer.decode(context, skip_special_tokens=True).encode("utf-8")
        for i in kept:
            context.append(ids[i])
            now = self.tokenizer.decode(context, skip_special_tokens=True).encode("utf-8")
            out[i] = now[len(done) :] if now.startswith(done) else now
            done = now
        return out

    def inside(self, token: int) -> bytes | None:
        """``token``'s bytes once the text has begun (no start-of-text rule applies): the same wherever
        it stands, so kept for every token asked."""
        if token not in self._inside:
            self._inside[token] = self.pieces([token], first=False)[0]
        return self._inside[token]


class PieceStream:
    """The bytes of each token as a text is generated: ``piece(token)`` for a candidate at the next
    position, ``add(token)`` once it is chosen. Only the tokens up to the first that writes something
    are kept (what the start-of-text rules look at)."""

    def __init__(self, table: TokenBytes):
        self.table, self.start, self.begun = table, [], False

    def piece(self, token: int) -> bytes | None:
        return self.table.inside(token) if self.begun else self.table.pieces([*self.start, token])[-1]

    def add(self, token: int) -> bytes | None:
        piece = self.piece(token)
        if not self.begun and piece is not None:
            self.start.append(token)
            self.begun = bool(piece)
        return piece


def token_text(piece: bytes | None, name: str) -> str:
    """How a token is shown: its text when ``piece`` is whole UTF-8 characters, else
    ``"bytes:\\xHH..."`` (OpenAI's spelling); ``name`` for a special token (``piece`` None)."""
    if piece is None:
        return name
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


# ----------------------------------------------------------------------------- the decoders, in bytes
# Each step maps the kept tokens' byte strings to new ones, one per token, as the decoder does. Fuse
# joins the tokens into one text without changing a byte, so bytes stay attributed to their tokens;
# what it changes is where a later Strip acts: on each token before a Fuse, on the joined text after.


def _steps(decoder: dict | None) -> list:
    """The decoder as steps ``step(pieces, first, fused) -> pieces``; ``"fuse"`` marks a Fuse."""
    if decoder is None:
        return []
    kind = decoder.get("type")
    if kind == "Sequence":
        return [step for inner in decoder["decoders"] for step in _steps(inner)]
    if kind == "ByteLevel":
        return [lambda pieces, first, fused: [_byte_level(p) for p in pieces]]
    if kind == "Metaspace":
        space = decoder.get("replacement", "▁").encode("utf-8")
        # the first token loses every replacement character (tokenizers' Metaspace decoder), the others
        # turn them into spaces
        drop_first = decoder.get("prepend_scheme", "always") != "never" and decoder.get("add_prefix_space", True)

        def metaspace(pieces, first, fused):
            return [p.replace(space, b"" if (i == 0 and first and drop_first) else b" ") for i, p in enumerate(pieces)]

        return [metaspace]
    if kind == "Replace":
        pattern = decoder["pattern"]
        if "String" not in pattern:
            raise ValueError(f"tokenizer decoder: a Replace by regex ({pattern}) is not supported for token bytes")
        old, new = pattern["String"].encode("utf-8"), decoder["content"].encode("utf-8")
        return [lambda pieces, first, fused: [p.replace(old, new) for p in pieces]]
    if kind == "ByteFallback":

        def byte_fallback(pieces, first, fused):
            return [bytes([int(m.group(1), 16)]) if (m := _BYTE_FALLBACK.fullmatch(p.decode("utf-8", "replace")))
                    else p for p in pieces]  # fmt: skip

        return [byte_fallback]
    if kind == "Fuse":
        return ["fuse"]
    if kind == "Strip":
        content, start, stop = decoder["content"].encode("utf-8"), decoder.get("start", 0), decoder.get("stop", 0)

        def cut(piece: bytes) -> bytes:
            for _ in range(start):
                piece = piece.removeprefix(content)
            for _ in range(stop):
                piece = piece.removesuffix(content)
            return piece

        def strip(pieces, first, fused):
            if not fused:
                return [cut(p) for p in pieces]
            if stop:
                raise ValueError("tokenizer decoder: a Strip at the end of the joined text is not supported")
            out = list(pieces)
            if first:  # the joined text's first ``start`` contents go, from whichever tokens hold them
                for _ in range(start):
                    i = next((i for i, p in enumerate(out) if p), None)
                    if i is None or not out[i].startswith(content):
                        break
                    out[i] = out[i][len(content) :]
            return out

        return [strip]
    raise ValueError(f"tokenizer decoder: {kind!r} is not mirrored in bytes")
