"""kd/linear.py: the split matrix-vector product, and `Transformer.decode_layout`.

Checks: `linear` equals x W^T + b computed in float64 numpy, for 1, 8 and more rows than it
splits, row-major and transposed weights, with and without bias, on 2 and 3 threads (widths
3 does not divide take the other split or plain F.linear); gradients are right under
autograd; with 2 threads and no autograd it really runs as one bmm (where the speed comes
from). `decode_layout` keeps values, shapes and the tie, transposes in memory exactly the
matrices wider than tall, leaves the logits and cached greedy decoding unchanged, and what
`save_model` writes from it loads back equal.

Run: `.venv/bin/python -m pytest -q tests/test_linear.py`.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kd.hf import load_model, save_model
from kd.linear import SPLIT_MAX_ROWS, linear
from kd.model import Transformer
from kd.model_config import ModelConfig
from kd.sampling import generate

# fp32 products of length <= 96 with entries ~N(0, 1): rounding ~1e-6 relative to sums of size ~10.
ATOL = 1e-4


@pytest.fixture
def threads(request):
    """Torch on `request.param` threads for the test, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> np.ndarray:
    """x W^T + b in float64 numpy, from the definition."""
    y = x.double().numpy() @ w.double().numpy().T
    return y if b is None else y + b.double().numpy()


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("rows", [1, 8, SPLIT_MAX_ROWS + 1])
@pytest.mark.parametrize("layout", ["row-major", "transposed"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_numpy(threads, rows, layout, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 96, generator=gen)  # (2, rows, in): a batch of sequences
    w = torch.randn(48, 96, generator=gen)  # 48 = 3 * 16: divisible by 2 and 3 threads
    if layout == "transposed":
        w = w.t().contiguous().t()
    b = torch.randn(48, generator=gen) if bias else None
    with torch.no_grad():
        y = linear(x, w, b)
    assert y.shape == (2, rows, 48)
    err = np.abs(y.numpy() - reference(x, w, b)).max()
    assert err < ATOL, f"max |linear - numpy| = {err}"


@pytest.mark.parametrize("threads", [3], indirect=True)
def test_widths_not_divisible(threads):
    x = torch.randn(1, 64)
    with torch.no_grad():
        w = torch.randn(50, 64)  # neither 50 outputs nor 64 inputs split 3 ways: plain F.linear
        assert torch.equal(linear(x, w), F.linear(x, w))
        # Transposed, but 64 inputs do not split 3 ways: split the 48 outputs instead.
        w = torch.randn(48, 64).t().contiguous().t()
        err = np.abs(linear(x, w).numpy() - reference(x, w, None)).max()
        assert err < ATOL, f"max |linear - numpy| = {err}"


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_gradients_under_autograd(threads):
    x, w = torch.randn(1, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    linear(x, w).sum().backward()
    # d sum(x W^T) / dW_ij = x_j in every row i; d / dx_j = sum_i W_ij.
    assert torch.equal(w.grad, x.detach().expand(8, 16))
    assert torch.allclose(x.grad, w.detach().sum(0, keepdim=True))


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_split_really_runs_as_one_bmm(threads):
    x, w = torch.randn(1, 1, 64), torch.randn(32, 64)
    with torch.no_grad():
        assert "aten::bmm" in ops_run(lambda: linear(x, w))
        assert "aten::bmm" in ops_run(lambda: linear(x, w.t().contiguous().t()))
        assert "aten::bmm" not in ops_run(lambda: linear(torch.randn(SPLIT_MAX_ROWS + 1, 64), w))
    assert "aten::bmm" not in ops_run(lambda: linear(x, w.requires_grad_()))


@pytest.fixture
def tiny_model() -> Transformer:
    config = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Transformer(config)
    model.init_weights(seed=0)
    return model.eval()


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_decode_layout_keeps_the_model(threads, tiny_model, tmp_path):
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    prompts = [[5, 6, 7], [8, 9]]
    with torch.no_grad():
        logits = tiny_model(ids)
    tokens = generate(
        tiny_model, prompts, max_new_tokens=6, temperature=0.0, eos_token_ids=None, pad_id=0
    )
    head = tiny_model.head_weight.detach().clone()

    mlp = tiny_model.model.layers[0].mlp
    assert tiny_model.decode_layout() is tiny_model
    w = tiny_model.head_weight
    assert w.shape == (96, 32) and w.t().is_contiguous() and not w.is_contiguous()
    assert torch.equal(w, head)
    # Wider than tall (64 x 32): transposed in memory. Taller (32 x 64) and square: as loaded.
    assert mlp.gate_proj.weight.shape == (64, 32) and mlp.gate_proj.weight.t().is_contiguous()
    assert (
        mlp.down_proj.weight.is_contiguous()
        and tiny_model.model.layers[0].self_attn.q_proj.weight.is_contiguous()
    )
    assert tiny_model.model.embed_tokens.weight is w, "the tie survives: one parameter, two uses"
    with torch.no_grad():
        err = (tiny_model(ids) - logits).abs().max().item()
    assert err < 1e-5, f"logits moved by {err} after decode_layout (fp32 rounding only)"
    assert (
        generate(
            tiny_model, prompts, max_new_tokens=6, temperature=0.0, eos_token_ids=None, pad_id=0
        )
        == tokens
    )

    save_model(tiny_model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert all(
        torch.equal(a, b)
        for a, b in zip(back.state_dict().values(), tiny_model.state_dict().values())
    )


def test_decode_layout_leaves_bf16_alone(tiny_model):
    tiny_model.to(torch.bfloat16).decode_layout()
    assert all(p.is_contiguous() for p in tiny_model.parameters())
