"""Training data: JSONL records -> tokenized examples with shifted labels -> per-rank batches.

Record formats, one JSON object per line (blank lines are skipped); kinds may be mixed in a file:
  {"text": "..."}                                   loss on every token, plus eos
  {"prompt": "...", "response": "..."}              loss on the response and its end of turn
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
                                                    loss on the assistant turns only
A prompt/response pair is rendered as a two-turn chat when the tokenizer has a chat template
(the teacher saw its instruction data that way); without one it is `prompt + response + eos`.

Every `Example` holds `input_ids` and `labels` of equal length, labels ALREADY SHIFTED:
labels[t] = input_ids[t + 1] where that token is trained, else IGNORE (-100), so
`cross_entropy(logits[:, t], labels[:, t])` is next-token prediction with no slicing later.

Batching. For optimizer step s the global batch holds G = batch_size * grad_accum * world_size
examples; rank r takes slices m * world_size + r (m = 0 .. grad_accum - 1) of it, so the
union over ranks and micro-steps is the same G examples for any split of G: 2 ranks reproduce
1 process. `micro_batches(step)` is a pure function of the step, which makes the step the
data position a checkpoint stores; `state_dict()` pins the rest (seed, G, each source's size,
ratio and fingerprint) and `load_state_dict()` refuses a resume on different data.

Run `python -m kd.data FILE TOKENIZER_DIR --seq-len 512` to print a file's statistics and
the prompt and trained tokens of its first example.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import jinja2
import numpy as np
import torch

from kd.tokenizer import Tokenizer, load_tokenizer

IGNORE = -100  # label of positions without a target; cross_entropy's default ignore_index

# First element of every RNG key, so that the key kinds below can never collide
# (numpy's SeedSequence treats (5,), (5, 0) and (5, 0, 0) as the same seed).
_EPOCH_KEY, _BATCH_KEY = 1, 2


@dataclass(frozen=True)
class Example:
    input_ids: list[int]  # (T,) tokens, T <= seq_len
    labels: list[int]  # (T,) input_ids[t + 1] if trained else IGNORE; labels[-1] = IGNORE
    prompt_ids: list[int]  # tokens before the first trained response; [] for {"text"} records
    num_targets: int  # labels != IGNORE, kept so a step's token count costs no pass over labels
    index: int = -1  # position in load_examples' list of its file: the row key of a teacher cache
    # The conversation the tokens render (None: not rendered as a chat); a teacher of another
    # tokenizer renders it with its own chat template (kd/cross_tokenizer.py).
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]  # the conversation so far, ending before the reply to sample
    ids: list[int]  # its tokens, ending with the assistant header when there is a chat template


@dataclass
class DataStats:
    path: str
    records: int = 0  # non-blank lines read
    examples: int = 0  # examples kept (prompts, for load_prompts)
    truncated: int = 0  # examples cut to seq_len tokens
    dropped: int = 0  # examples left with no trained token after truncation (prompts: too long)
    tokens: int = 0  # tokens in the kept examples
    targets: int = 0  # trained tokens in the kept examples

    def __str__(self) -> str:
        return (
            f"{self.path}: {self.records} records -> {self.examples} kept, {self.truncated} "
            f"truncated, {self.dropped} dropped; {self.tokens} tokens, {self.targets} trained"
        )


# ----------------------------------------------------------------------------- reading records


def read_jsonl(path: str | Path, *, what: str = "data file") -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", record) for each non-blank line of a JSONL file (one object a line).

    what: names the file in the error when it is missing ("data file", "prompts file", ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found; give a JSONL file, one record a line")
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(
                    f"{where}: not a valid UTF-8 JSON line ({e}); "
                    "each line must hold one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            try:  # JSON's "\ud800" escape decodes to a lone surrogate, which is not text
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f'{where}: holds a lone UTF-16 surrogate (an escape like "\\ud800" '
                    "without its pair), which is not text; fix or remove the line"
                ) from None
            yield where, record


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f'{where}: field "{key}" must be a string, got {type(value).__name__}')
    return value


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f'{where}: field "messages" must be a non-empty list of '
            '{"role": ..., "content": ...} objects'
        )
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise ValueError(
                f'{where}: field "messages[{i}]" must be an object with string "role" and "content"'
            )
    return messages


def _unknown(record: dict, where: str) -> ValueError:
    return ValueError(
        f"{where}: no known field (found {sorted(record)}); a record needs "
        '"text", or "prompt" and "response", or "messages"'
    )


# ----------------------------------------------------------------------------- tokenizing


def _render(
    tokenizer: Tokenizer, messages: list[dict[str, str]], where: str, *, generation_prompt: bool
) -> str:
    """The chat template's text, with a template's own complaint (e.g. roles that must
    alternate) reported against the line that caused it."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as e:
        raise ValueError(f'{where}: field "messages": the chat template refused it: {e}') from None


def _eos(tokenizer: Tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _through_end_of_turn(reply: list[int], end_ids: set[int]) -> int:
    """How many of an assistant turn's tokens to train: up to and including its end-of-turn
    token. The template may render more after it (ChatML's newline), which the model never
    has to produce because generation stops at the end-of-turn token."""
    for i, token in enumerate(reply):
        if token in end_ids:
            return i + 1
    return len(reply)


def tokenize_chat(
    messages: list[dict[str, str]], tokenizer: Tokenizer, where: str
) -> tuple[list[int], list[bool], list[int]]:
    """Tokens, trained mask and prompt of a conversation; assistant turns are trained. Also
    how a teacher of another tokenizer reads the student's conversation (kd/cross_tokenizer.py).

    Assistant turns are found by rendering prefixes of the conversation: for assistant message i,
    render(messages[:i], add_generation_prompt=True) ends where its content starts and
    render(messages[:i + 1]) ends after its end of turn. Both must be prefixes of the whole
    rendering, else the template rewrites earlier turns (some drop past reasoning) and we stop.
    The text is then encoded piece by piece at those boundaries, which is also how the model
    meets it when sampling: the prompt encoded alone, the reply's tokens appended.
    """
    if tokenizer.chat_template is None:
        raise ValueError(
            f'{where}: "messages" records need a tokenizer with a chat template; '
            'use {"prompt", "response"} or {"text"} records'
        )

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return _render(tokenizer, msgs, where, generation_prompt=generation_prompt)

    full = render(messages, False)
    spans: list[tuple[int, int]] = []  # character spans [start, end) of assistant turns in full
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(
                f'{where}: field "messages[0]" is an assistant turn; a conversation '
                "must give the assistant something to answer first"
            )
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        previous_end = spans[-1][1] if spans else 0
        if not (
            full.startswith(through) and through.startswith(before) and len(before) >= previous_end
        ):
            raise ValueError(
                f'{where}: field "messages[{i}]": the chat template does not render '
                "this conversation's prefixes as prefixes of the whole, so the "
                'assistant tokens cannot be found; use {"text"} records instead'
            )
        spans.append((len(before), len(through)))
    if not spans:
        raise ValueError(
            f'{where}: field "messages" has no assistant message, so nothing would '
            "be trained; prompt-only files are for generation (load_prompts)"
        )

    tokens: list[int] = []
    trained: list[bool] = []
    prompt_ids: list[int] | None = None
    cut = 0
    for start, end in spans:
        context = tokenizer.encode(full[cut:start], add_special_tokens=False)
        tokens += context
        trained += [False] * len(context)
        if prompt_ids is None:  # everything before the first reply
            prompt_ids = list(tokens)
        reply = tokenizer.encode(full[start:end], add_special_tokens=False)
        n = _through_end_of_turn(reply, tokenizer.eos_token_ids)
        tokens += reply
        trained += [True] * n + [False] * (len(reply) - n)
        cut = end
    tail = tokenizer.encode(full[cut:], add_special_tokens=False)
    return tokens + tail, trained + [False] * len(tail), prompt_ids


def _tokenize(
    record: dict, tokenizer: Tokenizer, where: str
) -> tuple[list[int], list[bool], list[int], list[dict[str, str]] | None]:
    """Tokens, trained mask (is token t a target?), prompt tokens of one record, and the
    conversation when it is rendered as a chat."""
    if "messages" in record:
        messages = _messages(record, where)
        return (*tokenize_chat(messages, tokenizer, where), messages)
    if "prompt" in record:
        if "response" not in record:
            raise ValueError(
                f'{where}: field "response" is missing; a file of prompts alone is '
                "for generating responses, not for training"
            )
        prompt, response = _string(record, "prompt", where), _string(record, "response", where)
        if tokenizer.chat_template is not None:
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return (*tokenize_chat(chat, tokenizer, where), chat)
        prompt_ids = tokenizer.encode(prompt)
        reply = tokenizer.encode(response, add_special_tokens=False) + _eos(tokenizer)
        trained = [False] * len(prompt_ids) + [True] * len(reply)
        return prompt_ids + reply, trained, prompt_ids, None
    if "text" in record:
        tokens = tokenizer.encode(_string(record, "text", where)) + _eos(tokenizer)
        return tokens, [True] * len(tokens), [], None
    raise _unknown(record, where)


def load_examples(
    path: str | Path, tokenizer: Tokenizer, *, seq_len: int
) -> tuple[list[Example], DataStats]:
    """Tokenize a training file. Longer examples are cut to seq_len tokens (counted in
    stats.truncated); those left with nothing to train are dropped (stats.dropped)."""
    if seq_len < 2:
        raise ValueError(
            f"seq_len must be at least 2 tokens (one input, one target), got {seq_len}"
        )
    stats = DataStats(str(path))
    examples = []
    for where, record in read_jsonl(path):
        stats.records += 1
        tokens, trained, prompt_ids, messages = _tokenize(record, tokenizer, where)
        if len(tokens) > seq_len:
            stats.truncated += 1
            tokens, trained = tokens[:seq_len], trained[:seq_len]
        labels = [t if m else IGNORE for t, m in zip(tokens[1:], trained[1:])] + [IGNORE]
        num_targets = len(labels) - labels.count(IGNORE)
        if num_targets == 0:
            stats.dropped += 1
            continue
        examples.append(Example(tokens, labels, prompt_ids, num_targets, len(examples), messages))
        stats.examples += 1
        stats.tokens += len(tokens)
        stats.targets += num_targets
    if stats.records == 0:
        raise ValueError(f"{path}: no records; the file is empty")
    if not examples:
        raise ValueError(
            f"{path}: none of {stats.records} records has a trained token within "
            f"seq_len={seq_len} tokens; raise seq_len"
        )
    return examples, stats


def load_prompts(
    path: str | Path, tokenizer: Tokenizer, *, max_len: int | None = None
) -> tuple[list[Prompt], DataStats]:
    """Prompts to sample replies from: {"prompt": ...} records (a "response" is ignored) or
    {"messages": [...]} (a final assistant turn is dropped: it is the reply to regenerate).
    Prompts over max_len tokens are skipped (stats.dropped) rather than cut mid-question."""
    stats = DataStats(str(path))
    prompts = []
    for where, record in read_jsonl(path):
        stats.records += 1
        if "messages" in record:
            messages = _messages(record, where)
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages:
                raise ValueError(
                    f'{where}: field "messages" holds only an assistant turn; '
                    "a prompt needs a user turn"
                )
        elif "prompt" in record:
            messages = [{"role": "user", "content": _string(record, "prompt", where)}]
        else:
            raise _unknown(record, where)
        if tokenizer.chat_template is not None:
            text = _render(tokenizer, messages, where, generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        elif "prompt" in record:
            ids = tokenizer.encode(messages[0]["content"])  # as load_examples encodes it
        else:
            raise ValueError(f'{where}: "messages" records need a tokenizer with a chat template')
        if max_len is not None and len(ids) > max_len:
            stats.dropped += 1
            continue
        prompts.append(Prompt(messages, ids))
        stats.examples += 1
        stats.tokens += len(ids)
    if stats.records == 0:
        raise ValueError(f"{path}: no records; the file is empty")
    if not prompts:
        raise ValueError(f"{path}: all {stats.records} prompts are longer than max_len={max_len}")
    return prompts, stats


# ----------------------------------------------------------------------------- batching


def collate(examples: list[Example], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with pad_id, labels with IGNORE.

    Padding rather than packing: packing several documents into a row needs a block-diagonal
    attention mask and per-document positions, or each document attends to the ones before it
    (for the teacher too, so its targets would be conditioned on unrelated text). Right padding
    needs no attention mask at all: under causal attention a real token only sees earlier
    positions, which are all real, and pad positions carry no label.
    """
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    index = torch.tensor([e.index for e in examples])  # (B,) which examples (kd/teacher_cache.py)
    return {"input_ids": input_ids, "labels": labels, "index": index}


@lru_cache(maxsize=16)  # a global batch can straddle two epochs of each source
def _permutation(seed: int, source: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((_EPOCH_KEY, seed, source, epoch)).permutation(n)


def _fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:  # lengths first, so that different splits of one token run differ
        h.update(np.asarray([len(e.input_ids), *e.input_ids, *e.labels], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


class Batches:
    """The deterministic stream of global batches, and this rank's part of each.

    Each source k is read through its own stream: epoch e of it is a permutation of its
    examples seeded by (seed, k, e), and epochs follow each other without a seam.
    Mixing by ratio: with W_k the cumulative normalized ratio of sources 0..k (W_{-1} = 0),
    the first s global batches hold C_k(s) = floor(s G W_k) - floor(s G W_{k-1}) examples of
    source k. These sum to s G exactly, stay within one example of s G w_k, and grow with s
    as long as G w_k >= 1 (checked): every step sees every source. Step s takes stream
    positions C_k(s) .. C_k(s + 1) - 1 of each source, then shuffles those G examples by
    (seed, s) so that each rank and micro-batch gets a mix.
    """

    def __init__(
        self,
        sources: list[tuple[list[Example], float]],
        *,
        batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        pad_id: int,
    ):
        if batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size, grad_accum, world_size >= 1 and 0 <= rank < "
                f"world_size; got {batch_size}, {grad_accum}, {world_size}, {rank}"
            )
        if not sources or any(not examples for examples, _ in sources):
            raise ValueError("need at least one data source, each with at least one example")
        if any(not (math.isfinite(ratio) and ratio > 0) for _, ratio in sources):
            raise ValueError(f"source ratios must be positive, got {[r for _, r in sources]}")
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.seed, self.pad_id = seed, pad_id
        self.global_batch = batch_size * grad_accum * world_size  # G
        self.sources = [examples for examples, _ in sources]
        # Exact rationals, so that W_last is exactly 1 and the counts sum to s G exactly, made
        # from the decimal as written: Fraction(0.7) is 0.6999..., 559 of 800 examples, not 560.
        ratios = [Fraction(str(ratio)) for _, ratio in sources]
        self.ratios = [r / sum(ratios) for r in ratios]
        self._cumulative = [sum(self.ratios[: k + 1]) for k in range(len(ratios))]
        for k, share in enumerate(self.ratios):
            if self.global_batch * share < 1:
                raise ValueError(
                    f"source {k} gets {float(self.global_batch * share):.2f} "
                    f"examples of a global batch of {self.global_batch}; raise its "
                    "ratio or the batch so that each step holds at least one"
                )
        self._fingerprints = [_fingerprint(examples) for examples in self.sources]

    def _consumed(self, k: int, step: int) -> int:
        """C_k(step): examples of source k in the global batches before `step`."""
        below = self._cumulative[k - 1] if k else 0
        n = step * self.global_batch
        return math.floor(n * self._cumulative[k]) - math.floor(n * below)

    def global_batch_examples(self, step: int) -> list[Example]:
        """The G examples of optimizer step `step`, the same for every rank and split of G."""
        picks = []
        for k, examples in enumerate(self.sources):
            for j in range(self._consumed(k, step), self._consumed(k, step + 1)):
                epoch, i = divmod(j, len(examples))
                picks.append(examples[_permutation(self.seed, k, epoch, len(examples))[i]])
        order = np.random.default_rng((_BATCH_KEY, self.seed, step)).permutation(len(picks))
        return [picks[i] for i in order]

    def examples(self, step: int) -> list[list[Example]]:
        """This rank's grad_accum micro-batches of step `step`, as examples (prompts included)."""
        batch, B = self.global_batch_examples(step), self.batch_size
        slices = [m * self.world_size + self.rank for m in range(self.grad_accum)]
        return [batch[j * B : (j + 1) * B] for j in slices]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's grad_accum micro-batches of step `step`, collated (see `collate`)."""
        return [collate(examples, pad_id=self.pad_id) for examples in self.examples(step)]

    def global_targets(self, step: int) -> int:
        """Trained tokens in the whole global batch of `step`: the denominator of a loss that
        is summed over tokens, known on every rank without an all-reduce."""
        return sum(e.num_targets for e in self.global_batch_examples(step))

    def epochs(self, step: int) -> list[float]:
        """How many passes over each source the steps up to `step` made (logged)."""
        return [self._consumed(k, step) / len(src) for k, src in enumerate(self.sources)]

    def state_dict(self) -> dict:
        """What, besides the step, decides the stream; saved with a checkpoint."""
        return {
            "seed": self.seed,
            "global_batch": self.global_batch,
            "sources": [
                {"examples": len(src), "ratio": str(ratio), "fingerprint": fp}
                for src, ratio, fp in zip(self.sources, self.ratios, self._fingerprints)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Check that a checkpoint's data matches ours: the step alone then restores the
        position exactly. Different data, seed or global batch would silently change it."""
        current = self.state_dict()
        for key in current:
            if state.get(key) != current[key]:
                raise ValueError(
                    f"the checkpoint's data {key} was {state.get(key)}, now "
                    f"{current[key]}; resume with the same data files, tokenizer, "
                    "seq_len, ratios, seed and global batch"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="JSONL training file")
    parser.add_argument("tokenizer", help="directory holding tokenizer.json")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per example")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        examples, stats = load_examples(args.path, tokenizer, seq_len=args.seq_len)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(stats)
    first = examples[0]
    print("prompt: ", repr(tokenizer.decode(first.prompt_ids, skip_special_tokens=False)))
    trained = [t for t in first.labels if t != IGNORE]
    print("trained:", repr(tokenizer.decode(trained, skip_special_tokens=False)))


if __name__ == "__main__":
    main()
