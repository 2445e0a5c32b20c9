"""Tests for kd/rouge.py: Rouge-L and its Porter stemmer.

Checks
- the Porter stemmer equals nltk's PorterStemmer (what rouge_score uses) on many words;
- rouge_l / rouge_l_max / corpus_rouge_l equal `rouge_score`'s RougeScorer(["rougeL"],
  use_stemmer=True) after the same answer normalization, within 1e-9 (both compute the same
  rational numbers in float64; only the operation order may differ).

Run: `.venv/bin/python -m pytest -q tests/test_rouge.py` (a few seconds).
"""

import random

import pytest

from kd.rouge import _porter_stem, corpus_rouge_l, normalize_answer, rouge_l, rouge_l_max


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
