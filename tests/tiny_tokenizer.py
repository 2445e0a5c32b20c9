"""A tiny real byte-level BPE tokenizer for tests: `make_tiny_tokenizer(out_dir)`.

It is trained with the `tokenizers` package on the few paragraphs below, with the same shape as
the SmolLM2 teacher's tokenizer: the 256-symbol byte alphabet (so any Unicode text round-trips),
individual digits then the GPT-2 byte-level regex split, the special tokens `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>` at ids 0, 1, 2, and the same special-token roles (bos
`<|im_start|>`, eos and pad `<|im_end|>`, unk `<|endoftext|>`, no BOS added by `encode`).
Pad equal to eos is deliberate: it is what the teacher does, and a loader that masks labels by
pad id would then also mask every end-of-turn token; tests should see that case.

Pair it with tiny random models whose vocab_size is `TINY_VOCAB_SIZE`. Used by the tests:

    from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer
    tok_dir = make_tiny_tokenizer(tmp_path)   # writes tokenizer.json + tokenizer_config.json
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Ids 0..2 as in SmolLM2; the trainer puts special tokens first, in this order.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# 3 special + 256 bytes + 253 merges; a power of two keeps tiny models' shapes tidy.
TINY_VOCAB_SIZE = 512

# ChatML, as SmolLM2 and Qwen2 use it (without a default system prompt).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text: plain prose, a little code, numbers and non-ASCII, so that merges cover the
# kinds of strings tests feed in. It only has to yield TINY_VOCAB_SIZE - 259 merges.
CORPUS = [
    "The river rises in the northern hills and flows south for about two hundred kilometres "
    "before it reaches the sea. Its valley has been farmed since the Bronze Age, and the towns "
    "along its banks grew rich on the trade in wool, grain and timber.",
    "A teacher model produces a probability distribution over the next token; the student is "
    "trained to match it. Knowledge distillation was described by Hinton, Vinyals and Dean in "
    "2015, and sequence-level distillation by Kim and Rush in 2016.",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is "
    "Tokyo. What is the capital of Spain? The capital of Spain is Madrid.",
    "def add(a: int, b: int) -> int:\n    return a + b\n\n"
    "for i in range(10):\n    print(i, add(i, 1))\n",
    "In 1969 the first crewed landing on the Moon took place; 384,400 km separate the Earth and "
    "the Moon on average, and light covers the distance in about 1.28 seconds.",
    "Café, naïve, façade and résumé keep their accents; Größe and Straße are German; "
    "東京 and 北京 are capitals; emoji such as 🙂 are several bytes long.",
    "User: Can you explain what a tokenizer does?\nAssistant: It splits text into pieces from a "
    "fixed vocabulary and maps each piece to an integer id that the model reads.",
]


def make_tiny_tokenizer(out_dir: str | Path, *, chat_template: str | None = CHATML) -> Path:
    """Train the tiny BPE and write tokenizer.json + tokenizer_config.json into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if tok.get_vocab_size() != TINY_VOCAB_SIZE:  # the corpus must be rich enough for all merges
        raise RuntimeError(
            f"tiny tokenizer has {tok.get_vocab_size()} tokens, wanted {TINY_VOCAB_SIZE}"
        )
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    )
    return out_dir
