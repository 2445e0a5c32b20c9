"""Tests for kd/token_bytes.py: the bytes of each token id and the bytes -> id lookup, on real
tokenizers (no mocks).

Checks:
- our inverse of GPT-2's byte alphabet against transformers' `bytes_to_unicode`;
- on the tiny byte-level tokenizer (tests/tiny_tokenizer.py), SmolLM2 (marked `teacher`) and
  Gemma 3 270M (skipped without models/gemma3-270m, made by `make gemma3`): for strings that
  break naive code (leading and repeated spaces, newlines, tabs, digits, emoji, accents, CJK,
  code, control bytes) the per-token bytes of `encode(s)` join to `s.encode()`, and every id
  `encode` gives comes back from `id_of(its bytes)`;
- special tokens: their content's bytes, and back to their ids;
- an emoji split over several byte-level tokens: each token's bytes are not UTF-8 alone;
- SmolLM2's and Gemma 3's whole vocabularies: no two ids of the same rank share bytes;
- Gemma 3: "▁" is a space, rare characters fall back to <0xHH> tokens, b"A" is "A" not <0x41>;
- the ranks on small hand-built tokenizers: added token over piece over byte fallback, and two
  pieces with the same bytes ambiguous; Strip and Metaspace;
- one-line ValueError for a decoder we cannot read bytes from.

    .venv/bin/python -m pytest -q tests/test_token_bytes.py      # -s prints vocabulary counts
"""

from pathlib import Path

import pytest
from tiny_tokenizer import SPECIAL_TOKENS, make_tiny_tokenizer
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as Backend
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kd.token_bytes import BYTE_TOKEN, ByteVocab, gpt2_byte_decoder, token_bytes
from kd.tokenizer import Tokenizer, load_tokenizer

GEMMA3_DIR = Path(__file__).resolve().parent.parent / "models" / "gemma3-270m"

TEXTS = [
    "Hello, world!",
    " one leading space",
    "  two leading spaces, three   inside and trailing   ",
    "line one\nline two\n\n\nafter three newlines\r\nand CRLF",
    "\ttab, two\t\ttabs\n\t\tindented",
    "digits 0123456789, 3.14159, 1,000,000 and 2024-11-27",
    "emoji 🙂👍🏽 🦜 and a ZWJ family 👩‍👩‍👧",
    "accents: café naïve Größe résumé, combining a\u0301",
    "CJK: 東京 北京 你好世界 こんにちは 한국어",
    "rare: 𓀀 𠜎 ᚠ 𝔘",
    'def f(x: int) -> dict:\n    return {"k": [x, 2]}  # code\n',
    "control bytes \x00\x01\x7f and a soft\xadhyphen",
]


def check_join_and_round_trip(tok: Tokenizer, vocab: ByteVocab) -> None:
    table = token_bytes(tok)
    assert table == vocab.bytes_of
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        joined = b"".join(table[i] for i in ids)
        assert joined == text.encode(), f"per-token bytes of {text!r} join to {joined!r}"
        back = {i: vocab.id_of(table[i]) for i in ids}
        assert all(i == j for i, j in back.items()), f"id_of does not give back ids: {back}"


def check_special_tokens(tok: Tokenizer, vocab: ByteVocab) -> None:
    for i, added in tok.backend.get_added_tokens_decoder().items():
        assert vocab.bytes_of[i] == added.content.encode()
        assert vocab.id_of(added.content.encode()) == i, f"{added.content!r} is not id {i}"


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_split_emoji(tok: Tokenizer, vocab: ByteVocab) -> None:
    ids = tok.encode("🦜", add_special_tokens=False)  # 4 bytes F0 9F A6 9C
    pieces = [vocab.bytes_of[i] for i in ids]
    assert len(pieces) > 1 and not any(is_utf8(p) for p in pieces), pieces
    assert b"".join(pieces) == "🦜".encode()


def test_gpt2_alphabet_matches_transformers() -> None:
    assert gpt2_byte_decoder() == {c: b for b, c in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer")))


def test_tiny_tokenizer(tiny: Tokenizer) -> None:
    vocab = ByteVocab.of(tiny)
    check_join_and_round_trip(tiny, vocab)
    check_special_tokens(tiny, vocab)
    check_split_emoji(tiny, vocab)
    assert [vocab.id_of(t.encode()) for t in SPECIAL_TOKENS] == [0, 1, 2]


@pytest.mark.teacher
def test_smollm2(teacher_dir: Path) -> None:
    tok = load_tokenizer(teacher_dir)
    vocab = ByteVocab.of(tok)
    check_join_and_round_trip(tok, vocab)
    check_special_tokens(tok, vocab)
    check_split_emoji(tok, vocab)
    assert vocab.id_of(b"<|im_end|>") == tok.token_to_id("<|im_end|>")
    # Byte-level pieces are a bijection of byte strings, and no added token spells a piece:
    # every id has its own bytes.
    assert None not in vocab.bytes_of and not vocab.ambiguous_ids
    assert len(vocab.ids) == tok.vocab_size == len(set(vocab.bytes_of))
    print(f"SmolLM2: {tok.vocab_size} ids, {len(vocab.ids)} distinct byte strings")


@pytest.fixture(scope="module")
def gemma3() -> Tokenizer:
    if not (GEMMA3_DIR / "tokenizer.json").is_file():
        pytest.skip(f"Gemma 3 not imported: run `make gemma3` to create {GEMMA3_DIR}")
    return load_tokenizer(GEMMA3_DIR)


def test_gemma3(gemma3: Tokenizer) -> None:
    vocab = ByteVocab.of(gemma3)
    check_join_and_round_trip(gemma3, vocab)
    check_special_tokens(gemma3, vocab)
    pieces = [
        gemma3.backend.id_to_token(i) for i in gemma3.encode(" rare 𠜎", add_special_tokens=False)
    ]
    assert pieces[0].startswith("▁") and any(BYTE_TOKEN.fullmatch(p) for p in pieces), pieces
    # A byte with a normal piece maps to the piece, never to its byte-fallback token.
    for text, piece in [("A", "A"), ("\n", "\n"), ("\t", "\t")]:
        fallback = gemma3.token_to_id(f"<0x{ord(text):02X}>")
        assert vocab.bytes_of[fallback] == text.encode()
        assert vocab.id_of(text.encode()) == gemma3.token_to_id(piece) != fallback
    assert vocab.id_of(b"\xf0") == gemma3.token_to_id("<0xF0>")  # no piece is a lone F0
    assert not vocab.ambiguous_ids
    shadowed = sum(vocab.id_of(b) != i for i, b in enumerate(vocab.bytes_of))
    print(f"Gemma 3: {len(vocab.bytes_of)} ids, {shadowed} byte-fallback tokens behind pieces")


def wordlevel(vocab: dict[str, int], decoder) -> Backend:
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoder
    return backend


def test_sentencepiece_ranks_and_ambiguity() -> None:
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    pieces = {"<unk>": 0, "▁a": 1, " a": 2, "A": 3, "<0x41>": 4, "<0x42>": 5}
    backend = wordlevel(pieces, decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)]))
    vocab = ByteVocab.of(Tokenizer(backend, special_tokens={}))
    # Strip (drop the first token's leading space) is not applied: b" a" keeps its space.
    assert vocab.bytes_of == [b"<unk>", b" a", b" a", b"A", b"A", b"B"]
    assert vocab.id_of(b" a") is None and vocab.ambiguous(b" a")
    assert vocab.ambiguous_ids == {b" a": (1, 2)}
    assert vocab.id_of(b"A") == 3 and not vocab.ambiguous(b"A")  # the piece, not <0x41>
    assert vocab.id_of(b"B") == 5  # a byte with no piece: its fallback token
    assert vocab.id_of(b"C") is None and not vocab.ambiguous(b"C")
    metaspace = wordlevel({"<unk>": 0, "▁a": 1}, decoders.Metaspace())
    assert token_bytes(Tokenizer(metaspace, special_tokens={})) == [b"<unk>", b" a"]


def test_added_token_wins_over_piece() -> None:
    backend = wordlevel({"<unk>": 0, "Ġa": 1}, decoders.ByteLevel())
    backend.add_tokens([AddedToken(" a", normalized=False)])  # id 2, same bytes as "Ġa"
    backend.add_special_tokens(["<|im_end|>"])  # id 3
    vocab = ByteVocab.of(Tokenizer(backend, special_tokens={}))
    assert vocab.bytes_of == [b"<unk>", b" a", b" a", b"<|im_end|>"]
    assert backend.encode(" a").ids == [2]  # why it wins: added tokens are split out first
    assert vocab.id_of(b" a") == 2 and not vocab.ambiguous(b" a")
    assert vocab.id_of(b"<|im_end|>") == 3


@pytest.mark.parametrize("decoder", [decoders.WordPiece(), None], ids=["WordPiece", "none"])
def test_unsupported_decoder(decoder) -> None:
    backend = Backend(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.decoder = decoder
    with pytest.raises(ValueError, match="decoder (WordPiece|None) is not supported") as error:
        token_bytes(Tokenizer(backend, special_tokens={}))
    assert "\n" not in str(error.value) and "ByteLevel" in str(error.value)
