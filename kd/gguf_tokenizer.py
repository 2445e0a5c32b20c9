"""A llama.cpp GGUF file's tokenizer as a Hugging Face tokenizer.json (and its config files).

GGUF stores the vocabulary as metadata (format: github.com/ggml-org/ggml/blob/master/docs/gguf.md):
tokenizer.ggml.model names the kind, tokenizer.ggml.tokens the pieces in id order,
tokenizer.ggml.token_type each piece's role (3 = control, 4 = user-defined),
tokenizer.ggml.merges the BPE merges and tokenizer.ggml.pre the pre-tokenizer. Two kinds:
- "gpt2": a byte-level BPE (SmolLM2, Llama 3, Qwen), rebuilt with the pre-tokenizer llama.cpp
  names in tokenizer.ggml.pre;
- "llama": a SentencePiece BPE (Gemma), rebuilt as transformers' GGUF loader does
  (`sentencepiece_bpe`).
Control tokens become special added tokens, user-defined ones plain added tokens.

Used by scripts/import_gguf.py; tested in tests/test_gguf.py.
"""

from __future__ import annotations

from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

# llama.cpp token types (gguf.TokenType): 1 normal, 3 control, 4 user-defined.
CONTROL, USER_DEFINED = 3, 4

# Split regexes of the llama.cpp pre-tokenizers we support (llama-vocab.cpp), as HF writes them.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"  # Qwen2: single digits
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"  # Llama 3: up to 3 digits
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer for llama.cpp's tokenizer.ggml.pre name; unknown names raise."""
    # GPT-2's regex split, then bytes -> unicode symbols.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt-2"):
        return byte_level
    if pre == "smollm":  # every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("qwen2", "llama-bpe"):  # own regex split, then bytes -> unicode symbols only
        split = pre_tokenizers.Split(
            Regex(QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT), behavior="isolated"
        )
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise ValueError(
        f"pre-tokenizer {pre!r} is not supported "
        "(supported: default, gpt-2, smollm, qwen2, llama-bpe)"
    )


def byte_level_bpe(meta: dict[str, Any], vocab: dict[str, int]) -> Tokenizer:
    """The byte-level BPE of a `gpt2` tokenizer model: the file's merges and pre-tokenizer."""
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]  # "Ġ t" -> ("Ġ", "t")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok.pre_tokenizer = pre_tokenizer(pre)
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_bpe(meta: dict[str, Any], vocab: dict[str, int]) -> Tokenizer:
    """Gemma's SentencePiece BPE (tokenizer model `llama`) as an HF BPE with byte fallback.

    SentencePiece's BPE repeatedly merges the adjacent pair whose concatenation is the best
    piece; HF's BPE merges the pair that comes first in its merge list. So the merge list is
    every split of every piece into two pieces, best piece first, longer left part first. Best
    is first in the file (Gemma's scores are -id for ordinary pieces; control and user-defined
    tokens all score -1000). transformers derives the same list (gemma_tokenizer and
    generate_merges in transformers/integrations/gguf/), and we test that ids agree.
    Spaces become "▁" before the BPE sees them, and no space is prepended
    (tokenizer.ggml.add_space_prefix is false in Gemma files).
    """
    if meta.get("tokenizer.ggml.add_space_prefix"):
        raise ValueError("a SentencePiece vocabulary with add_space_prefix is not supported")
    merges = [
        (piece[:cut], piece[cut:])
        for piece in vocab
        for cut in range(len(piece) - 1, 0, -1)
        if piece[:cut] in vocab and piece[cut:] in vocab
    ]
    unk = meta["tokenizer.ggml.tokens"][meta["tokenizer.ggml.unknown_token_id"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def adds_bos(meta: dict[str, Any]) -> bool:
    """Whether encode() starts with BOS; llama.cpp adds it to SentencePiece vocabularies that
    do not say."""
    return meta.get("tokenizer.ggml.add_bos_token", meta["tokenizer.ggml.model"] == "llama")


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer.json described by the tokenizer.ggml.* metadata."""
    model, arch = meta.get("tokenizer.ggml.model"), meta["general.architecture"]
    if model not in ("gpt2", "llama") or (model == "llama" and arch != "gemma3"):
        raise ValueError(
            f"tokenizer model {model!r} of a {arch} GGUF is not supported (supported: byte-level "
            "BPE 'gpt2'; SentencePiece 'llama' in gemma3 files)"
        )
    original, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    tokens = original
    if model == "llama":
        # Gemma's user-defined runs of spaces are stored with real spaces; the normalizer
        # turns spaces into "▁" first, so they are looked up as "▁▁" (as transformers does).
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in original]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(
            "tokenizer.ggml.tokens has duplicate tokens; cannot build a BPE vocabulary"
        )
    tok = (byte_level_bpe if model == "gpt2" else sentencepiece_bpe)(meta, vocab)

    # Added tokens match before BPE runs; special ones are dropped by decode(skip_special_tokens).
    # User-defined ones too, but not the space runs renamed above: the normalizer leads to them.
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL]
    user = [t for t, o, kind in zip(tokens, original, types) if kind == USER_DEFINED and t == o]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    # transformers 5 (and kd) add BOS/EOS from this post-processor alone, whatever
    # tokenizer_config.json says, so GGUF's add_bos_token / add_eos_token must live here.
    bos = tokens[meta["tokenizer.ggml.bos_token_id"]] if adds_bos(meta) else None
    add_eos = meta.get("tokenizer.ggml.add_eos_token")
    eos = tokens[meta["tokenizer.ggml.eos_token_id"]] if add_eos else None
    if bos or eos:  # as transformers' update_post_processor writes them
        single = (f"{bos}:0 " if bos else "") + "$A:0" + (f" {eos}:0" if eos else "")
        pair = single + (f" {bos}:1" if bos else "") + " $B:1" + (f" {eos}:1" if eos else "")
        special = [(t, vocab[t]) for t in (bos, eos) if t]
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )
    elif model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_files(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer_config.json and generation_config.json from the GGUF's special-token metadata."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {
        role: meta.get(f"tokenizer.ggml.{key}_token_id")
        for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
    }
    chat_template = meta.get("tokenizer.chat_template")
    tokenizer_config = {
        # The generic fast tokenizer uses tokenizer.json as written; GPT2Tokenizer would
        # replace our pre-tokenizer (e.g. smollm's digit split) with plain byte-level.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": tokens[i] for role, i in ids.items() if i is not None},
        "add_bos_token": adds_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta[f"{meta['general.architecture']}.context_length"],
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    # Generation ends at eos, at end-of-turn ids llama.cpp records, and at ChatML's <|im_end|>.
    eos_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    if chat_template is not None and "<|im_end|>" in chat_template and "<|im_end|>" in tokens:
        eos_ids.append(tokens.index("<|im_end|>"))
    eos_ids = sorted({i for i in eos_ids if i is not None})
    generation_config = {
        "bos_token_id": ids["bos"],
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": ids["pad"],
    }
    return tokenizer_config, generation_config
