"""Tokenizer for HF model directories: `tokenizer.json` through the `tokenizers` package, plus
special tokens and the chat template from `tokenizer_config.json` rendered with jinja2.

It reads the files `transformers` writes (`tokenizer.json`, `tokenizer_config.json`, and
`chat_template.jinja` / `generation_config.json` when present) and gives the same ids and the
same rendered chat text as `transformers.AutoTokenizer` does for a fast (Rust) tokenizer:

    tok = load_tokenizer("models/smollm2-135m-instruct")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tok.encode(text)                      # no BOS: the teacher's add_bos_token is false
    tok.decode(ids) ; tok.eos_token_ids ; tok.fingerprint()

Two rules copied from transformers (5.x, `TokenizersBackend`) so the ids agree:
- BOS/EOS: the post-processor in tokenizer.json alone decides; transformers 5 ignores
  `add_bos_token`/`add_eos_token` in tokenizer_config.json when tokenizer.json exists, and so do
  we (scripts/import_gguf.py writes GGUF's add_bos_token into the post-processor).
- Chat templates run in jinja2's immutable sandbox with trim_blocks and lstrip_blocks, the
  loopcontrols extension, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML,
  and the special tokens (`bos_token`, `eos_token`, ...) as variables.
decode() does no `clean_up_tokenization_spaces`: transformers 5 skips it for BPE tokenizers too.
"""

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

# The named special tokens transformers passes to chat templates (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token roles and chat template of its model."""

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: dict[str, str],
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend  # the Rust tokenizer; use it directly for batch encoding
        self.special_tokens = special_tokens  # role -> token text, e.g. {"eos_token": "<|im_end|>"}
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._role_id("bos_token")
        self.eos_token_id = self._role_id("eos_token")
        self.pad_token_id = self._role_id("pad_token")
        self.unk_token_id = self._role_id("unk_token")
        # Generation stops at any of these: eos, generation_config's eos list, and `<|im_end|>`
        # when the chat template ends turns with it (ChatML), even if eos is `<|endoftext|>`.
        stops = [self.eos_token_id, *extra_eos_ids]
        if chat_template is not None and "<|im_end|>" in chat_template:
            stops.append(self.token_to_id("<|im_end|>"))
        self.eos_token_ids = {i for i in stops if i is not None}
        self._compiled_template: jinja2.Template | None = None

    @property
    def pad_id(self) -> int:
        """The id batches are padded with: the pad token, else the smallest end-of-sequence id,
        else 0. Which id it is changes no result: right padding lies after every real token and
        carries no label, left padding is masked, and generation cuts a row at its EOS."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return min(self.eos_token_ids, default=0)

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"tokenizer: {role} {token!r} is not in the vocabulary of tokenizer.json; "
                "fix tokenizer_config.json"
            )
        return token_id

    def token_to_id(self, token: str) -> int | None:
        """Id of one token's text (e.g. "<|im_start|>"), or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS only where tokenizer.json's post-processor adds them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special (control) tokens such as `<|im_end|>` dropped by default."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = False, **kwargs
    ) -> str:
        """Render a conversation to text, as transformers'
        `apply_chat_template(..., tokenize=False)` does.

        Extra keyword arguments become template variables (e.g. `tools=[...]`,
        `enable_thinking=False`); they override the special-token variables of the same name, as
        in transformers.
        """
        if self.chat_template is None:
            raise ValueError(
                "tokenizer has no chat_template: add one to tokenizer_config.json or "
                "chat_template.jinja"
            )
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        # transformers drops keys whose value is None: templates test `'key' in message`.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def fingerprint(self) -> str:
        """sha256 of everything that maps text to ids: normalizer, pre-tokenizer, vocab, merges,
        added tokens. Two tokenizers with equal fingerprints give equal ids, so a teacher's
        logits index the student's vocabulary; it ignores chat templates and decoders."""
        spec = json.loads(self.backend.to_str())
        keys = ("normalizer", "pre_tokenizer", "model", "added_tokens")
        canonical = json.dumps({k: spec.get(k) for k in keys}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by some templates to mark assistant
    text for transformers' assistant masks) and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` tag itself
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators=None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & for HTML, which would change rendered tool schemas.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (its
    `transformers/utils/chat_template_utils.py`)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: str | dict | None) -> str | None:
    # tokenizer_config.json stores a special token as a string or, in older files, as a
    # serialized AddedToken {"content": "...", "lstrip": ..., ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of an HF model directory (tokenizer.json required; the rest optional)."""
    path = Path(path)
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path}: point at an HF model directory (e.g. run `make teacher`)"
        )
    backend = Backend.from_file(str(tokenizer_file))

    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    special_tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    special_tokens = {name: text for name, text in special_tokens.items() if text is not None}

    # transformers 5 writes the template to chat_template.jinja; older files keep it in the config.
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    else:
        chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # several named templates: [{"name": ..., "template": ...}]
        chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")

    extra_eos: list[int] = []
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        eos = json.loads(generation_file.read_text(encoding="utf-8")).get("eos_token_id")
        extra_eos = [eos] if isinstance(eos, int) else list(eos or [])

    return Tokenizer(
        backend, special_tokens=special_tokens, chat_template=chat_template, extra_eos_ids=extra_eos
    )
