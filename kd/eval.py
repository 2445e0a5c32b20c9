"""Evaluation metrics for distillation, as pure functions.

Two families:

1. Token-level metrics from logits (teacher-forced on a fixed response, e.g. the teacher's own
   answer): forward KL(p_teacher || q_student) per token, student perplexity, and top-1
   agreement (argmax_student == argmax_teacher). `token_metrics` returns *sums* over the valid
   tokens of one batch, so batches add exactly and ranks combine with one all-reduce(SUM) done
   by the caller; `summarize` turns the totals into means:

       sums = None
       for batch in loader:
           sums = accumulate(sums, token_metrics(s_logits, t_logits, labels))
       # distributed: dist.all_reduce on each tensor of `sums` (op=SUM), then
       print(summarize(sums))      # {"kl": ..., "nll": ..., "ppl": ..., "top1_agreement": ...}

2. Rouge-L F1 between generated text and references, following the evaluation protocol of
   MiniLLM (arXiv 2306.08543) and DistiLLM (arXiv 2402.03898): SQuAD-style answer
   normalization (lowercase, drop punctuation, drop the articles a/an/the, collapse
   whitespace), then Google's `rouge_score` tokenization (lowercase, non-alphanumerics to
   spaces) with the Porter stemmer (`RougeScorer(["rougeL"], use_stemmer=True)`), the
   longest common subsequence over tokens, F1 = 2PR / (P + R), the max over references, and
   the corpus mean x 100 as the papers report it. The stemmer is NLTK's PorterStemmer in its
   default NLTK_EXTENSIONS mode (what rouge_score uses) re-implemented below, so kd does not
   depend on nltk; tests/test_eval.py checks every value against `rouge_score` itself.

Run the tests: `.venv/bin/python -m pytest -q tests/test_eval.py`.
"""

import functools
import math
import re
import string

import torch

# ---------------------------------------------------------------------------------------------
# Token-level metrics
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def token_metrics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_tokens: int = 1024,
) -> dict[str, torch.Tensor]:
    """Sums of per-token metrics over the valid tokens of one batch.

    student_logits, teacher_logits: (B, T, V); logits[:, t] predicts labels[:, t] (shift
    before calling). labels: (B, T) token ids, `ignore_index` where a position does not count
    (prompt, padding). teacher_logits may be None: then only the NLL and the count are returned.
    chunk_tokens: how many tokens' full-vocabulary softmaxes exist at once; 1024 tokens x 49152
    vocab is 200 MB per fp32 temporary, so a large eval batch does not multiply peak memory.

    Returns 0-d float64 tensors on the logits' device:
      "nll":    sum_t -log q(y_t)                                     (student NLL)
      "tokens": number of valid tokens
      "kl":     sum_t sum_v p_t(v) (log p_t(v) - log q_t(v))   (forward KL, teacher || student)
      "top1":   sum_t [argmax_v q_t(v) == argmax_v p_t(v)]            (top-1 agreement count)
    Softmaxes are taken in fp32; the sums are accumulated in float64 so that summing many
    batches is exact to well below the metrics' resolution.
    """
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"token_metrics: expected logits (B, T, V) and labels (B, T), got "
            f"{tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"token_metrics: teacher logits {tuple(teacher_logits.shape)} differ from student "
            f"logits {tuple(student_logits.shape)}; both models must share one vocabulary"
        )
    # Flat indices of the valid tokens; labels, not input_ids, carry the mask. nonzero() is a
    # host sync (its size is data-dependent): once per eval batch, outside the training step.
    rows = (labels != ignore_index).flatten().nonzero().squeeze(-1)  # (N,)
    flat_labels = labels.flatten()  # (B*T,)
    s_flat = student_logits.flatten(0, 1)  # (B*T, V), a view
    t_flat = None if teacher_logits is None else teacher_logits.flatten(0, 1)
    zero = torch.zeros((), dtype=torch.float64, device=student_logits.device)
    sums = {"nll": zero, "tokens": zero + rows.numel()}
    if t_flat is not None:
        sums |= {"kl": zero, "top1": zero}
    for idx in rows.split(chunk_tokens):
        log_q = torch.log_softmax(s_flat[idx].float(), dim=-1)  # (n, V)
        nll = -log_q.gather(-1, flat_labels[idx].unsqueeze(-1)).squeeze(-1)  # (n,)
        sums["nll"] = sums["nll"] + nll.double().sum()
        if t_flat is None:
            continue
        log_p = torch.log_softmax(t_flat[idx].float(), dim=-1)  # (n, V)
        p = log_p.exp()
        # KL(p || q) = sum_v p (log p - log q). Where p = 0 (a -inf-masked teacher logit) the
        # term is 0 by convention; without the `where`, 0 * (-inf - x) would be NaN.
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # (n,)
        agree = log_q.argmax(-1) == log_p.argmax(-1)  # (n,)
        sums["kl"] = sums["kl"] + kl.double().sum()
        sums["top1"] = sums["top1"] + agree.sum().double()
    return sums


def accumulate(
    total: dict[str, torch.Tensor] | None, sums: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add one batch's `token_metrics` sums to a running total (None starts a new total)."""
    if total is None:
        return dict(sums)
    if total.keys() != sums.keys():
        raise ValueError(
            f"accumulate: metric keys differ ({sorted(total)} vs {sorted(sums)}); pass "
            f"teacher logits for every batch or for none"
        )
    return {k: total[k] + sums[k] for k in total}


def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means from (possibly all-reduced) sums: nll, ppl = exp(mean NLL), and with a teacher
    kl (mean per-token forward KL, nats) and top1_agreement (fraction in [0, 1])."""
    n = float(sums["tokens"])  # host sync: once per evaluation, not in a hot loop
    if n == 0:
        raise ValueError("summarize: no valid tokens (every label is ignore_index)")
    nll = float(sums["nll"]) / n
    out = {"nll": nll, "ppl": math.exp(nll), "tokens": n}
    if "kl" in sums:
        out["kl"] = float(sums["kl"]) / n
        out["top1_agreement"] = float(sums["top1"]) / n
    return out


# ---------------------------------------------------------------------------------------------
# Rouge-L
# ---------------------------------------------------------------------------------------------

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
