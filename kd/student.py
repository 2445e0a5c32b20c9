"""A shallower student made of some of the teacher's layers (DistilBERT / Minitron style).

DistilBERT (Sanh et al., arXiv 1910.01108) initializes its student from every other layer of
the teacher; Minitron (Muralidharan et al., arXiv 2407.14679) prunes whole layers and then
distills. Either way the student is the teacher's architecture with `num_hidden_layers =
len(layers)`, its blocks are copies of the chosen teacher blocks (in the order given), and
embeddings, final norm and head are copied whole. An MoE layer is copied with its router and
all its experts.

    cfg = layer_subset_config(teacher_cfg, [0, 4, 8, 11])
    sd = layer_subset_state_dict(teacher_state_dict, [0, 4, 8, 11])

Used by train.py (`student_layers = [...]`); tested in tests/test_train_units.py.
"""

from dataclasses import replace

from torch import Tensor

from kd.model_config import ModelConfig

LAYER_PREFIX = "model.layers."


def layer_subset_config(teacher: ModelConfig, layers: list[int]) -> ModelConfig:
    """The teacher's config with only `layers`; each kept layer keeps its attention type."""
    bad = [i for i in layers if not 0 <= i < teacher.num_hidden_layers]
    if not layers or bad:
        last = teacher.num_hidden_layers - 1
        raise ValueError(
            f"student_layers={list(layers)}: each index must be in 0..{last} (the teacher's layers)"
        )
    # Each kept layer keeps its type: its window, and (Gemma 3) its RoPE base; and its kind of
    # feed-forward (Qwen3-MoE: sparse or dense, said by listing the dense ones).
    layer_types = [teacher.layer_types[i] for i in layers]
    moe = {}
    if teacher.model_type == "qwen3_moe":
        dense = [j for j, i in enumerate(layers) if not teacher.sparse(i)]
        moe = {"mlp_only_layers": dense, "decoder_sparse_step": 1}
    return replace(teacher, num_hidden_layers=len(layers), layer_types=layer_types, **moe)


def layer_subset_state_dict(
    teacher_state_dict: dict[str, Tensor], layers: list[int]
) -> dict[str, Tensor]:
    """Teacher tensors renamed for the student: block layers[j] becomes block j; the rest as is."""
    out = {k: v for k, v in teacher_state_dict.items() if not k.startswith(LAYER_PREFIX)}
    for new, old in enumerate(layers):
        prefix = f"{LAYER_PREFIX}{old}."
        out |= {
            f"{LAYER_PREFIX}{new}.{k[len(prefix) :]}": v
            for k, v in teacher_state_dict.items()
            if k.startswith(prefix)
        }
    return out
