"""kd/model.py against transformers, and its KV cache against its own full forward.

Checks: logits equal transformers' on tiny random checkpoints written by `save_pretrained`
(llama GQA tied, llama3 RoPE scaling untied and sharded, qwen2 biases, mistral sliding
window shorter than the sequence) and, the other way, transformers loads what `save_model`
writes with the same logits; cached decoding (prefill, then one token at a time) equals the full
forward; a left-padded batch decodes like each prompt alone; a mask of only the used cache
slots equals the full-length one; bf16 weights get an fp32 cache on CPU;
`kd.hf_config.config_from_dict` reads both RoPE spellings; meta-device build + `init_weights` starts
at loss ~ln(V); `output_fn` sees the final hidden state and the head.

Run: `.venv/bin/python -m pytest -q tests/test_model.py -s` (-s prints the max differences).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kd import hf_config
from kd.hf import load_model, load_state_dict, save_model
from kd.model import Transformer
from kd.model_config import ModelConfig
from tests.tiny_models import ARCHS, make_tiny_checkpoint

# fp32 on CPU: our ops mirror transformers' op for op, so logits agree to rounding
# (measured 0.0); 1e-4 leaves room for a different SDPA kernel or BLAS blocking.
PARITY_ATOL = 1e-4
# The cache path computes the same math with a masked SDPA over S slots instead of
# is_causal over T: summation order differs, fp32 rounding ~1e-6 on logits of size ~1.
CACHE_ATOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    """(arch, checkpoint dir, our model loaded from it, transformers' model)."""
    arch = request.param
    # llama3 is saved in shards (with model.safetensors.index.json) to cover that loader path.
    shard = "40KB" if arch == "llama3" else None
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, max_shard_size=shard)
    assert (path / "model.safetensors.index.json").exists() == (shard is not None)
    model = load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    return arch, path, model.eval(), ref.eval()


@torch.no_grad()
def test_logits_match_transformers(tiny):
    arch, _, model, ref = tiny
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    ours, theirs = model(ids), ref(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{arch}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < PARITY_ATOL, f"{arch}: max |logit diff| {diff:.2e} >= {PARITY_ATOL}"


@torch.no_grad()
def test_transformers_loads_what_save_model_writes(tiny, tmp_path):
    arch, _, model, _ = tiny
    save_model(model, tmp_path / "saved", max_shard_bytes=40_000 if arch == "mistral" else 2**30)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5)
    )
    diff = (model(ids) - ref(ids).logits).abs().max().item()
    print(f"{arch}: transformers on our saved copy, max |logit diff| = {diff:.2e}")
    assert diff < PARITY_ATOL, f"{arch}: transformers reads our save with logit diff {diff:.2e}"


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(tiny):
    arch, _, model, _ = tiny
    T, prompt = 20, 6  # 20 > mistral's window of 8: the window matters in the cache too
    ids = torch.randint(
        0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1)
    )
    full = model(ids)
    model.setup_cache(2, 32)
    try:
        steps = [model(ids[:, :prompt], input_pos=torch.arange(prompt))]
        for t in range(prompt, T):
            steps.append(model(ids[:, t : t + 1], input_pos=torch.tensor([t])))
    finally:
        model.clear_cache()
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"{arch}: max |cached - full| = {diff:.2e}")
    assert diff < CACHE_ATOL, f"{arch}: cached decoding differs from the full forward by {diff:.2e}"


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(tiny):
    """Prompts of lengths 3, 7, 11 left-padded to 11, then 10 decode steps, vs each alone."""
    arch, _, model, _ = tiny
    gen = torch.Generator().manual_seed(2)
    lengths, new, S = [3, 7, 11], 10, 24
    seqs = [torch.randint(3, model.config.vocab_size, (n + new,), generator=gen) for n in lengths]
    P = max(lengths)

    def run(batch: list[torch.Tensor], lens: list[int]) -> torch.Tensor:
        """Prefill the left-padded prompts, then feed each row's continuation one token at a
        time."""
        B = len(batch)
        ids = torch.zeros(B, P + new, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.bool)
        for b, (seq, n) in enumerate(zip(batch, lens)):
            ids[b, P - n :] = seq
            mask[b, P - n : P + new] = True
        model.setup_cache(B, S)
        try:
            out = [model(ids[:, :P], input_pos=torch.arange(P), attention_mask=mask)]
            for t in range(P, P + new):
                out.append(
                    model(ids[:, t : t + 1], input_pos=torch.tensor([t]), attention_mask=mask)
                )
        finally:
            model.clear_cache()
        return torch.cat(out, dim=1)  # (B, P + new, V)

    batched = run(seqs, lengths)
    diffs = []
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        alone = model(seq[None])[0]  # no padding, no cache: the reference
        diffs.append((batched[b, P - n :] - alone).abs().max().item())
    print(f"{arch}: max |left-padded batch - alone| = {max(diffs):.2e}")
    assert max(diffs) < CACHE_ATOL, f"{arch}: padded rows differ from unpadded runs by {diffs}"


@torch.no_grad()
def test_mask_of_the_used_slots_equals_the_full_length_mask(tiny):
    """A (B, L) mask with L < cache length reads only slots 0..L-1: same logits as the full mask."""
    arch, _, model, _ = tiny
    P, new, S = 6, 8, 20
    ids = torch.randint(
        3, model.config.vocab_size, (2, P + new), generator=torch.Generator().manual_seed(7)
    )
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[0, :3] = False  # row 0: 3 pad slots on the left

    def run(sliced: bool) -> torch.Tensor:
        model.setup_cache(2, S)
        try:
            out = [
                model(
                    ids[:, :P],
                    input_pos=torch.arange(P),
                    attention_mask=mask[:, :P] if sliced else mask,
                )
            ]
            for t in range(P, P + new):
                out.append(
                    model(
                        ids[:, t : t + 1],
                        input_pos=torch.tensor([t]),
                        attention_mask=mask[:, : t + 1] if sliced else mask,
                    )
                )
        finally:
            model.clear_cache()
        return torch.cat(out, dim=1)

    diff = (run(sliced=True) - run(sliced=False)).abs().max().item()
    # Same keys, fewer masked-out ones: SDPA may block the sum differently, fp32 rounding.
    assert diff < CACHE_ATOL, f"{arch}: sliced mask differs from the full-length mask by {diff:.2e}"
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.setup_cache(2, S)
        try:
            model(
                ids[:, :P],
                input_pos=torch.arange(P),
                attention_mask=torch.ones(2, S + 1, dtype=torch.bool),
            )
        finally:
            model.clear_cache()


@torch.no_grad()
def test_attention_mask_without_cache_handles_left_padding(tiny):
    arch, _, model, _ = tiny
    ids = torch.randint(
        3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3)
    )
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :5] = False  # row 0 has 5 pad tokens on the left
    out = model(ids, attention_mask=mask)
    diff = max(
        (out[0, 5:] - model(ids[:1, 5:])[0]).abs().max().item(),
        (out[1] - model(ids[1:])[0]).abs().max().item(),
    )
    assert diff < CACHE_ATOL, f"{arch}: masked forward differs from unpadded by {diff:.2e}"


def test_output_fn_gets_final_hidden_and_head(tiny):
    _, _, model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    got = model(ids, output_fn=lambda hidden, head: (hidden, head))
    assert got[0].shape == (2, 5, model.config.hidden_size)
    assert got[1].weight is model.head_weight
    assert got[1].softcap == model.config.final_logit_softcapping
    diff = (got[1](got[0]) - model(ids)).abs().max().item()
    # The same matmul in fp32.
    assert diff < 1e-5, f"head(hidden) differs from the logits by {diff:.2e}"


def test_tied_head_is_the_embedding():
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    model = Transformer(cfg)
    assert model.lm_head is None and model.head_weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()


def test_config_reads_both_rope_spellings(tmp_path):
    classic = {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    }
    legacy_type = {**classic, "rope_scaling": {**classic["rope_scaling"], "type": "llama3"}}
    del legacy_type["rope_scaling"]["rope_type"]
    # What transformers 5 writes (checked: LlamaConfig(...).save_pretrained in the venv).
    path = make_tiny_checkpoint(tmp_path / "m", "llama3")
    written = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written
    for d in (classic, legacy_type, written):
        cfg = hf_config.config_from_dict(d)
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3", d
        assert cfg.rope_scaling["original_max_position_embeddings"] == 32
        assert hf_config.config_from_dict(hf_config.config_to_dict(cfg)) == cfg  # round trip
    plain = hf_config.config_from_dict({**classic, "rope_scaling": None})
    assert plain.rope_scaling is None and plain.rope_theta == 500000.0
    assert (
        hf_config.config_from_dict(
            {
                **classic,
                "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
            }
        ).rope_theta
        == 7.0
    )


def test_meta_build_then_init_weights_starts_near_uniform():
    """A fresh model must predict ~uniformly: cross-entropy ~ ln(V) on random tokens."""
    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    again = Transformer(cfg)
    again.init_weights(seed=0)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), f"init_weights(seed=0) is not reproducible for {name}"
    ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Next-token loss (shifted): with tied weights the current token is predictable.
        loss = torch.nn.functional.cross_entropy(
            model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        ).item()
    print(f"fresh loss {loss:.3f}, ln V = {math.log(cfg.vocab_size):.3f}")
    # N(0, 0.02) weights give logits of std ~0.02 * sqrt(H) ~ 0.16: loss exceeds ln V by ~0.01.
    assert abs(loss - math.log(cfg.vocab_size)) < 0.1, (
        f"fresh loss {loss:.3f} vs ln V {math.log(cfg.vocab_size):.3f}"
    )


def test_meta_build_loads_with_assign(tiny):
    arch, path, model, _ = tiny
    with torch.device("meta"):
        fresh = Transformer(hf_config.load_config(path))
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(load_state_dict(path), strict=True, assign=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (fresh(ids) - model(ids)).abs().max().item()
    # Same weights, same ops: bit for bit.
    assert diff == 0.0, f"{arch}: meta-built model differs by {diff:.2e}"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="model_type='gpt2'.*llama, mistral, qwen2"):
        hf_config.config_from_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_scaling.rope_type='yarn'"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_scaling lacks low_freq_factor"):
        ModelConfig(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        )
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        ModelConfig(hidden_act="gelu")


@torch.no_grad()
def test_qwen2_sliding_window_layers_match_transformers(tmp_path):
    """Qwen2 windows only layers >= max_window_layers, and only when use_sliding_window is set."""
    path = make_tiny_checkpoint(
        tmp_path / "m", "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    model = Transformer(hf_config.load_config(path))
    assert model.windows == [None, 4]
    model.load_state_dict(load_state_dict(path), strict=True)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4)
    )
    diff = (model(ids) - AutoModelForCausalLM.from_pretrained(path)(ids).logits).abs().max().item()
    print(f"qwen2 sliding window: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < PARITY_ATOL, f"qwen2 sliding window: max |logit diff| {diff:.2e}"


@torch.no_grad()
def test_bf16_forward_and_cache(tiny):
    """bf16 weights: logits come out in bf16 and the bf16 cache decodes like the bf16 forward."""
    arch, path, _, _ = tiny
    model = load_model(path, dtype=torch.bfloat16)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6)
    )
    full = model(ids)
    assert full.dtype == torch.bfloat16
    model.setup_cache(2, 16)
    # On a CPU the cache of bf16 weights is fp32: bf16 SDPA is ~9x slower there at decode shapes.
    assert model.model.layers[0].self_attn.kv_cache.k.dtype == torch.float32
    steps = [model(ids[:, :4], input_pos=torch.arange(4))]
    steps += [model(ids[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(4, 12)]
    diff = (torch.cat(steps, dim=1).float() - full.float()).abs().max().item()
    # bf16 keeps 8 bits: logits of size ~1 round to steps of 2^-8 ~ 0.004, and the steps grow
    # with the logits (gemma2's reach ~3); different summation orders move them by a few steps
    # (measured ~0.002 at size 1, 0.044 at size 3).
    tol = 0.03 * max(1.0, full.float().abs().max().item())
    assert diff < tol, f"{arch}: bf16 cached decoding differs from the bf16 forward by {diff:.3f}"
