"""Model-level evaluation of a distilled student against its teacher, on a set of held-out
prompts with the teacher's answers ({"prompt", "response"} records, as generate.py writes them,
or {"messages"} ending with the teacher's assistant turn).

Two kinds of numbers, the ones distillation papers report (kd/eval.py has the pure metrics):

1. Teacher-forced, on the teacher's responses: both models read prompt + teacher response and
   at every response token we compare their next-token distributions: forward KL(teacher ||
   student) per token, the student's perplexity of the teacher's text, and top-1 agreement
   (argmax_student == argmax_teacher). This is the quantity logit distillation minimizes.
2. Free-running: the student answers each prompt greedily and Rouge-L F1 (MiniLLM protocol,
   kd/eval.corpus_rouge_l) scores its answer against the teacher's greedy answer.
3. Speed: tokens/s of batched greedy generation on the same work for every model (the first
   SPEED_BATCH prompts, exactly SPEED_TOKENS new tokens each, EOS ignored, prefill included),
   so rows of one table compare. Timing the answers themselves would not: a student that never stops
   runs every row to the token limit and looks faster than one that ends its answers.

    eval_set = load_eval_set("runs/demo/data/heldout.jsonl", tokenizer)
    metrics = evaluate(student, tokenizer, eval_set, teacher=teacher)
    print(format_table({"student": metrics}))

Used by scripts/demo.py, scripts/evaluate.py (any student from the command line) and
scripts/compare_methods.py. Tests: `.venv/bin/python -m pytest -q tests/test_evaluate.py`.
"""

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kd.data import Example, collate, load_examples, load_prompts
from kd.eval import accumulate, corpus_rouge_l, summarize, token_metrics
from kd.model import Transformer
from kd.sampling import generate
from kd.tokenizer import Tokenizer

# Table columns: metrics key -> (header, format). Arrows say which way is better.
SPEED_BATCH, SPEED_TOKENS = (
    16,
    32,
)  # the generation-speed measurement: prompts in one batch, new tokens each
COLUMNS = {
    "params_m": ("params (M)", "{:.1f}"),
    "kl": ("KL to teacher ↓", "{:.3f}"),
    "ppl": ("PPL on teacher text ↓", "{:.2f}"),
    "top1_agreement": ("top-1 agreement ↑", "{:.1%}"),
    "rouge_l": ("Rouge-L F1 vs teacher ↑", "{:.1f}"),
    "tokens_per_s": ("tokens/s ↑", "{:.0f}"),
}


@dataclass
class EvalSet:
    examples: list[
        Example
    ]  # prompt + teacher response, labels on the response (teacher-forced metrics)
    prompts: list[
        list[int]
    ]  # each record's prompt tokens, chat-templated as in training (greedy answers)
    questions: list[str]  # each record's last user message, for showing answers side by side
    references: list[str]  # each record's teacher answer (Rouge-L reference)


def load_eval_set(path: str | Path, tokenizer: Tokenizer, *, seq_len: int = 1024) -> EvalSet:
    """Read an evaluation file; every record must carry the teacher's answer.

    Tokenization is kd/data.py's, the same the student was trained with; an example longer
    than seq_len tokens is cut there (the generation prompts are not).
    """
    examples, _ = load_examples(path, tokenizer, seq_len=seq_len)
    prompts, _ = load_prompts(path, tokenizer)
    questions, references = [], []
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for n, line in enumerate(lines, 1):
        record = json.loads(line)  # load_examples has already checked every line
        if "messages" in record and record["messages"][-1]["role"] == "assistant":
            references.append(record["messages"][-1]["content"])
            questions.append(
                next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")
            )
        elif "prompt" in record and "response" in record:
            references.append(record["response"])
            questions.append(record["prompt"])
        else:
            raise ValueError(
                f'{path}:{n}: no teacher answer; an evaluation record needs "prompt" and '
                '"response", or "messages" ending with an assistant turn (generate.py writes them)'
            )
    return EvalSet(examples, [p.ids for p in prompts], questions, references)


def pad_id_of(tokenizer: Tokenizer) -> int:
    """Padding id: the tokenizer's pad token, else its smallest end-of-sequence id."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if not tokenizer.eos_token_ids:
        raise ValueError(
            "the tokenizer defines neither a pad nor an EOS token; add one to tokenizer_config.json"
        )
    return min(tokenizer.eos_token_ids)


@torch.no_grad()
def teacher_forced_metrics(
    model: Transformer,
    examples: list[Example],
    *,
    teacher: Transformer | None = None,
    pad_id: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """nll, ppl (and with a teacher: kl, top1_agreement) over the response tokens of `examples`.

    The teacher may be the model itself (its own row in a table): its logits are then reused,
    which gives KL 0 and agreement 1 exactly, without a second forward.
    """
    device = model.head_weight.device
    # Padded vocabularies (e.g. rounded up to a multiple of 64) are compared on their shared
    # prefix: rows past the tokenizer are never real tokens.
    vocab = (
        model.config.vocab_size
        if teacher is None
        else min(model.config.vocab_size, teacher.config.vocab_size)
    )
    sums = None
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id=pad_id)
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)  # (B, T) each
        s_logits = model(input_ids)[..., :vocab]  # (B, T, V)
        t_logits = None
        if teacher is not None:
            t_logits = (
                s_logits if teacher is model else teacher(input_ids)[..., :vocab]
            )  # (B, T, V)
        sums = accumulate(sums, token_metrics(s_logits, t_logits, labels))
    return summarize(sums)


def greedy_answers(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Greedy (temperature 0) answers to `prompts`, in order, in batches of batch_size, each row
    stopping at its own EOS."""
    eos = set(tokenizer.eos_token_ids)
    answers, new_tokens, seconds = [], 0, 0.0
    for start in range(0, len(prompts), batch_size):
        t0 = time.perf_counter()
        out = generate(
            model,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eos_token_ids=eos,
            pad_id=pad_id_of(tokenizer),
        )
        seconds += time.perf_counter() - t0
        new_tokens += sum(len(tokens) for tokens in out)
        answers += [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out]
        done = len(answers)
        eta = seconds / done * (len(prompts) - done)
        log(
            f"  greedy answers {done}/{len(prompts)}, {new_tokens / seconds:.0f} tokens/s, ETA {eta:.0f} s"
        )
    return answers


def decode_speed(
    model: Transformer, prompts: list[list[int]], *, pad_id: int, new_tokens: int
) -> float:
    """New tokens/s of one batch of greedy generation: every prompt gets exactly `new_tokens`
    (no EOS stops a row), prefill included. The same prompts give every model the same work."""
    generate(
        model, prompts[:1], max_new_tokens=2, temperature=0.0, eos_token_ids=None, pad_id=pad_id
    )  # warm-up
    t0 = time.perf_counter()
    generate(
        model,
        prompts,
        max_new_tokens=new_tokens,
        temperature=0.0,
        eos_token_ids=None,
        pad_id=pad_id,
    )
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    eval_set: EvalSet,
    *,
    teacher: Transformer | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    answers: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every number of the table for one model, plus its answers.

    answers: the model's greedy answers when they are known already, e.g. for the teacher
    whose greedy answers are the references (its Rouge-L is then 100 by construction);
    else they are generated.

    Returns {"params_m", "nll", "ppl", "tokens", "rouge_l", "tokens_per_s", "answers"} and, with
    a teacher, "kl" and "top1_agreement". Put the model (and teacher) in eval mode on the
    device and dtype to evaluate in; bf16 logits change the KL by ~1e-3 nats (FACTS.md).
    """
    t0 = time.perf_counter()
    metrics: dict = teacher_forced_metrics(
        model,
        eval_set.examples,
        teacher=teacher,
        pad_id=pad_id_of(tokenizer),
        batch_size=max(1, batch_size // 2),
    )
    log(
        f"  teacher-forced metrics on {int(metrics['tokens'])} response tokens in {time.perf_counter() - t0:.0f} s"
    )
    if answers is None:
        answers = greedy_answers(
            model,
            tokenizer,
            eval_set.prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            log=log,
        )
    speed_prompts = eval_set.prompts[:SPEED_BATCH]
    tokens_per_s = decode_speed(
        model, speed_prompts, pad_id=pad_id_of(tokenizer), new_tokens=SPEED_TOKENS
    )
    log(
        f"  generation speed: {tokens_per_s:.0f} tokens/s ({len(speed_prompts)} prompts x {SPEED_TOKENS} tokens)"
    )
    metrics |= {
        "params_m": model.num_params() / 1e6,
        "rouge_l": corpus_rouge_l(answers, eval_set.references),
        "tokens_per_s": tokens_per_s,
        "answers": answers,
    }
    return metrics


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table, one row per model, of the COLUMNS its metrics have ('–' where absent)."""
    keys = [k for k in COLUMNS if any(k in m for m in rows.values())]
    lines = [
        "| model | " + " | ".join(COLUMNS[k][0] for k in keys) + " |",
        "| --- | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for name, m in rows.items():
        cells = [COLUMNS[k][1].format(m[k]) if k in m else "–" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_machine(device: torch.device) -> str:
    """One line for a results table: CPU model and cores (or the GPU), torch version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if (
        cpuinfo.is_file()
    ):  # Linux names the model there; platform.processor() often says only x86_64
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    return f"{cpu}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"
