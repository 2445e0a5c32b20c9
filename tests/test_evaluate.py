"""Checks kd/evaluate.py and scripts/evaluate.py on tiny random llamas with the tiny tokenizer:
reading an evaluation file (prompt/response and messages records, one-line errors), the
teacher-forced metrics (padding-invariant, KL 0 against itself, equal to kd/metrics.py's
token_metrics on one unpadded example), batched greedy answers equal to one-by-one
generation, a teacher reproducing its own greedy answers, the table, and the CLI.

Run: `.venv/bin/python -m pytest -q tests/test_evaluate.py`.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer

from kd.data import load_prompts
from kd.evaluate import (
    degenerate_share,
    distinct_n,
    evaluate,
    format_table,
    greedy_answers,
    is_degenerate,
    load_eval_set,
)
from kd.hf import load_model
from kd.metrics import summarize, teacher_forced_metrics, token_metrics
from kd.rouge import corpus_rouge_l
from kd.sampling import generate
from kd.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of Spain?",
    "Explain a tokenizer.",
    "Tell me about the river.",
    "def add(a, b):",
    "Café",
]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model_dir(path: Path, seed: int) -> Path:
    make_tiny_checkpoint(
        path, "llama", seed=seed, vocab_size=TINY_VOCAB_SIZE, initializer_range=0.2
    )
    make_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny 'teacher', a different tiny 'student', and the teacher's greedy answers as data."""
    root = tmp_path_factory.mktemp("evaluate")
    teacher_dir, student_dir = (
        tiny_model_dir(root / "teacher", 0),
        tiny_model_dir(root / "student", 1),
    )
    tok = load_tokenizer(teacher_dir)
    prompts = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
            add_special_tokens=False,
        )
        for q in QUESTIONS
    ]
    answers = greedy_answers(
        load_model(teacher_dir).eval(), tok, prompts, max_new_tokens=10, log=lambda s: None
    )
    data = root / "heldout.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in zip(QUESTIONS, answers))
    )
    return {"teacher": teacher_dir, "student": student_dir, "data": data}


def test_load_eval_set_reads_both_record_kinds(dirs, tmp_path) -> None:
    tok = load_tokenizer(dirs["teacher"])
    eval_set = load_eval_set(dirs["data"], tok)
    records = [json.loads(line) for line in dirs["data"].read_text().splitlines()]
    assert eval_set.questions == QUESTIONS
    assert eval_set.references == [r["response"] for r in records]
    assert eval_set.prompts == [p.ids for p in load_prompts(dirs["data"], tok)[0]]
    assert len(eval_set.examples) == len(QUESTIONS)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello there."},
                ]
            }
        )
        + "\n"
    )
    eval_set = load_eval_set(chat, tok)
    assert (eval_set.questions, eval_set.references) == (["Hi"], ["Hello there."])


def test_load_eval_set_needs_teacher_answers(dirs, tmp_path) -> None:
    tok = load_tokenizer(dirs["teacher"])
    no_answer = tmp_path / "prompts.jsonl"
    no_answer.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "And?"},
                ]
            }
        )
        + "\n"
    )
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: no teacher answer"):
        load_eval_set(no_answer, tok)


def test_teacher_forced_metrics(dirs) -> None:
    tok = load_tokenizer(dirs["teacher"])
    teacher, student = load_model(dirs["teacher"]).eval(), load_model(dirs["student"]).eval()
    examples = load_eval_set(dirs["data"], tok).examples
    pad = tok.pad_id
    one = teacher_forced_metrics(student, examples, teacher=teacher, pad_id=pad, batch_size=1)
    padded = teacher_forced_metrics(student, examples, teacher=teacher, pad_id=pad, batch_size=3)
    # Right padding carries no labels; only float rounding of the padded matmuls differs.
    for key in one:
        assert math.isclose(one[key], padded[key], rel_tol=1e-5), (key, one[key], padded[key])
    assert one["kl"] > 0.01 and one["top1_agreement"] < 1.0
    # Against token_metrics directly on the first example, with the labels the loader built.
    ids, labels = torch.tensor([examples[0].input_ids]), torch.tensor([examples[0].labels])
    with torch.no_grad():
        direct = summarize(token_metrics(student(ids), teacher(ids), labels))
    first = teacher_forced_metrics(student, examples[:1], teacher=teacher, pad_id=pad)
    assert all(math.isclose(first[k], direct[k], rel_tol=1e-6) for k in direct), (first, direct)
    itself = teacher_forced_metrics(teacher, examples, teacher=teacher, pad_id=pad, batch_size=2)
    assert (itself["kl"], itself["top1_agreement"]) == (0.0, 1.0)


def test_greedy_answers_match_one_by_one_generation(dirs) -> None:
    tok = load_tokenizer(dirs["student"])
    model = load_model(dirs["student"]).eval()
    prompts = load_eval_set(dirs["data"], tok).prompts
    answers = greedy_answers(
        model, tok, prompts, max_new_tokens=10, batch_size=2, log=lambda s: None
    )
    alone = [
        tok.decode(
            generate(
                model,
                [p],
                max_new_tokens=10,
                temperature=0.0,
                eos_token_ids=tok.eos_token_ids,
                pad_id=tok.pad_id,
            )[0]
        )
        for p in prompts
    ]
    assert answers == alone


def test_teacher_recovers_its_own_answers_and_table(dirs) -> None:
    tok = load_tokenizer(dirs["teacher"])
    teacher, student = load_model(dirs["teacher"]).eval(), load_model(dirs["student"]).eval()
    eval_set = load_eval_set(dirs["data"], tok)
    mine = evaluate(teacher, tok, eval_set, teacher=teacher, max_new_tokens=10, log=lambda s: None)
    # Random tiny models can answer with no letters or digits at all, which Rouge-L scores 0
    # even against itself; so compare with the references' own score rather than with 100.
    assert mine["answers"] == eval_set.references and mine["kl"] == 0.0
    assert mine["rouge_l"] == corpus_rouge_l(eval_set.references, eval_set.references) > 0
    given = evaluate(
        teacher, tok, eval_set, teacher=teacher, answers=eval_set.references, log=lambda s: None
    )
    assert (
        given["answers"] is eval_set.references
        and given["rouge_l"] == mine["rouge_l"]
        and given["tokens_per_s"] > 0
    )
    other = evaluate(student, tok, eval_set, teacher=teacher, max_new_tokens=10, log=lambda s: None)
    assert other["rouge_l"] < 100.0 and other["kl"] > 0 and len(other["answers"]) == len(QUESTIONS)
    table = format_table(
        {"teacher": mine, "student": other, "no teacher": {"ppl": 3.0}}
    ).splitlines()
    assert table[0].startswith("| model | params (M) | KL to teacher") and len(table) == 5
    assert (
        table[2].startswith("| teacher | 0.") and "| 0.000 |" in table[2] and "100.0%" in table[2]
    )
    assert table[4].startswith("| no teacher | – | – | 3.00 |")


def test_cli_prints_the_table(dirs, tmp_path, capsys) -> None:
    cli = load_script("evaluate")
    out = tmp_path / "metrics.json"
    rc = cli.main(
        [
            "--model",
            str(dirs["student"]),
            "--teacher",
            str(dirs["teacher"]),
            "--data",
            str(dirs["data"]),
            "--max-new-tokens",
            "10",
            "--dtype",
            "fp32",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith("| model |") and stdout[2].startswith(f"| {dirs['student']} |")
    saved = json.loads(out.read_text())
    assert saved["kl"] > 0 and len(saved["answers"]) == len(QUESTIONS)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "/no/such/dir"}, "--model /no/such/dir: no config.json"),
        ({"--data": "/no/such.jsonl"}, "/no/such.jsonl"),
        ({"--batch-size": "0"}, "must be >= 1"),
    ],
)
def test_cli_errors_are_one_line(dirs, capsys, change, message) -> None:
    args = {
        "--model": str(dirs["student"]),
        "--teacher": str(dirs["teacher"]),
        "--data": str(dirs["data"]),
        **change,
    }
    rc = load_script("evaluate").main([x for kv in args.items() for x in kv])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_degeneration_measures() -> None:
    """Hand-counted: a 3-gram three times makes an answer degenerate; distinct-2 counts word
    bigrams over all answers, punctuation and case ignored."""
    loop = "The river, a river, river, river, river, river."  # "river river river" x3
    fine = "The river rises in spring and floods the valley."
    twice = "a b c a b c"  # "a b c" only twice
    assert degenerate_share([loop, fine, twice]) == 1 / 3
    assert [is_degenerate(a) for a in (loop, fine, twice)] == [True, False, False]
    assert is_degenerate(twice + " a b c")  # a third time
    assert degenerate_share([]) == 0.0
    # "a b c a b c": bigrams ab bc ca ab bc -> 3 distinct of 5
    assert distinct_n([twice], 2) == 3 / 5
    # + "x y": 4 distinct of 6
    assert distinct_n([twice, "X, y!"], 2) == 4 / 6
    assert distinct_n(["one"], 2) == 0.0
