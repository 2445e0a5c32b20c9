"""Compare a GGUF loaded by transformers' own GGUF loader with its scripts/import_gguf.py import.

    .venv/bin/python scripts/compare_gguf.py downloads/gemma-3-270m-q4_k_m.gguf \
        models/gemma3-270m [MORE_IMPORTED_DIRS...]

The reference is `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` and
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` (transformers dequantizes and converts the
file itself; needs `accelerate`), in fp32. For each imported directory it reports: whether its
tokenizer (kd's loader and transformers' AutoTokenizer) gives the reference's ids on the text
below, the max |logit difference| from the reference, the perplexity of each, and how often
the argmax agrees; then the same for kd's own model (kd.hf.load_model) where kd loads it. The
text is three paragraphs of plain encyclopedic English (the one tests/test_gguf.py uses for
the SmolLM2 teacher). Results for Gemma 3 270M are in docs/benchmarks.md.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import kd

from kd.hf import load_model  # noqa: E402
from kd.tokenizer import load_tokenizer  # noqa: E402

ENGLISH = """\
The Danube is the second-longest river in Europe, after the Volga. It flows through much of \
Central and Southeastern Europe, from the Black Forest in Germany to the Black Sea. Over its \
course it passes through or along the borders of ten countries, more than any other river in the \
world. Four capital cities, Vienna, Bratislava, Budapest and Belgrade, lie on its banks.

Photosynthesis is the process by which green plants, algae and some bacteria convert light \
energy into chemical energy. During photosynthesis, carbon dioxide and water are combined to \
form glucose, and oxygen is released as a by-product. The process takes place mainly in the \
leaves, inside small structures called chloroplasts, which contain the green pigment \
chlorophyll.

The printing press was developed in the fifteenth century by Johannes Gutenberg, a goldsmith \
from the German city of Mainz. His system of movable metal type made it possible to produce \
books far more quickly and cheaply than by copying them by hand. Within a few decades, printing \
spread to more than two hundred cities across Europe, and the wider availability of books helped \
to spread new ideas during the Renaissance and the Reformation."""


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy, in fp32."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).exp().item()


def report(who: str, logits: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> None:
    diff = (logits - ref).abs().max().item()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"{who}: max |logit diff| {diff:.3g}, perplexity {perplexity(logits, ids):.4f}, "
        f"argmax agreement {agree:.1%}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("imported", type=Path, nargs="+", help="its imported HF directories")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    gguf_dir, name = args.gguf.resolve().parent, args.gguf.name
    start = time.perf_counter()
    ref_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    print(f"transformers GGUF tokenizer: {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    ref_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    print(f"transformers GGUF model: {time.perf_counter() - start:.1f} s", flush=True)
    ids = torch.tensor([ref_tok.encode(ENGLISH)])
    with torch.no_grad():
        ref = ref_model.eval()(ids).logits
    print(f"{ids.shape[1]} tokens; reference perplexity {perplexity(ref, ids):.4f}", flush=True)
    del ref_model

    for path in args.imported:
        kd_ids = load_tokenizer(path).encode(ENGLISH)
        hf_ids = AutoTokenizer.from_pretrained(path).encode(ENGLISH)
        print(
            f"{path}: ids equal to the reference's: kd {kd_ids == ids[0].tolist()}, "
            f"transformers {hf_ids == ids[0].tolist()}"
        )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            report(f"{path} by transformers", model(ids).logits, ref, ids)
        del model
        try:
            kd_model = load_model(path, dtype=torch.float32).eval()
        except (ValueError, KeyError, NotImplementedError) as e:
            print(f"{path} by kd: does not load ({e})")
            continue
        with torch.no_grad():
            report(f"{path} by kd", kd_model(ids), ref, ids)


if __name__ == "__main__":
    main()
