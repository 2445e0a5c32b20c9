"""Tests for kd/tokenizer.py against `transformers.AutoTokenizer` on the same directory.

Checks, on the tiny test tokenizer (tests/tiny_tokenizer.py) and on the imported SmolLM2
teacher (marked `teacher`): encode/decode round-trips of ASCII, Unicode, code, digits and
ChatML markers; our ids equal transformers' ids; our chat rendering equals transformers'
`apply_chat_template(..., tokenize=False)` with and without the generation prompt; special-token
ids and eos set; fingerprints; one-line errors for missing files.

    .venv/bin/python -m pytest -q tests/test_tokenizer.py
"""

import json
from pathlib import Path

import pytest
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer
from tokenizers import processors
from transformers import AutoTokenizer

from kd.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello, world! This is plain ASCII text.",
    "Unicode: café, naïve, Größe, 東京, Привет, 🙂👍🏽 and a zero-width joiner \u200d.",
    "def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n\n"
    '    return fib(n - 1) + fib(n - 2)  # {"k": [1, 2]}\n',
    "Digits 0123456789, 3.14159, 1,000,000 and 2024-11-27 12:34:56.",
    "  leading and trailing spaces, double  spaces,\n\nblank lines\r\nand CRLF  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one, please: 東京 🙂"},
    ],
    [
        {"role": "user", "content": "Write code."},
        {"role": "assistant", "content": "```python\nprint('hi')\n```"},
    ],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def check_against_transformers(ours: Tokenizer, theirs) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), f"ids differ from transformers for {text!r}"
        assert ours.decode(ids, skip_special_tokens=False) == text, (
            f"round trip failed for {text!r}"
        )
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            ours_text = ours.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
            theirs_text = theirs.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            assert ours_text == theirs_text, (
                f"chat differs ({add_generation_prompt=}): {ours_text!r} vs {theirs_text!r}"
            )
            assert ours.encode(ours_text) == theirs.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
    assert ours.vocab_size == len(theirs)
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, role) == getattr(theirs, role), role


def test_tiny_matches_transformers(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    assert tok.vocab_size == TINY_VOCAB_SIZE
    check_against_transformers(tok, AutoTokenizer.from_pretrained(tiny_dir))


def test_tiny_special_tokens(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == {2}
    assert tok.encode("<|im_end|>") == [2]  # a control token is one id, never split by BPE
    assert tok.encode("hi")[0] != tok.bos_token_id  # add_bos_token is false
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_bos_from_post_processor_and_eos_from_generation_config(tmp_path: Path) -> None:
    """A post-processor that adds BOS adds it in encode (as in transformers); generation_config's
    eos list and ChatML's <|im_end|> both end generation."""
    d = make_tiny_tokenizer(tmp_path)
    backend = load_tokenizer(d).backend
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(d / "tokenizer.json"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    tok = load_tokenizer(d)
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id == 1
    assert ids == AutoTokenizer.from_pretrained(d).encode("hello")
    assert tok.encode("hello", add_special_tokens=False) == ids[1:]
    assert tok.eos_token_ids == {0, 1, 2}


def test_chat_template_jinja_file_and_environment(tmp_path: Path) -> None:
    """chat_template.jinja wins over tokenizer_config.json (transformers 5 layout), and the jinja
    environment has transformers' helpers: raise_exception, tojson without HTML escaping,
    loop controls, special-token variables, and the {% generation %} tag."""
    d = make_tiny_tokenizer(tmp_path)
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}"
        "{% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}"
        "{{ m['role'] }}: {{ m['content'] | tojson if 'content' in m else '-' }}"
        "{% endgeneration %}"
        "{{ eos_token }}\n"
        "{% endfor %}"
    )
    tok, theirs = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    messages = [
        {"role": "user", "content": "<a & b>"},
        {"role": "skip", "content": "x"},
        {"role": "tool", "content": None},
    ]
    assert tok.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)
    with pytest.raises(Exception, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


def test_fingerprint(tiny_dir: Path, tmp_path: Path) -> None:
    a = load_tokenizer(tiny_dir)
    assert (
        a.fingerprint()
        == load_tokenizer(make_tiny_tokenizer(tmp_path / "again", chat_template=None)).fingerprint()
    )
    spec = json.loads((tiny_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # one merge less changes some ids
    (tmp_path / "changed").mkdir()
    (tmp_path / "changed" / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path / "changed").fingerprint() != a.fingerprint()


def test_missing_files_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in") as e:
        load_tokenizer(tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    d = make_tiny_tokenizer(tmp_path / "no_template", chat_template=None)
    with pytest.raises(ValueError, match="no chat_template") as e:
        load_tokenizer(d).apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


@pytest.mark.teacher
def test_teacher_matches_transformers(teacher_dir: Path) -> None:
    tok = load_tokenizer(teacher_dir)
    check_against_transformers(tok, AutoTokenizer.from_pretrained(teacher_dir))
    assert tok.vocab_size == 49152
    # SmolLM2's tokenizer_config.json: bos <|im_start|> (1), eos and pad <|im_end|> (2).
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == {2}
    # smollm pre-tokenizer: every digit is its own token.
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
