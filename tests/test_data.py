"""Tests for kd/data.py: label masks, truncation, errors, and the batch stream.

Checks that the three record kinds train exactly the intended tokens (found by decoding the
labelled tokens), that truncation and dropping are counted, that malformed input fails naming
file and line, that ranks x micro-batches partition the same global batch for every split of
it, that the stream is deterministic by seed, changes order across epochs, resumes exactly and
mixes sources by ratio. Uses the real tiny BPE tokenizer (tests/tiny_tokenizer.py) and, when
imported, the SmolLM2 teacher's tokenizer.

Run: .venv/bin/python -m pytest -q tests/test_data.py
"""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import CHATML, make_tiny_tokenizer

from kd.data import IGNORE, Batches, collate, load_examples, load_prompts
from kd.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """The same tokenizer without a chat template."""
    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("plain"), chat_template=None))


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts) or raw lines (str) to a JSONL file."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def trained_text(tok, example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE], skip_special_tokens=False)


def check_shifted(example) -> None:
    """labels[t] is either IGNORE or the next input token; the last position has no target."""
    ids, labels = example.input_ids, example.labels
    assert len(ids) == len(labels) and labels[-1] == IGNORE
    assert all(label in (IGNORE, ids[t + 1]) for t, label in enumerate(labels[:-1]))
    assert example.num_targets == sum(label != IGNORE for label in labels)


# ----------------------------------------------------------------------------- label masks


def test_text_record_trains_every_token_and_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The river rises in the hills."}])
    [ex], stats = load_examples(path, tok, seq_len=64)
    assert ex.input_ids == tok.encode("The river rises in the hills.") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids[1:] + [IGNORE]
    assert ex.prompt_ids == []
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (1, 1, 0, 0)


def test_prompt_response_with_template_trains_reply_and_end_of_turn(tok, tmp_path):
    record = {"prompt": "What is the capital of France?", "response": "Paris."}
    [ex], _ = load_examples(write_jsonl(tmp_path / "p.jsonl", [record]), tok, seq_len=64)
    check_shifted(ex)
    assert trained_text(tok, ex) == "Paris.<|im_end|>"  # not the newline ChatML renders after it
    chat = [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == tok.apply_chat_template(chat)
    assert tok.decode(ex.prompt_ids, skip_special_tokens=False) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_response_without_template_trains_response_and_eos(plain_tok, tmp_path):
    record = {"prompt": "Question: capital of Italy? Answer:", "response": " Rome."}
    [ex], _ = load_examples(write_jsonl(tmp_path / "p.jsonl", [record]), plain_tok, seq_len=64)
    check_shifted(ex)
    assert ex.prompt_ids == plain_tok.encode(record["prompt"])
    assert trained_text(plain_tok, ex) == " Rome.<|im_end|>"


def test_messages_train_only_assistant_turns(tok, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Japan?"},
        {"role": "assistant", "content": "Tokyo."},
        {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    [ex], _ = load_examples(
        write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), tok, seq_len=128
    )
    check_shifted(ex)
    assert trained_text(tok, ex) == "Tokyo.<|im_end|>Madrid.<|im_end|>"
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == tok.apply_chat_template(messages)
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert ex.prompt_ids == tok.encode(prompt, add_special_tokens=False)


def test_truncation_and_dropping_are_counted(tok, tmp_path):
    long_text = "The capital of France is Paris. " * 20
    # The last record's reply starts past seq_len: it is dropped.
    records = [{"text": long_text}, {"text": "short"}, {"prompt": long_text, "response": "Paris."}]
    examples, stats = load_examples(write_jsonl(tmp_path / "l.jsonl", records), tok, seq_len=16)
    assert (stats.records, stats.truncated, stats.dropped, stats.examples) == (3, 2, 1, 2)
    assert [len(e.input_ids) for e in examples] == [16, len(tok.encode("short")) + 1]
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.targets == sum(e.num_targets for e in examples)
    for e in examples:
        check_shifted(e)


def test_collate_right_pads_with_ignored_labels(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a b c d e f"}, {"text": "a"}])
    examples, _ = load_examples(path, tok, seq_len=64)
    batch = collate(examples, pad_id=tok.pad_token_id)
    n0, n1 = len(examples[0].input_ids), len(examples[1].input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, n0)
    assert batch["input_ids"][1, n1:].eq(tok.pad_token_id).all()
    assert batch["labels"][1, n1 - 1 :].eq(IGNORE).all()
    assert batch["labels"][0].tolist() == examples[0].labels


# ----------------------------------------------------------------------------- prompts


def test_load_prompts_match_training_prompts(tok, tmp_path):
    chat = [
        {"role": "user", "content": "Capital of Japan?"},
        {"role": "assistant", "content": "Tokyo."},
    ]
    records = [
        {"prompt": "Capital of Japan?"},
        {"messages": chat},
        {"prompt": "Capital of Japan? " * 30},
    ]
    prompts, stats = load_prompts(write_jsonl(tmp_path / "q.jsonl", records), tok, max_len=40)
    [ex], _ = load_examples(
        write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}]), tok, seq_len=64
    )
    assert [p.ids for p in prompts] == [ex.prompt_ids, ex.prompt_ids]
    assert prompts[1].messages == chat[:1]  # the final assistant turn is the reply to redo
    assert (stats.examples, stats.dropped) == (2, 1)


# ----------------------------------------------------------------------------- errors


def test_malformed_line_names_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, '{"text": "oops"'])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a valid"):
        load_examples(path, tok, seq_len=16)


@pytest.mark.parametrize(
    "record, field",
    [
        ({"question": "hi"}, '"text"'),
        ({"prompt": "hi"}, '"response"'),
        ({"text": 3}, '"text"'),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
        ({"messages": [{"role": "user"}]}, r'"messages\[0\]"'),
        (
            {"messages": [{"role": "assistant", "content": "hi"}]},
            r'"messages\[0\]" is an assistant',
        ),
    ],
)
def test_bad_record_names_file_line_and_field(tok, tmp_path, record, field):
    path = write_jsonl(tmp_path / "r.jsonl", ["", {"text": "ok"}, record])
    with pytest.raises(ValueError, match=rf"r\.jsonl:3: .*{field}"):
        load_examples(path, tok, seq_len=16)


def test_messages_need_a_chat_template(plain_tok, tmp_path):
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match=r"m\.jsonl:1: .*chat template"):
        load_examples(
            write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}]), plain_tok, seq_len=16
        )


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # Rendering the message count first changes the text of every prefix, as templates that
    # drop past reasoning do; the assistant tokens cannot then be located.
    tok = load_tokenizer(
        make_tiny_tokenizer(tmp_path / "tok", chat_template="{{ messages|length }}" + CHATML)
    )
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match=r'm\.jsonl:1: field "messages\[1\]": the chat template'):
        load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}]), tok, seq_len=16)


def test_missing_and_empty_files(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl", tok, seq_len=16)
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]), tok, seq_len=16)


# ----------------------------------------------------------------------------- batch stream


@pytest.fixture(scope="module")
def numbered(tok, tmp_path_factory):
    """40 distinct examples of different lengths; an example is identified by its tokens."""
    path = tmp_path_factory.mktemp("n") / "n.jsonl"
    write_jsonl(path, [{"text": f"example {i}" + " more" * (i % 5)} for i in range(40)])
    return load_examples(path, tok, seq_len=64)[0]


def key(example) -> tuple[int, ...]:
    return tuple(example.input_ids)


def rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """The examples of a collated batch, padding stripped (pad positions carry IGNORE)."""
    out = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        # Keep through the last position with a target and the token after it (its target).
        n = max(t for t, label in enumerate(labels) if label != IGNORE) + 2
        out.append(tuple(ids[:n]))
    return out


def batches(sources, *, batch_size=2, grad_accum=4, rank=0, world_size=1, seed=0):
    return Batches(
        sources,
        batch_size=batch_size,
        grad_accum=grad_accum,
        rank=rank,
        world_size=world_size,
        seed=seed,
        pad_id=2,
    )


def test_ranks_and_micro_batches_partition_the_same_global_batch(numbered):
    # G = 8 in every split; steps 0..6 cross the epoch boundary at step 5 (40 examples).
    for step in range(7):
        seen = []
        for world_size, grad_accum, batch_size in [(1, 4, 2), (2, 2, 2), (4, 1, 2), (2, 1, 4)]:
            union = Counter()
            for rank in range(world_size):
                b = batches(
                    [(numbered, 1.0)],
                    batch_size=batch_size,
                    grad_accum=grad_accum,
                    rank=rank,
                    world_size=world_size,
                )
                micro = b.micro_batches(step)
                assert len(micro) == grad_accum
                assert all(m["input_ids"].shape[0] == batch_size for m in micro)
                union.update(row for m in micro for row in rows(m))
            assert sum(union.values()) == 8
            seen.append(union)
        assert all(u == seen[0] for u in seen), f"step {step}: splits disagree"


def test_each_epoch_is_a_permutation_and_epochs_differ(numbered):
    b = batches([(numbered, 1.0)])
    epoch0 = [key(e) for s in range(5) for e in b.global_batch_examples(s)]
    epoch1 = [key(e) for s in range(5, 10) for e in b.global_batch_examples(s)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(key(e) for e in numbered)
    assert epoch0 != epoch1
    assert b.epochs(5) == [1.0]


def test_deterministic_by_seed(numbered):
    def stream(seed):
        b = batches([(numbered, 1.0)], seed=seed)
        return [[key(e) for e in b.global_batch_examples(s)] for s in range(6)]

    assert stream(0) == stream(0)
    assert stream(0) != stream(1)


def test_resume_from_state_equals_uninterrupted(numbered):
    straight = batches([(numbered, 1.0)], seed=3)
    resumed = batches([(numbered, 1.0)], seed=3)
    resumed.load_state_dict(straight.state_dict())
    for step in range(3, 9):
        for a, b in zip(straight.micro_batches(step), resumed.micro_batches(step)):
            assert torch.equal(a["input_ids"], b["input_ids"])
            assert torch.equal(a["labels"], b["labels"])
    for changed in [
        batches([(numbered, 1.0)], seed=4),
        batches([(numbered[1:], 1.0)], seed=3),
        batches([(numbered, 1.0)], seed=3, grad_accum=2),
    ]:
        with pytest.raises(ValueError, match="checkpoint's data"):
            changed.load_state_dict(straight.state_dict())


def test_mixture_holds_its_ratio(numbered):
    teacher, real = numbered[:30], numbered[30:]
    teacher_keys = {key(e) for e in teacher}
    b = batches([(teacher, 0.7), (real, 0.3)])
    counts = [sum(key(e) in teacher_keys for e in b.global_batch_examples(s)) for s in range(100)]
    assert set(counts) == {5, 6}  # 0.7 * 8 = 5.6 per step
    assert sum(counts) == 560  # floor(0.7 * 800): exact over many steps
    assert b.epochs(100) == [560 / 30, 240 / 10]
    with pytest.raises(ValueError, match="source 1 gets 0.40 examples"):
        batches([(teacher, 0.95), (real, 0.05)])


def test_global_targets_counts_every_rank(numbered):
    b = batches([(numbered, 1.0)], grad_accum=2, world_size=2)
    ranks = [batches([(numbered, 1.0)], grad_accum=2, world_size=2, rank=r) for r in range(2)]
    for step in range(3):
        total = sum(int(m["labels"].ne(IGNORE).sum()) for r in ranks for m in r.micro_batches(step))
        assert b.global_targets(step) == total


# ----------------------------------------------------------------------------- the teacher


@pytest.mark.teacher
def test_teacher_tokenizer_masks(teacher_dir, tmp_path):
    tok = load_tokenizer(teacher_dir)
    record = {"prompt": "What is the capital of France?", "response": "Paris."}
    [ex], _ = load_examples(write_jsonl(tmp_path / "p.jsonl", [record]), tok, seq_len=128)
    check_shifted(ex)
    assert trained_text(tok, ex) == "Paris.<|im_end|>"
    assert tok.decode(ex.prompt_ids, skip_special_tokens=False).endswith(
        "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
