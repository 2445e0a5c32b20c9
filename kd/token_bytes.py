"""The bytes each token id stands for, and the way back: bytes -> the one id that has them.

A teacher served behind an OpenAI-compatible API (vLLM, llama.cpp's server, ...) returns each
generated token, and its top-k alternatives, as text plus UTF-8 bytes (`"bytes": [72, 101]`).
The text is not enough: an emoji split over several byte-level tokens comes back as "\ufffd"
per token. The bytes are exact, so kd maps a returned token to the student's id with the same
bytes:

    vocab = ByteVocab.of(load_tokenizer("models/smollm2-135m-instruct"))
    vocab.id_of(bytes(entry["bytes"]))  # None: no such token, or vocab.ambiguous(...) is True

How a token's string becomes bytes follows the decoder of tokenizer.json:
- ByteLevel (GPT-2 BPE: SmolLM2, Llama 3, Qwen): each char of the token is one byte, through
  GPT-2's `bytes_to_unicode` table, inverted here.
- SentencePiece-style (Replace "▁"->" ", ByteFallback, Fuse, Strip; or Metaspace: Llama 2,
  Gemma): "▁" is a space, "<0xHH>" is the single byte 0xHH (byte fallback), any other token
  is its UTF-8. Fuse only joins tokens and Strip only drops the leading space of a whole text,
  so neither applies to one token: we want per-token bytes.
- Added tokens (tokenizer.json "added_tokens", e.g. `<|im_end|>`): content.encode("utf-8").
  The added vocabulary matches its content in the raw text, before the model runs, so the
  content is written in the text's own characters, not in the model's alphabet.
Any other decoder raises ValueError naming it.

When several ids have the same bytes, id_of picks by rank:
1. an added token: encode() splits added tokens out of the text before the model sees it, so
   these bytes in the student's own text become the added id;
2. a normal piece: SentencePiece emits a byte-fallback token only for bytes missing from the
   vocabulary (b"A" is encoded as "A", never as <0x41>);
3. a byte-fallback token.
Two or more ids of the best rank with the same bytes are ambiguous: id_of returns None and
ambiguous() is True, so the caller can refuse the example with a reason.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from kd.tokenizer import Tokenizer

# Rank of an id among the ids that share its bytes: the lowest rank wins (see above).
ADDED, PIECE, BYTE_FALLBACK = 0, 1, 2

SENTENCEPIECE_STEPS = {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}
SUPPORTED = (
    "ByteLevel (GPT-2 BPE) or SentencePiece-style (Replace, ByteFallback, Fuse, Strip, Metaspace)"
)
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # what the ByteFallback decoder turns to a byte


def gpt2_byte_decoder() -> dict[str, int]:
    """char -> byte: the inverse of GPT-2's `bytes_to_unicode` (openai/gpt-2, encoder.py)."""
    # The 188 printable bytes 33..126, 161..172, 174..255 stand for themselves; the other 68
    # (controls, space, 127..160, 173 = soft hyphen) become chr(256 + n), n counting them in
    # byte order. Every byte is then one visible non-space char that BPE can merge.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char_of = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in char_of]
    char_of |= {b: chr(256 + n) for n, b in enumerate(others)}
    return {c: b for b, c in char_of.items()}


def decoder_steps(tokenizer: Tokenizer) -> list[dict]:
    """The decoders of tokenizer.json in order, Sequences flattened; [] when there is none."""

    def flat(decoder: dict | None) -> list[dict]:
        if decoder is None:
            return []
        if decoder["type"] == "Sequence":
            return [step for inner in decoder["decoders"] for step in flat(inner)]
        return [decoder]

    # The decoder's JSON is its pickled state: no need to serialize a 262k-piece vocabulary.
    decoder = tokenizer.backend.decoder
    return flat(None if decoder is None else json.loads(decoder.__getstate__()))


def piece_reader(steps: list[dict]) -> Callable[[str], tuple[bytes, int]]:
    """A function: model piece (a vocab string) -> (its bytes, its rank)."""
    types = [step["type"] for step in steps]
    if types == ["ByteLevel"]:
        table = gpt2_byte_decoder()

        def read_byte_level(piece: str) -> tuple[bytes, int]:
            # A char outside the table passes through as UTF-8, as the ByteLevel decoder does.
            parts = (bytes([table[c]]) if c in table else c.encode() for c in piece)
            return b"".join(parts), PIECE

        return read_byte_level
    if types and set(types) <= SENTENCEPIECE_STEPS:
        replaces = []
        for step in steps:
            if step["type"] == "Metaspace":
                replaces.append((step["replacement"], " "))
            elif step["type"] == "Replace" and "String" in step["pattern"]:
                replaces.append((step["pattern"]["String"], step["content"]))
            elif step["type"] == "Replace":
                raise ValueError(f"tokenizer decoder Replace {step['pattern']} is not supported")
        byte_fallback = "ByteFallback" in types

        def read_sentencepiece(piece: str) -> tuple[bytes, int]:
            if byte_fallback and (match := BYTE_TOKEN.fullmatch(piece)):
                return bytes([int(match[1], 16)]), BYTE_FALLBACK
            for old, new in replaces:
                piece = piece.replace(old, new)
            return piece.encode(), PIECE

        return read_sentencepiece
    raise ValueError(
        f"tokenizer decoder {'+'.join(types) or 'None'} is not supported: "
        f"token bytes are known for {SUPPORTED} decoders"
    )


def ranked_bytes(tokenizer: Tokenizer) -> list[tuple[bytes, int] | None]:
    """(bytes, rank) of each id 0..n-1; None for ids with no token."""
    read = piece_reader(decoder_steps(tokenizer))
    pieces = tokenizer.backend.get_vocab(with_added_tokens=False)  # piece -> id
    added = tokenizer.backend.get_added_tokens_decoder()  # id -> AddedToken
    size = max(tokenizer.vocab_size, 1 + max([*pieces.values(), *added], default=-1))
    ranked: list[tuple[bytes, int] | None] = [None] * size
    for piece, i in pieces.items():
        ranked[i] = read(piece)
    for i, token in added.items():  # after the pieces: an added token that is a piece too wins
        ranked[i] = (token.content.encode("utf-8"), ADDED)
    return ranked


def token_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    """Bytes of each id 0..vocab_size-1 (added and special tokens: their content encoded UTF-8;
    ids with no token: None)."""
    return [None if entry is None else entry[0] for entry in ranked_bytes(tokenizer)]


@dataclass(frozen=True)
class ByteVocab:
    """bytes -> id for one tokenizer; which id wins when bytes are shared: see above."""

    bytes_of: list[bytes | None]  # id -> its bytes, as token_bytes() gives them
    ids: dict[bytes, int]  # bytes -> the one id of the best rank with these bytes
    ambiguous_ids: dict[bytes, tuple[int, ...]]  # bytes -> 2+ ids of the best rank sharing them

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "ByteVocab":
        ranked = ranked_bytes(tokenizer)
        best: dict[bytes, tuple[int, list[int]]] = {}  # bytes -> (best rank, its ids)
        for i, entry in enumerate(ranked):
            if entry is None:
                continue
            data, rank = entry
            if data not in best or rank < best[data][0]:
                best[data] = (rank, [i])
            elif rank == best[data][0]:
                best[data][1].append(i)
        return cls(
            bytes_of=[None if entry is None else entry[0] for entry in ranked],
            ids={data: ids[0] for data, (_, ids) in best.items() if len(ids) == 1},
            ambiguous_ids={data: tuple(ids) for data, (_, ids) in best.items() if len(ids) > 1},
        )

    def id_of(self, data: bytes) -> int | None:
        """The id whose token is exactly `data`; None when none is, or several are."""
        return self.ids.get(data)

    def ambiguous(self, data: bytes) -> bool:
        """True when several ids of the same rank have exactly these bytes."""
        return data in self.ambiguous_ids
