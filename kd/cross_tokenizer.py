"""Cross-tokenizer distillation: a teacher of another vocabulary (ULD and a GOLD-style hybrid).

Token-level KD compares two distributions over one vocabulary. A Gemma teacher and a SmolLM2
student share no ids, and often not even the places where tokens start. Two things make the
pair trainable (`loss = "uld"` or `"gold"`, when the tokenizers differ):

Alignment (`Aligner`). The student's example is the source of truth: its tokens spell a
text (each id's bytes, kd/token_bytes.py); the teacher tokenizes that same text. Student
position t predicts the token that starts at byte b (its next token). It is aligned with
teacher position u when the teacher's token u + 1 starts at the same byte b: both then
predict "the text that starts at b", each in its own vocabulary. A student boundary inside a
teacher token (" distillation" against " dist" + "illation") has no such u and is masked ("no
common boundary"), as is a byte inside a character (byte-level pieces of an emoji). Special
tokens are not text: the teacher reads the text without them, and the student's final
end-of-sequence is aligned with the teacher predicting its own one.

Chat (an example with `messages`, kd/data.py): each model reads the conversation in its own
chat template (its system, user and assistant markers, generation prompt and end of turn),
tokenized as kd.data.tokenize_chat tokenizes training chats. Only trained positions, those of
the assistant replies, are aligned; prompts and template markup need no alignment. Reply k of
the student is reply k of the teacher, and inside it the rule above applies to byte offsets
from where the reply's content starts on each side: with c_s and c_t the offsets of the
stripped content in the two replies, student byte b is teacher byte b - c_s + c_t. That holds
where a template trims the content (Gemma's does) or puts markup before it; a byte outside
the content of either side is masked ("not in both contents"). So the last prompt position,
which predicts a reply's first token, is aligned with the teacher's last prompt position when
both replies start at the same content byte. Each reply's end of turn is its first special
token after the content (ChatML's <|im_end|>, Gemma's <end_of_turn>): the student predicting
its own is aligned with the teacher predicting its own, so the student learns from the
teacher when to stop. The teacher's ids end with the token its last aligned position
predicts: an example cut at seq_len shows the teacher its rendering up to where the
student's ends, not the rest of the chat. The teacher reads the markerless text instead when
it has no chat template (a chat_template.jinja in its directory gives it one), when its
template refuses the conversation (Gemma's wants user and assistant turns to alternate;
counted in `Aligner.markerless`), or when the student did not render the record as a chat
(text, or a prompt and response without a student template).

Masked trained positions keep their CE term and are counted by reason (`Aligner.masked`).

Divergences, per aligned position, with p = softmax(z_t / T) over V_t and q = softmax(z_s / T)
over V_s (they enter the loss as alpha T^2 D + (1 - alpha) CE, as every divergence does):
  ULD (Boizard et al., arXiv 2402.12030): D = sum_i |p_(i) - q_(i)|, p_(i) and q_(i) sorted in
    decreasing order, the shorter vector padded with zeros: the Wasserstein-1 distance of the
    two distributions when every token is one unit from every other, which needs no map
    between the vocabularies. `uld_top_k` = k > 0 compares the k largest of each and one tail
    bucket (1 - their sum) instead of sorting whole vocabularies: a lower bound (triangle
    inequality over the tail), equal at k >= max(V_t, V_s).
  GOLD-style hybrid (TRL's GOLD trainer): tokens whose bytes are the same in both
    vocabularies (S, `shared_vocab`: " the" is " the" whether written "Ġthe" or "▁the") are
    compared exactly: D_S = D(p_S / P_S || q_S / Q_S), any kd divergence of the two
    distributions renormalized over S (P_S = sum of p over S); the rest through ULD on the
    unmatched masses (p with S zeroed against q with S zeroed, not renormalized, so the
    difference in shared mass counts there): D = w_S D_S + w_U ULD(p_U, q_U).

On-policy distillation (GKD, MiniLLM) across tokenizers is not built: each rollout's
sampled student tokens would go through `Aligner.align` (it takes any token sequence) and the
teacher would score its own ids of them, where kd/onpolicy.py scores the student's ids with
the teacher; MiniLLM's sequence-level reward would also need the teacher's log-probability of
the sampled text, a sum over the teacher's tokens of it, not over aligned positions.

Tests: `.venv/bin/python -m pytest -q tests/test_cross_tokenizer.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from kd.data import IGNORE, tokenize_chat
from kd.token_bytes import ByteVocab
from kd.tokenizer import Tokenizer

if TYPE_CHECKING:  # kd.losses imports this module; the options are only read here
    from kd.losses import LossOptions

Tensor = torch.Tensor


class SharedVocab(NamedTuple):
    """Pairs of ids with the same bytes: student_ids[i] and teacher_ids[i] (S,) each."""

    student_ids: Tensor
    teacher_ids: Tensor


class CrossVocab(NamedTuple):
    """A teacher of another vocabulary at the student's positions, for `kd.losses`."""

    logits: Tensor  # (..., V_t) the aligned teacher position's logits (any values where unknown)
    known: Tensor  # (...,) bool: the position has an aligned teacher position
    shared: SharedVocab | None  # for "gold"


def special_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids of added tokens marked special (control tokens: never text)."""
    added = tokenizer.backend.get_added_tokens_decoder()
    return {i for i, token in added.items() if token.special}


def shared_vocab(student: Tokenizer, teacher: Tokenizer) -> SharedVocab:
    """The (student id, teacher id) pairs whose tokens have the same bytes, specials left out."""
    return Aligner(student, teacher).shared_vocab()


# ----------------------------------------------------------------------------- divergences


def _descending(p: Tensor, k: int) -> Tensor:
    """The k largest of p (..., V) in decreasing order, zero-padded when V < k."""
    top = p.topk(min(k, p.shape[-1]), dim=-1).values
    return F.pad(top, (0, k - top.shape[-1]))


def sorted_l1(p: Tensor, q: Tensor, top_k: int = 0) -> Tensor:
    """sum_i |p_(i) - q_(i)| of two (..., V_p), (..., V_q) nonnegative vectors, sorted in
    decreasing order and zero-padded; top_k > 0: the k largest and one tail bucket each."""
    k = max(p.shape[-1], q.shape[-1]) if top_k <= 0 else top_k
    ps, qs = _descending(p, k), _descending(q, k)
    distance = (ps - qs).abs().sum(-1)
    if top_k > 0:  # the mass outside the k largest, as one bucket on each side
        distance = (
            distance
            + ((p.sum(-1) - ps.sum(-1)).clamp(min=0) - (q.sum(-1) - qs.sum(-1)).clamp(min=0)).abs()
        )
    return distance


def uld(log_p: Tensor, log_q: Tensor, *, top_k: int = 0) -> Tensor:
    """ULD (arXiv 2402.12030) of teacher log-probs (..., V_t) and student log-probs (..., V_s)."""
    return sorted_l1(log_p.exp(), log_q.exp(), top_k)


def gold(
    log_p: Tensor,
    log_q: Tensor,
    shared: SharedVocab,
    exact: Callable[[Tensor, Tensor], Tensor],
    *,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    top_k: int = 0,
) -> Tensor:
    """w_S D_S + w_U ULD(p_U, q_U) (module docstring); `exact(log_p, log_q)` is D."""
    s_ids, t_ids = shared.student_ids.to(log_q.device), shared.teacher_ids.to(log_p.device)
    log_p_s, log_q_s = log_p[..., t_ids], log_q[..., s_ids]  # (..., S)
    # Renormalized over S, in log space: log p_i - log P_S.
    exact_part = exact(
        log_p_s - log_p_s.logsumexp(-1, keepdim=True), log_q_s - log_q_s.logsumexp(-1, keepdim=True)
    )
    p_u = log_p.exp().index_fill(-1, t_ids, 0.0)  # (..., V_t) the unmatched teacher mass
    q_u = log_q.exp().index_fill(-1, s_ids, 0.0)  # (..., V_s)
    return matched_weight * exact_part + unmatched_weight * sorted_l1(p_u, q_u, top_k)


def cross_divergence(
    log_q: Tensor,
    teacher: object,
    options: LossOptions,
    exact: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """options.divergence, "uld" or "gold", per position against a CrossVocab teacher; 0 where
    no teacher position is aligned. `options` is a kd.losses.LossOptions, `exact` gold's D."""
    if not (isinstance(teacher, CrossVocab) and options.divergence in ("uld", "gold")):
        raise ValueError(
            f"divergence={options.divergence!r} with a {type(teacher).__name__} teacher: uld and "
            "gold compare a teacher of another vocabulary (a CrossVocab), the others one vocabulary"
        )
    # log p at T, floored as kd.losses.log_probs floors it (exp of the floor is 0)
    log_p = F.log_softmax(teacher.logits.to(log_q.dtype) / options.temperature, dim=-1)
    log_p = log_p.clamp(min=torch.finfo(log_q.dtype).min)
    if options.divergence == "uld":
        div = uld(log_p, log_q, top_k=options.uld_top_k)
    else:
        div = gold(
            log_p,
            log_q,
            teacher.shared,
            exact,
            matched_weight=options.gold_weights[0],
            unmatched_weight=options.gold_weights[1],
            top_k=options.uld_top_k,
        )
    return torch.where(teacher.known, div, 0.0)


# ----------------------------------------------------------------------------- alignment


def _spell(
    ids: list[int], bytes_of: list[bytes | None], special: set[int]
) -> tuple[bytes, list[int]]:
    """The bytes `ids` spell (a special token: none) and the byte each token starts at."""
    starts, text = [], b""
    for i in ids:
        starts.append(len(text))
        if i not in special:
            text += bytes_of[i] or b""
    return text, starts


def _char_starts(text: bytes) -> set[int]:
    """The offsets where a character of UTF-8 `text` starts (not 0b10xxxxxx), and its end."""
    return {i for i in range(len(text)) if (text[i] & 0xC0) != 0x80} | {len(text)}


class _Reply(NamedTuple):
    """Where the content lies in a reply's text (bytes; spans relative to `at`)."""

    at: int  # the byte where the stripped content starts
    lo: int  # the content's first byte: its leading whitespace unless the template trimmed it
    hi: int  # one past its last byte: with its trailing whitespace unless trimmed
    end: int  # index of the end-of-turn token, the first special token after it; -1: none


def _reply(
    ids: list[int], starts: list[int], text: bytes, special: set[int], content: str
) -> _Reply | None:
    """The content's place in a reply (ids, each token's first byte, the bytes they spell);
    None where the text does not hold it."""
    core = content.strip().encode("utf-8")
    lead = content[: len(content) - len(content.lstrip())].encode("utf-8")
    trail = content[len(content.rstrip()) :].encode("utf-8")
    at = text.find(core)
    if at < 0 and core:  # cut at seq_len: the first `at` where text[at:] is a prefix of core
        at = max(0, len(text) - len(core) + 1)
        while (at := text.find(core[:1], at)) >= 0 and not core.startswith(text[at:]):
            at += 1
    if at < 0:
        return None
    after = (j for j, (i, b) in enumerate(zip(ids, starts)) if i in special and b >= at + len(core))
    end = next(after, -1)  # ChatML's <|im_end|>, Gemma's <end_of_turn>; none in a cut reply
    stop = starts[end] if end >= 0 else len(text)  # what follows the end of turn is markup
    lo = -len(lead) if text[:at].endswith(lead) else 0
    hi = len(core) + (len(trail) if text[at + len(core) : stop].startswith(trail) else 0)
    return _Reply(at, lo, hi, end)


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True in `mask`."""
    runs, start = [], -1
    for i, on in enumerate([*mask, False]):
        if on and start < 0:
            start = i
        elif not on and start >= 0:
            runs.append((start, i))
            start = -1
    return runs


class Aligner:
    """The teacher's view of a student example: its token ids and, per student position, the
    aligned teacher position (-1: masked). Reasons for masked trained positions are counted in
    `masked`, aligned ones in `aligned`, chats read as markerless text in `markerless`."""

    def __init__(self, student: Tokenizer, teacher: Tokenizer) -> None:
        self.student, self.teacher = student, teacher
        self.student_vocab, self.teacher_vocab = ByteVocab.of(student), ByteVocab.of(teacher)
        self.student_bytes = self.student_vocab.bytes_of
        self.teacher_bytes = self.teacher_vocab.bytes_of
        self.student_special, self.teacher_special = special_ids(student), special_ids(teacher)
        self.student_eos = set(student.eos_token_ids)
        # What the teacher's encode() puts before any text (e.g. Gemma's <bos>).
        self.teacher_prefix = teacher.encode("")
        self.teacher_eos = teacher.eos_token_id
        self.masked: Counter[str] = Counter()
        self.aligned = 0
        self.markerless = 0  # chats the teacher's template refused: it read their markerless text

    def shared_vocab(self) -> SharedVocab:
        """The (student id, teacher id) pairs whose tokens have the same bytes, no specials."""
        pairs = [
            (s, t)
            for data, s in self.student_vocab.ids.items()
            if s not in self.student_special
            and (t := self.teacher_vocab.ids.get(data)) is not None
            and t not in self.teacher_special
        ]
        s_ids, t_ids = zip(*sorted(pairs)) if pairs else ((), ())
        return SharedVocab(
            torch.tensor(s_ids, dtype=torch.long), torch.tensor(t_ids, dtype=torch.long)
        )

    def teacher_ids(self, text: bytes) -> tuple[list[int], list[int]]:
        """The teacher's ids of `text` (its prefix first) and each token's start (-1: not at
        the start of a character of the text: a prefix, or a byte inside a character)."""
        string = text.decode("utf-8", errors="ignore")  # a cut at seq_len may split a character
        body = self.teacher.encode(string, add_special_tokens=False)
        starts, offset = [], 0
        for i in body:
            starts.append(offset)
            offset += len(self.teacher_bytes[i] or b"")
        ids = [*self.teacher_prefix, *body]
        if offset != len(string.encode("utf-8")):  # a normalizer changed the text
            return ids, [-1] * len(ids)
        return ids, [-1] * len(self.teacher_prefix) + starts

    def align(
        self, input_ids: list[int], labels: list[int], messages: list[dict] | None = None
    ) -> tuple[list[int], list[int]]:
        """(teacher ids, aligned teacher position per student position) for one example;
        `messages`: the conversation its ids render (kd.data.Example.messages), if any."""
        if messages is not None and self.teacher.chat_template is not None:
            view = self._align_chat(input_ids, labels, messages)
            if view is not None:
                return view
            self.markerless += 1
        return self._align_text(input_ids, labels)

    def _align_text(self, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """The teacher reads the text the student's ids spell, without special tokens."""
        text, s_starts = _spell(input_ids, self.student_bytes, self.student_special)
        t_ids, t_starts = self.teacher_ids(text)
        ends_with_eos = input_ids[-1] in self.student_eos and self.teacher_eos is not None
        if ends_with_eos:
            t_ids.append(self.teacher_eos)
        by_start = {b: j for j, b in enumerate(t_starts) if b >= 0}  # teacher token starting at b
        char_starts = _char_starts(text)
        aligned = []
        for t, label in enumerate(labels):
            u, reason = self._position(t, input_ids, s_starts, by_start, char_starts, t_ids)
            aligned.append(u)
            if label != IGNORE:
                self._count(u, reason)
        return t_ids, aligned

    def _count(self, u: int, reason: str) -> None:
        if u >= 0:
            self.aligned += 1
        else:
            self.masked[reason] += 1

    def _align_chat(
        self, input_ids: list[int], labels: list[int], messages: list[dict]
    ) -> tuple[list[int], list[int]] | None:
        """The teacher's ids of the conversation in its own template and the alignment of the
        replies (module docstring); None when its template refuses the conversation or
        renders fewer replies than the student's."""
        try:
            t_ids, t_trained, _ = tokenize_chat(messages, self.teacher, "the teacher's chat")
        except ValueError:  # e.g. Gemma's template wants user and assistant turns to alternate
            return None
        # Student reply k: the trained positions p .. q - 1, predicting its tokens p + 1 .. q
        # (fewer replies where seq_len cut the example); teacher reply k: its tokens a .. b - 1.
        s_replies = _runs([label != IGNORE for label in labels])
        t_replies = _runs(t_trained)
        if len(s_replies) > len(t_replies):
            return None
        contents = [m["content"] for m in messages if m["role"] == "assistant"]
        aligned = [-1] * len(input_ids)
        for (p, q), (a, b), content in zip(s_replies, t_replies, contents):
            pairs = self._turn(input_ids[p + 1 : q + 1], t_ids[a:b], content)
            for i, (j, reason) in enumerate(pairs):
                # Student position p + i predicts its reply's token i, teacher position
                # a - 1 + j the teacher reply's token j.
                aligned[p + i] = a - 1 + j if j >= 0 else -1
                self._count(j, reason)
        last = max(aligned)  # the teacher reads up to the token it predicts there
        return t_ids[: last + 2 if last >= 0 else 1], aligned

    def _turn(self, s_ids: list[int], t_ids: list[int], content: str) -> list[tuple[int, str]]:
        """For each token i of a student reply, (j, "") where token j of the teacher's reply
        starts at the same byte of the content, or (-1, reason)."""
        s_text, s_starts = _spell(s_ids, self.student_bytes, self.student_special)
        t_text, t_starts = _spell(t_ids, self.teacher_bytes, self.teacher_special)
        s = _reply(s_ids, s_starts, s_text, self.student_special, content)
        t = _reply(t_ids, t_starts, t_text, self.teacher_special, content)
        if s is None or t is None:
            return [(-1, "reply not found")] * len(s_ids)
        by_start = {b: j for j, b in enumerate(t_starts) if t_ids[j] not in self.teacher_special}
        char_starts = _char_starts(s_text)
        pairs = []
        for i, token in enumerate(s_ids):
            k = s_starts[i] - s.at  # the byte's offset in the content, the same on both sides
            if token in self.student_special:  # both predict their end of turn
                pairs.append((t.end, "") if i == s.end and t.end >= 0 else (-1, "special token"))
            elif s_starts[i] not in char_starts:
                pairs.append((-1, "inside a character"))
            elif not max(s.lo, t.lo) <= k < min(s.hi, t.hi):
                pairs.append((-1, "not in both contents"))  # markup, or whitespace one trimmed
            else:
                j = by_start.get(k + t.at)
                pairs.append((-1, "no common boundary") if j is None else (j, ""))
        return pairs

    def _position(
        self,
        t: int,
        input_ids: list[int],
        s_starts: list[int],
        by_start: dict[int, int],
        char_starts: set[int],
        t_ids: list[int],
    ) -> tuple[int, str]:
        """The teacher position aligned with student position t, or (-1, reason). s_starts:
        each student token's first byte; by_start: byte -> the teacher token starting there."""
        if t + 1 >= len(input_ids):
            return -1, "last position"
        following = input_ids[t + 1]
        if following in self.student_special:
            final = t + 2 == len(input_ids) and following in self.student_eos
            if final and t_ids and t_ids[-1] == self.teacher_eos:
                return len(t_ids) - 2, ""
            return -1, "special token"
        start = s_starts[t + 1]
        if start not in char_starts:
            return -1, "inside a character"
        j = by_start.get(start)
        if j is None:
            return -1, "no common boundary"
        if j == 0:
            return -1, "no teacher context"  # a teacher without a prefix token cannot predict
        return j - 1, ""
