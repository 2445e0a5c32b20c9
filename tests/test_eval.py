"""Tests for kd/eval.py: token-level metrics and Rouge-L.

Checks
- token_metrics + summarize (forward KL teacher || student, perplexity, top-1 agreement)
  against float64 numpy references written from the formulas, on small random logits with
  padding (ignore_index) and -inf-masked vocabulary entries (no NaN);
- identities: KL(p, p) = 0 with agreement 1; no teacher gives only NLL/ppl;
- sums combine exactly: metrics of one batch == accumulate over batch / time splits ==
  the same batch in small token chunks;
- the Porter stemmer equals nltk's PorterStemmer (what rouge_score uses) on many words;
- rouge_l / rouge_l_max / corpus_rouge_l equal `rouge_score`'s RougeScorer(["rougeL"],
  use_stemmer=True) after the same answer normalization, within 1e-9 (both compute the same
  rational numbers in float64; only the operation order may differ).

Run: `.venv/bin/python -m pytest -q tests/test_eval.py` (a few seconds).
"""

import math
import random

import numpy as np
import pytest
import torch

from kd.eval import (
    _porter_stem,
    accumulate,
    corpus_rouge_l,
    normalize_answer,
    rouge_l,
    rouge_l_max,
    summarize,
    token_metrics,
)

# fp32 log-softmax over V=11 entries vs the float64 reference: per-token errors ~1e-7, summed
# over <= 15 tokens and divided by the count; 1e-5 leaves a wide margin and still catches any
# wrong formula (those are off by > 1e-2).
TOL = 1e-5


def _logits(seed: int, b: int = 3, t: int = 5, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g) * 2
    teacher = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100  # a "prompt" prefix
    labels[2, 3:] = -100  # right padding
    # -inf-masked vocabulary entries (e.g. padded vocab): teacher gives them p = 0; the student
    # masks them too, so the KL stays finite, and 0 * log 0 must not become NaN.
    teacher[..., -2:] = float("-inf")
    student[..., -1] = float("-inf")
    labels[labels >= v - 2] = 0
    return student, teacher, labels


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference(student, teacher, labels):
    """float64 numpy: mean KL(p||q) = mean_t sum_v p (log p - log q) over p > 0,
    ppl = exp(mean_t -log q(y_t)), agreement = mean_t [argmax q == argmax p]."""
    s, t, y = student.double().numpy(), teacher.double().numpy(), labels.numpy()
    kl, nll, agree, n = 0.0, 0.0, 0, 0
    for bi in range(y.shape[0]):
        for ti in range(y.shape[1]):
            if y[bi, ti] == -100:
                continue
            log_q, log_p = _log_softmax_np(s[bi, ti]), _log_softmax_np(t[bi, ti])
            p = np.exp(log_p)
            kl += sum(p[v] * (log_p[v] - log_q[v]) for v in range(len(p)) if p[v] > 0)
            nll += -log_q[y[bi, ti]]
            agree += int(np.argmax(log_q) == np.argmax(log_p))
            n += 1
    return {"kl": kl / n, "ppl": math.exp(nll / n), "top1_agreement": agree / n, "tokens": n}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_metrics_match_numpy(seed):
    student, teacher, labels = _logits(seed)
    got = summarize(token_metrics(student, teacher, labels))
    ref = _reference(student, teacher, labels)
    assert got["tokens"] == ref["tokens"]
    for key in ("kl", "ppl", "top1_agreement"):
        assert math.isfinite(got[key]), f"{key} is {got[key]}"
        diff = abs(got[key] - ref[key])
        assert diff < TOL, f"{key}: {got[key]} vs numpy {ref[key]}, |diff| {diff:.2e}"


def test_identities_and_no_teacher():
    student, _, labels = _logits(3)
    same = summarize(token_metrics(student, student.clone(), labels))
    # KL(p, p) is exactly 0 term by term (log p - log p = 0); agreement is 1.
    assert abs(same["kl"]) < 1e-12, f"KL(p, p) = {same['kl']}"
    assert same["top1_agreement"] == 1.0
    alone = summarize(token_metrics(student, None, labels))
    assert set(alone) == {"nll", "ppl", "tokens"}
    diff = abs(alone["ppl"] - same["ppl"])
    assert diff == 0.0, f"ppl without teacher differs by {diff}"


def test_sums_combine_exactly():
    student, teacher, labels = _logits(4, b=4, t=6)
    whole = summarize(token_metrics(student, teacher, labels))
    by_batch = None
    for rows in (slice(0, 1), slice(1, 4)):
        by_batch = accumulate(by_batch, token_metrics(student[rows], teacher[rows], labels[rows]))
    by_time = None
    for cols in (slice(0, 2), slice(2, 6)):
        sums = token_metrics(student[:, cols], teacher[:, cols], labels[:, cols])
        by_time = accumulate(by_time, sums)
    chunked = token_metrics(student, teacher, labels, chunk_tokens=2)
    for parts in (summarize(by_batch), summarize(by_time), summarize(chunked)):
        assert parts["tokens"] == whole["tokens"]
        for key in ("kl", "ppl", "top1_agreement"):
            # The same fp32 per-token values summed in float64 in another order: ~1e-16.
            diff = abs(parts[key] - whole[key])
            assert diff < 1e-12, f"{key}: split {parts[key]} vs whole {whole[key]}, diff {diff:.2e}"


def test_token_metrics_errors():
    student, teacher, labels = _logits(5)
    with pytest.raises(ValueError, match="labels"):
        token_metrics(student, teacher, labels[:, :-1])
    with pytest.raises(ValueError, match="vocabulary"):
        token_metrics(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="no valid tokens"):
        summarize(token_metrics(student, teacher, torch.full_like(labels, -100)))
    with pytest.raises(ValueError, match="teacher logits"):
        accumulate(token_metrics(student, teacher, labels), token_metrics(student, None, labels))


def test_porter_stemmer_matches_nltk():
    porter = pytest.importorskip("nltk.stem.porter")
    nltk_stem = porter.PorterStemmer().stem
    words = [
        "caresses",
        "ponies",
        "ties",
        "cats",
        "feed",
        "agreed",
        "plastered",
        "motoring",
        "sing",
        "conflated",
        "troubled",
        "sized",
        "hopping",
        "tanned",
        "falling",
        "hissing",
        "fizzed",
        "failing",
        "filing",
        "happy",
        "sky",
        "skies",
        "dying",
        "lying",
        "news",
        "innings",
        "relational",
        "conditional",
        "valenci",
        "hesitanci",
        "digitizer",
        "conformabli",
        "radicalli",
        "differentli",
        "vileli",
        "analogousli",
        "vietnamization",
        "predication",
        "operator",
        "feudalism",
        "decisiveness",
        "hopefulness",
        "callousness",
        "formaliti",
        "sensitiviti",
        "sensibiliti",
        "triplicate",
        "formative",
        "formalize",
        "electriciti",
        "electrical",
        "hopeful",
        "goodness",
        "revival",
        "allowance",
        "inference",
        "airliner",
        "gyroscopic",
        "adjustable",
        "defensible",
        "irritant",
        "replacement",
        "adjustment",
        "dependent",
        "adoption",
        "homologou",
        "communism",
        "activate",
        "angulariti",
        "homologous",
        "effective",
        "bowdlerize",
        "probate",
        "rate",
        "cease",
        "controll",
        "roll",
        "generously",
        "dies",
        "died",
        "spied",
        "proceed",
        "exceed",
        "succeeded",
        "analogies",
        "fully",
    ]
    # Random letter strings ending in the suffixes the rules look for exercise every branch.
    rng = random.Random(0)
    suffixes = [
        "ational",
        "alli",
        "logi",
        "fulli",
        "ization",
        "ness",
        "ement",
        "ion",
        "ize",
        "ate",
        "e",
        "ll",
        "y",
        "ies",
        "ied",
        "eed",
        "ed",
        "ing",
        "sses",
        "s",
        "bled",
    ]
    for _ in range(3000):
        stem = "".join(rng.choice("bcdfglmnrstvwxyaeiouy") for _ in range(rng.randint(1, 6)))
        words.append(stem + rng.choice(suffixes) + rng.choice(["", "s", "ed", "ing"]))
    wrong = [(w, nltk_stem(w), _porter_stem(w)) for w in words if nltk_stem(w) != _porter_stem(w)]
    assert not wrong, f"{len(wrong)} of {len(words)} stems differ from nltk, e.g. {wrong[:5]}"


PAIRS = [
    ("The cat sat on the mat.", "The cat sat on the mat."),  # identical
    ("Paris is the capital of France.", "Quantum chromodynamics explains quarks."),  # disjoint
    ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over a lazy fox"),
    ("Hello, world!!! It's a GREAT day.", "hello world its a great day"),  # punctuation, case
    ("", "something here"),  # empty prediction
    ("something here", ""),  # empty reference
    ("", ""),
    ("the the the", "a an the"),  # only articles: empty after normalization
    ("very very very good good", "good very good very"),  # repeated words
    ("Running runners ran quickly; the runner runs.", "A runner was running quickly."),  # stems
    (
        "Photosynthesis converts light energy into chemical energy in plants.",
        "Plants use photosynthesis to convert sunlight into chemical energy stored in sugar.",
    ),
    ("def add(a, b):\n    return a + b", "def add(x, y): return x + y"),  # code
    ("2 + 2 = 4, so the answer is 4.", "The answer is 4"),  # digits
    ("Café naïve résumé über", "cafe naive resume uber"),  # non-ASCII letters
    (
        "Generalizations, organizational hopefulness and relational conditioning.",
        "General organization, hopeful relations, conditional.",
    ),
    ("  lots   of\twhitespace\n\nhere ", "lots of whitespace here"),
]


def test_rouge_l_matches_rouge_score():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeL"], use_stemmer=True)
    plain = rs.RougeScorer(["rougeL"], use_stemmer=False)
    for pred, ref in PAIRS:
        p, r = normalize_answer(pred), normalize_answer(ref)
        want = scorer.score(r, p)["rougeL"].fmeasure  # rouge_score takes (target, prediction)
        got = rouge_l(pred, ref)
        assert abs(got - want) < 1e-9, f"{pred!r} vs {ref!r}: {got} vs rouge_score {want}"
        want_plain = plain.score(r, p)["rougeL"].fmeasure
        got_plain = rouge_l(pred, ref, stem=False)
        assert abs(got_plain - want_plain) < 1e-9, f"no stem {pred!r}: {got_plain} vs {want_plain}"
    assert rouge_l(*PAIRS[0]) == 1.0 and rouge_l(*PAIRS[1]) == 0.0


def test_rouge_l_max_and_corpus():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeL"], use_stemmer=True)
    preds = [p for p, _ in PAIRS]
    refs = [[r, PAIRS[(i + 1) % len(PAIRS)][1]] for i, (_, r) in enumerate(PAIRS)]
    want = []
    for p, rr in zip(preds, refs):
        scores = [
            scorer.score(normalize_answer(r), normalize_answer(p))["rougeL"].fmeasure for r in rr
        ]
        want.append(max(scores))
        diff = abs(rouge_l_max(p, rr) - max(scores))
        assert diff < 1e-9, f"rouge_l_max({p!r}) |diff| {diff:.2e}"
    got = corpus_rouge_l(preds, refs)
    diff = abs(got - 100 * sum(want) / len(want))
    assert diff < 1e-7, f"corpus_rouge_l {got}, |diff| {diff:.2e}"  # x100 scales the 1e-9
    single = corpus_rouge_l(preds, [r for _, r in PAIRS])
    want_single = 100 * sum(rouge_l(p, r) for p, r in PAIRS) / len(PAIRS)
    assert abs(single - want_single) < 1e-9
    with pytest.raises(ValueError, match="references"):
        corpus_rouge_l(preds, refs[:-1])
    with pytest.raises(ValueError, match="empty"):
        rouge_l_max("x", [])
