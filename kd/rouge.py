"""Rouge-L F1 between generated text and references, as pure functions.

Follows the evaluation protocol of MiniLLM (arXiv 2306.08543) and DistiLLM (arXiv 2402.03898):
SQuAD-style answer normalization (lowercase, drop punctuation, drop the articles a/an/the,
collapse whitespace), then Google's `rouge_score` tokenization (lowercase, non-alphanumerics
to spaces) with the Porter stemmer (`RougeScorer(["rougeL"], use_stemmer=True)`), the longest
common subsequence (LCS) over tokens, P = LCS / |prediction|, R = LCS / |reference|,
F1 = 2PR / (P + R), the max over references, and the corpus mean x 100 as the papers report it:

    corpus_rouge_l(["The cat sat."], [["A cat sat down.", "Cats sit."]])   # 0..100

The stemmer is NLTK's PorterStemmer in its default NLTK_EXTENSIONS mode (what rouge_score
uses) re-implemented below, so kd does not depend on nltk; tests/test_rouge.py checks every
value against nltk and `rouge_score` themselves.

Run the tests: `.venv/bin/python -m pytest -q tests/test_rouge.py`.
"""

import functools
import re
import string

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lowercase, drop ASCII punctuation, drop the articles
    a/an/the, collapse whitespace. MiniLLM/DistiLLM apply it before Rouge-L."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def rouge_tokenize(text: str, *, stem: bool = True) -> list[str]:
    """rouge_score's tokenizer: lowercase, every run of characters outside [a-z0-9] becomes a
    separator (so non-ASCII letters are dropped, as in rouge_score), Porter-stem the tokens
    longer than 3 characters."""
    tokens = [t for t in _NON_ALPHANUM.split(text.lower()) if t]
    if stem:
        tokens = [_porter_stem(t) if len(t) > 3 else t for t in tokens]
    return tokens


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) dynamic programming with
    one row: row[j] = LCS(a[:i], b[:j])."""
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # LCS(a[:i-1], b[:j-1])
        for j, y in enumerate(b, start=1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str, *, stem: bool = True) -> float:
    """Rouge-L F1 in [0, 1] after answer normalization: P = LCS / |prediction|,
    R = LCS / |reference|, F = 2PR / (P + R); 0 when either side has no tokens."""
    pred = rouge_tokenize(normalize_answer(prediction), stem=stem)
    ref = rouge_tokenize(normalize_answer(reference), stem=stem)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def rouge_l_max(prediction: str, references: list[str], *, stem: bool = True) -> float:
    """Best Rouge-L F1 of the prediction over several references (the papers' protocol)."""
    if not references:
        raise ValueError("rouge_l_max: references is empty; give at least one reference")
    return max(rouge_l(prediction, r, stem=stem) for r in references)


def corpus_rouge_l(
    predictions: list[str], references: list[str] | list[list[str]], *, stem: bool = True
) -> float:
    """Mean Rouge-L F1 x 100 over a corpus; each reference may be a string or a list of them."""
    if len(predictions) != len(references):
        raise ValueError(
            f"corpus_rouge_l: {len(predictions)} predictions but {len(references)} references"
        )
    if not predictions:
        raise ValueError("corpus_rouge_l: no predictions to score")
    scores = [
        rouge_l_max(p, [r] if isinstance(r, str) else list(r), stem=stem)
        for p, r in zip(predictions, references)
    ]
    return 100.0 * sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# Porter stemmer (M. F. Porter, "An algorithm for suffix stripping", 1980), NLTK_EXTENSIONS
# variant, written to give exactly what nltk.stem.porter.PorterStemmer() gives. Notation: a
# word is [C](VC)^m[V] over runs of consonants C and vowels V; m is its "measure". 'y' is a
# consonant at the start or after a vowel, a vowel after a consonant.
# ---------------------------------------------------------------------------------------------

_VOWELS = frozenset("aeiou")
# Irregular forms NLTK maps directly, before any rule.
_IRREGULAR = {
    "sky": "sky",
    "skies": "sky",
    "dying": "die",
    "lying": "lie",
    "tying": "tie",
    "news": "news",
    "innings": "inning",
    "inning": "inning",
    "outings": "outing",
    "outing": "outing",
    "cannings": "canning",
    "canning": "canning",
    "howe": "howe",
    "proceed": "proceed",
    "exceed": "exceed",
    "succeed": "succeed",
}


def _consonants(word: str) -> list[bool]:
    flags: list[bool] = []
    for i, ch in enumerate(word):
        flags.append(ch not in _VOWELS and (ch != "y" or i == 0 or not flags[i - 1]))
    return flags


def _measure(stem: str) -> int:
    """m in [C](VC)^m[V]: the number of vowel-run -> consonant transitions."""
    cv = "".join("c" if c else "v" for c in _consonants(stem))
    return cv.count("vc")


def _has_vowel(stem: str) -> bool:
    return not all(_consonants(stem))


def _ends_double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _consonants(word)[-1]


def _ends_cvc(word: str) -> bool:
    """*o: ends consonant-vowel-consonant, last not w/x/y (NLTK also accepts a 2-letter VC)."""
    c = _consonants(word)
    if len(word) >= 3:
        return c[-3] and not c[-2] and c[-1] and word[-1] not in "wxy"
    return len(word) == 2 and not c[0] and c[1]


def _m_gt(k: int):
    return lambda stem: _measure(stem) > k


def _apply_rules(word: str, rules: list) -> str:
    """Apply the first rule whose suffix matches (its condition on the stem decides whether
    the word changes); later rules are not tried. Suffix "*d" means a double consonant."""
    for suffix, replacement, condition in rules:
        if suffix == "*d" and _ends_double_consonant(word):
            stem = word[:-2]
            return stem + replacement if condition is None or condition(stem) else word
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition is None or condition(stem) else word
    return word


def _step1ab(word: str) -> str:
    """Plurals and -ed/-ing."""
    if word.endswith("ies") and len(word) == 4:
        word = word[:-3] + "ie"
    else:
        word = _apply_rules(
            word, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)]
        )
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            return _apply_rules(
                stem,
                [
                    ("at", "ate", None),
                    ("bl", "ble", None),
                    ("iz", "ize", None),
                    ("*d", stem[-1], lambda s: stem[-1] not in "lsz"),
                    ("", "e", lambda s: _measure(s) == 1 and _ends_cvc(s)),
                ],
            )
    return word


def _step1c(word: str) -> str:
    """Terminal y -> i after a consonant (NLTK: and the stem is longer than one letter)."""
    return _apply_rules(word, [("y", "i", lambda s: len(s) > 1 and _consonants(s)[-1])])


_STEP2 = [
    ("ational", "ate"),
    ("tional", "tion"),
    ("enci", "ence"),
    ("anci", "ance"),
    ("izer", "ize"),
    ("bli", "ble"),
    ("alli", "al"),
    ("entli", "ent"),
    ("eli", "e"),
    ("ousli", "ous"),
    ("ization", "ize"),
    ("ation", "ate"),
    ("ator", "ate"),
    ("alism", "al"),
    ("iveness", "ive"),
    ("fulness", "ful"),
    ("ousness", "ous"),
    ("aliti", "al"),
    ("iviti", "ive"),
    ("biliti", "ble"),
    ("fulli", "ful"),
]
_STEP3 = [
    ("icate", "ic"),
    ("ative", ""),
    ("alize", "al"),
    ("iciti", "ic"),
    ("ical", "ic"),
    ("ful", ""),
    ("ness", ""),
]
_STEP4 = [
    "al",
    "ance",
    "ence",
    "er",
    "ic",
    "able",
    "ible",
    "ant",
    "ement",
    "ment",
    "ent",
    "ion",
    "ou",
    "ism",
    "ate",
    "iti",
    "ous",
    "ive",
    "ize",
]


def _step2(word: str) -> str:
    """Double suffixes to single ones (m > 0)."""
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        return _step2(word[:-4] + "al")
    rules = [(s, r, _m_gt(0)) for s, r in _STEP2]
    rules.append(("logi", "log", lambda s: _measure(word[:-3]) > 0))
    return _apply_rules(word, rules)


def _step4(word: str) -> str:
    """Drop -ant, -ence, ... when m > 1 (-ion only after s or t)."""
    rules = [
        (s, "", (lambda st: _measure(st) > 1 and st[-1:] in ("s", "t")) if s == "ion" else _m_gt(1))
        for s in _STEP4
    ]
    return _apply_rules(word, rules)


def _step5(word: str) -> str:
    """Drop a final -e (m > 1, or m = 1 and not *o); -ll -> -l when m > 1."""
    if word.endswith("e"):
        m = _measure(word[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(word[:-1])):
            word = word[:-1]
    return _apply_rules(word, [("ll", "l", lambda s: _measure(word[:-1]) > 1)])


@functools.lru_cache(maxsize=1 << 16)
def _porter_stem(word: str) -> str:
    """Porter stem of one lowercase word (NLTK_EXTENSIONS mode)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    word = _step1c(_step1ab(word))
    word = _apply_rules(_step2(word), [(s, r, _m_gt(0)) for s, r in _STEP3])
    return _step5(_step4(word))
