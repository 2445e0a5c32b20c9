"""A model in bf16 against itself in fp32, on real text: does the fast dtype keep its predictions?

    .venv/bin/python scripts/check_precision.py                      # the SmolLM2-135M teacher
    .venv/bin/python scripts/check_precision.py --model DIR --device cuda

Runs the same tokens through the model loaded in fp32 and in bf16 (weights and compute, as a
bf16 teacher runs) and prints, over every position: the mean per-token KL(p_fp32 || p_bf16) in
nats, how often the two argmaxes agree, each perplexity, and the largest |logit difference|.
Exits 1 when the KL exceeds --max-kl (0.01) or the agreement falls below --min-agreement
(0.95). bf16 keeps 8 significant bits, so logits of size ~10 move by ~0.04: a per-token KL of
~0.001 and ~99% agreement are what a correct bf16 model gives (SmolLM2-135M, measured on CPU);
a wrong cast (a norm or softmax computed in bf16, RoPE angles rounded) shows as a KL ten to a
hundred times larger.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from kd.hf import load_model  # noqa: E402  (after the path set-up)
from kd.tokenizer import load_tokenizer  # noqa: E402

TEXT = (
    "The Industrial Revolution began in Great Britain in the late eighteenth century. Steam "
    "engines, first used to pump water out of mines, were soon driving looms and mills, and "
    "by 1830 a railway connected Liverpool and Manchester. Factories drew workers from the "
    "countryside into fast-growing towns, where wages were higher but housing was crowded "
    "and disease spread quickly. Historians still debate why the change started in Britain: "
    "cheap coal, high wages, colonial markets and a culture of practical invention are the "
    "explanations most often given."
)


def compare(model_dir: str, device: torch.device) -> dict[str, float]:
    ids = torch.tensor([load_tokenizer(model_dir).encode(TEXT)], device=device)  # (1, T)
    labels = ids[0, 1:]
    logits = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = load_model(model_dir, dtype=dtype, device=device).eval()
        with torch.no_grad():
            logits[name] = model(ids)[0, :-1].float()  # (T - 1, V)
        del model
    log_p, log_q = (F.log_softmax(logits[k], -1) for k in ("fp32", "bf16"))
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (T - 1,) KL(p_fp32 || p_bf16)

    def perplexity(log_probs: torch.Tensor) -> float:
        return log_probs.gather(-1, labels[:, None]).mean().neg().exp().item()

    return {
        "tokens": labels.numel(),
        "kl": kl.mean().item(),
        "agreement": (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item(),
        "ppl_fp32": perplexity(log_p),
        "ppl_bf16": perplexity(log_q),
        "max_logit_diff": (logits["fp32"] - logits["bf16"]).abs().max().item(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--max-kl", type=float, default=0.01, help="nats per token")
    parser.add_argument("--min-agreement", type=float, default=0.95, help="argmax agreement")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        message = f"error: no model at {args.model}; run `make teacher` or pass --model"
        print(message, file=sys.stderr)
        return 1
    r = compare(args.model, torch.device(args.device))
    print(
        f"{args.model} on {args.device}, {r['tokens']} tokens: KL(fp32 || bf16) "
        f"{r['kl']:.5f} nats/token, argmax agreement {r['agreement']:.1%}, perplexity "
        f"{r['ppl_fp32']:.2f} fp32 / {r['ppl_bf16']:.2f} bf16, max |logit diff| "
        f"{r['max_logit_diff']:.3f}"
    )
    if r["kl"] > args.max_kl or r["agreement"] < args.min_agreement:
        print(
            f"FAIL: bf16 departs from fp32 (limits: KL <= {args.max_kl}, agreement >= "
            f"{args.min_agreement:.0%})",
            file=sys.stderr,
        )
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
