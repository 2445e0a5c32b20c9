"""Model-level evaluation of a distilled student against its teacher, on a set of held-out
prompts with the teacher's answers ({"prompt", "response"} records, as generate.py writes them,
or {"messages"} ending with the teacher's assistant turn).

Three kinds of numbers, the ones distillation papers report:

1. Teacher-forced, on the teacher's responses (kd/metrics.py): both models read prompt +
   teacher response and at every response token we compare their next-token distributions:
   forward KL(teacher || student) per token, the student's perplexity of the teacher's text,
   and top-1 agreement (argmax_student == argmax_teacher). This is the quantity logit
   distillation minimizes.
2. Free-running: the student answers each prompt greedily and Rouge-L F1 (MiniLLM protocol,
   kd/rouge.py) scores its answer against the teacher's greedy answer. Degeneration, which
   Rouge-L and the teacher-forced numbers miss (a student can close most of the KL gap and
   still answer "The river, a river, river, river, ..."): the share of answers in which some
   word 3-gram occurs 3 or more times, and distinct-2, the distinct word bigrams over all
   bigrams of all answers (Li et al., arXiv 1510.03055).
3. Speed: tokens/s of batched greedy generation on the same work for every model (the first
   SPEED_BATCH prompts, exactly SPEED_TOKENS new tokens each, EOS ignored, prefill included),
   so rows of one table compare. Timing the answers themselves would not: a student that
   never stops runs every row to the token limit and looks faster than one that ends its
   answers.

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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kd.data import Example, load_examples, load_prompts, read_jsonl
from kd.hf import load_model
from kd.metrics import teacher_forced_metrics
from kd.model import Transformer
from kd.pipeline import write_json
from kd.rouge import corpus_rouge_l, rouge_tokenize
from kd.sampling import generate
from kd.tokenizer import Tokenizer

# The generation-speed measurement: prompts in one batch, new tokens each.
SPEED_BATCH, SPEED_TOKENS = 16, 32
# Table columns: metrics key -> (header, format). Arrows say which way is better.
COLUMNS = {
    "params_m": ("params (M)", "{:.1f}"),
    "kl": ("KL to teacher ↓", "{:.3f}"),
    "ppl": ("PPL on teacher text ↓", "{:.2f}"),
    "top1_agreement": ("top-1 agreement ↑", "{:.1%}"),
    "rouge_l": ("Rouge-L F1 vs teacher ↑", "{:.1f}"),
    "degenerate": ("degenerate answers ↓", "{:.0%}"),
    "distinct_2": ("distinct-2 ↑", "{:.2f}"),
    "tokens_per_s": ("tokens/s ↑", "{:.0f}"),
}


# Metrics where a distilled student must beat its start (`verdict`), and which way is better.
QUALITY = ("kl", "ppl", "top1_agreement", "rouge_l")
LOWER_IS_BETTER = {"kl", "ppl"}


@dataclass
class EvalSet:
    # prompt + teacher response, labels on the response (teacher-forced metrics)
    examples: list[Example]
    # each record's prompt tokens, chat-templated as in training (greedy answers)
    prompts: list[list[int]]
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
    for where, record in read_jsonl(path):  # load_examples has already checked every record
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
                f'{where}: no teacher answer; an evaluation record needs "prompt" and '
                '"response", or "messages" ending with an assistant turn; generate.py '
                "writes such records"
            )
    return EvalSet(examples, [p.ids for p in prompts], questions, references)


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
            pad_id=tokenizer.pad_id,
        )
        seconds += time.perf_counter() - t0
        new_tokens += sum(len(tokens) for tokens in out)
        answers += [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out]
        done = len(answers)
        eta = seconds / done * (len(prompts) - done)
        speed = new_tokens / seconds
        log(f"  greedy answers {done}/{len(prompts)}, {speed:.0f} tokens/s, ETA {eta:.0f} s")
    return answers


def decode_speed(
    model: Transformer, prompts: list[list[int]], *, pad_id: int, new_tokens: int
) -> float:
    """New tokens/s of one batch of greedy generation: every prompt gets exactly `new_tokens`
    (no EOS stops a row), prefill included. The same prompts give every model the same work."""
    # Warm-up: the first call pays for allocations (and lazy initialization) once.
    generate(
        model, prompts[:1], max_new_tokens=2, temperature=0.0, eos_token_ids=None, pad_id=pad_id
    )
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

    Returns {"params_m", "nll", "ppl", "tokens", "rouge_l", "degenerate", "distinct_2",
    "tokens_per_s", "answers"} and, with
    a teacher, "kl" and "top1_agreement". Put the model (and teacher) in eval mode on the
    device and dtype to evaluate in; bf16 logits change the KL by ~1e-3 nats.
    """
    t0 = time.perf_counter()
    metrics: dict = teacher_forced_metrics(
        model,
        eval_set.examples,
        teacher=teacher,
        pad_id=tokenizer.pad_id,
        batch_size=max(1, batch_size // 2),
    )
    seconds = time.perf_counter() - t0
    log(f"  teacher-forced metrics on {int(metrics['tokens'])} response tokens in {seconds:.0f} s")
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
        model, speed_prompts, pad_id=tokenizer.pad_id, new_tokens=SPEED_TOKENS
    )
    log(
        f"  generation speed: {tokens_per_s:.0f} tokens/s "
        f"({len(speed_prompts)} prompts x {SPEED_TOKENS} tokens)"
    )
    metrics |= {
        "params_m": model.num_params() / 1e6,
        "rouge_l": corpus_rouge_l(answers, eval_set.references),
        "degenerate": degenerate_share(answers),
        "distinct_2": distinct_n(answers, 2),
        "tokens_per_s": tokens_per_s,
        "answers": answers,
    }
    return metrics


def for_eval(model: Transformer, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The model on `device` in `dtype`, laid out for decoding (kd/linear.py), frozen."""
    return model.to(device=device, dtype=dtype).decode_layout().eval().requires_grad_(False)


class Rows:
    """The rows of a results table, one `evaluate` each, written to out/<name>.json: a stage
    of a run, skipped when its file exists, so an interrupted run resumes where it stopped.
    The teacher is loaded once, and only if a row still has to be computed."""

    def __init__(
        self,
        out: Path,
        teacher: str | Path,
        tokenizer: Tokenizer,
        eval_set: EvalSet,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_new_tokens: int,
        batch_size: int,
    ) -> None:
        self.out, self.teacher_dir, self.tokenizer, self.eval_set = (
            out,
            teacher,
            tokenizer,
            eval_set,
        )
        self.device, self.dtype, self._teacher = device, dtype, None
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def load(self, path: str | Path) -> Transformer:
        """A model directory, ready to evaluate in this table's device and dtype."""
        return for_eval(load_model(path, dtype=self.dtype), self.device, self.dtype)

    @property
    def teacher(self) -> Transformer:
        if self._teacher is None:
            self._teacher = self.load(self.teacher_dir)
        return self._teacher

    def path(self, name: str) -> Path:
        return self.out / f"{name.replace(' ', '_')}.json"

    def row(
        self, name: str, model: Callable[[], Transformer], answers: list[str] | None = None
    ) -> dict:
        """The metrics of `model()` (built only when needed), from its file when that exists;
        answers: as `evaluate` (the teacher's own answers are the references)."""
        path = self.path(name)
        if not path.exists():
            metrics = evaluate(
                model(),
                self.tokenizer,
                self.eval_set,
                teacher=self.teacher,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                answers=answers,
                log=lambda s: print(s, flush=True),
            )
            print(f"  {name}: " + format_table({name: metrics}).splitlines()[-1])
            write_json(path, metrics)
        return self.read(name)

    def read(self, name: str) -> dict:
        """A row computed earlier."""
        return json.loads(self.path(name).read_text(encoding="utf-8"))


def _words(text: str) -> list[str]:
    return rouge_tokenize(text, stem=False)  # lowercase runs of [a-z0-9]: punctuation ignored


def is_degenerate(answer: str, *, n: int = 3, repeats: int = 3) -> bool:
    """Whether some word n-gram occurs `repeats` or more times in `answer` (a loop)."""
    words = _words(answer)
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return any(count >= repeats for count in grams.values())


def degenerate_share(answers: list[str], *, n: int = 3, repeats: int = 3) -> float:
    """The share of answers in which some word n-gram occurs `repeats` or more times."""
    return sum(is_degenerate(a, n=n, repeats=repeats) for a in answers) / max(len(answers), 1)


def distinct_n(answers: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of all answers (1.0: no n-gram repeats); 0 when
    no answer has n words."""
    grams = [tuple(w[i : i + n]) for w in map(_words, answers) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def metrics_note(n_prompts: int) -> str:
    """What the table's columns are, for the demo's report and docs/results.md."""
    return (
        "KL, perplexity and top-1 agreement are per token of the teacher's greedy held-out "
        "answers (teacher-forced); Rouge-L F1 (MiniLLM protocol) compares each model's greedy "
        "answer with the teacher's (the teacher's own answers are the references: 100 by "
        "construction); degenerate answers repeat some word 3-gram 3 or more times; distinct-2 "
        "is distinct word bigrams over all bigrams of the answers; tokens/s is greedy "
        f"generation of exactly {SPEED_TOKENS} new tokens for "
        f"the first {min(SPEED_BATCH, n_prompts)} held-out prompts in one batch, prefill "
        "included: the same work for every model (a speed, not a quality metric)."
    )


def verdict(before: dict, after: dict) -> tuple[list[str], bool]:
    """Lines saying whether distillation helped on every quality metric and closed half the
    KL gap, and whether all of that holds. The teacher's own KL is 0, so the gap before is
    before["kl"]."""
    lines, ok = [], True
    for key in QUALITY:
        better = after[key] < before[key] if key in LOWER_IS_BETTER else after[key] > before[key]
        ok &= better
        change = f"{before[key]:.4g} -> {after[key]:.4g}"
        lines.append(f"- {key}: {change} ({'better' if better else 'NOT better'})")
    recovered = (before["kl"] - after["kl"]) / before["kl"]
    ok &= recovered >= 0.5
    lines.append(f"- held-out KL gap to the teacher closed: {recovered:.0%} (target >= 50%)")
    return lines, ok


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
    # Linux names the model there; platform.processor() often says only x86_64.
    if cpuinfo.is_file():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    return f"{cpu}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"
