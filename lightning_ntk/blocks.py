"""Which layers take the structured path, and how: each module with chosen parameters becomes a
:class:`Block`, one gradient matrix of a :class:`BlockKind`, or falls back to the generic path.

Decided from the model's structure alone (module type and options, where its parameters are used),
never by comparing numbers, so that it holds under TF32, autocast and half precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from .attention import PackedProjection

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SCALE_TYPES = BATCH_NORM_TYPES + (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
SUPPORTED_TYPES = (nn.Linear, nn.Embedding, nn.MultiheadAttention) + CONV_TYPES + SCALE_TYPES


class BlockKind(str, Enum):
    """How a block's per-example gradient matrix ``G`` (``rows × cols``) is made from its signals (the
    layouts of :class:`~lightning_ntk.layers.LayerSignals`); a ``str``, so that a kind compares equal to its name."""

    OUTER = "outer"  # Linear, ConvNd, an attention's in-projection: G = Σ_t δ_t a_tᵀ over positions t
    EMBEDDING = "embedding"  # nn.Embedding: each position's gradient row δ_t added to the row of its token
    SCALE = "scale"  # a normalisation's affine: one row, Σ_t δ_t ⊙ x̂_t for the weight, then Σ_t δ_t for the bias
    FLAT = "flat"  # per-example gradients formed already (modules that fell back): one row, as it is


@dataclass(frozen=True)
class Block:
    """The selected parameters of one module, seen as one gradient matrix ``G`` of ``rows × cols``.

    ``OUTER`` (Linear, ConvNd): rows are output channels, columns the input patch (``in/groups ·
    kernel``) then a column for the bias; ``EMBEDDING``: rows are tokens, columns the embedding
    dimension; ``SCALE`` (normalisation affine): one row, the weight's then the bias's entries;
    ``FLAT``: one row holding the per-example gradients of the modules that fell back. ``transposed``:
    the weight is stored ``[in, out]`` (Hugging Face's ``Conv1D``), the transpose of ``G``'s weight columns.
    """

    name: str
    kind: BlockKind
    params: tuple[str, ...]
    rows: int
    cols: int
    groups: int = 1
    shapes: tuple[torch.Size, ...] = ()
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    transposed: bool = False
    # a convolution's patch indices by input shape, columns and device: they live as long as the block's
    # LayerGradients (the featurizer), not the process
    patch_indices: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def size(self) -> int:
        return self.rows * self.cols


def _is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer ``x W + b`` with its weight stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def _outer_block(name: str, module: nn.Module, own: dict[str, str]) -> Block:
    """``own``: the chosen parameters of the module, from their name in it to their name in the model."""
    groups = getattr(module, "groups", 1)
    transposed = _is_transposed_linear(module)
    rows, patch = (module.weight.shape[1], module.weight.shape[0]) if transposed else (module.weight.shape[0], module.weight[0].numel())
    cols = (patch if "weight" in own else 0) + (1 if "bias" in own else 0)
    names = tuple(own[k] for k in ("weight", "bias") if k in own)
    shapes = tuple(getattr(module, k).shape for k in ("weight", "bias") if k in own)
    return Block(name, BlockKind.OUTER, names, rows, cols, groups, shapes, module, transposed)



def _tie_shares(blocks: list[Block]) -> set[str]:
    """The blocks that hold a parameter which other blocks hold too (tied weights) and cannot share its
    sketch: sharing needs every use to hold that parameter alone, laid out as the parameter (rows are
    its first dimension), in gradient matrices of the same shape."""
    holders: dict[str, list[Block]] = {}
    for blk in blocks:
        for n in blk.params:
            holders.setdefault(n, []).append(blk)
    refused = set()
    for group in holders.values():
        if len(group) > 1 and not all(
            len(blk.params) == 1 and blk.kind in (BlockKind.OUTER, BlockKind.EMBEDDING) and blk.groups == 1 and not blk.transposed
            and (blk.rows, blk.cols) == (group[0].rows, group[0].cols)
            for blk in group
        ):
            refused.update(blk.name for blk in group)
    return refused


def _supported(module: nn.Module) -> bool:
    """Whether the module's gradient is structured as this module knows it: exact types only (a subclass
    may change forward), no options that make gradients depend on more than the signals."""
    if not (type(module) in SUPPORTED_TYPES or _is_transposed_linear(module)) or "forward" in vars(module):
        return False
    held = {k for k, p in module._parameters.items() if p is not None}
    if isinstance(module, nn.MultiheadAttention):  # one packed in-projection of inputs of one width
        return module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn and held <= {"in_proj_weight", "in_proj_bias"}
    if not held <= {"weight", "bias"}:  # e.g. the weight_g/weight_v of weight_norm
        return False
    if isinstance(module, CONV_TYPES):
        return module.padding_mode in ("zeros", "reflect", "replicate", "circular")
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq
    if isinstance(module, BATCH_NORM_TYPES):
        return module.track_running_stats and module.running_mean is not None
    return True


def supported_attentions(model: nn.Module) -> list[nn.MultiheadAttention]:
    """The model's attentions that the structured path rewrites (see :mod:`lightning_ntk.attention`)."""
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and _supported(m)]


def plan_blocks(model: nn.Module, chosen: dict[str, nn.Parameter]) -> tuple[list[Block], list[str]]:
    """Split the chosen parameters into structured blocks and the names of the modules that fall back.

    A parameter used by several modules (tied weights) gives a block for each use, whose gradients add
    up: their sketches share a hash (see :func:`~lightning_ntk.layers.hash_positions`), and exact
    kernels form their sum (see :func:`~lightning_ntk.kernels.gram_factors`). Where the uses cannot be laid out alike (see
    :func:`_tie_shares`), or one of them is not supported, all of them fall back.
    """
    names_of = {id(p): n for n, p in chosen.items()}
    # the output projection of a supported attention runs as a module (see attention.explicit_attention)
    attention_outputs = {id(m.out_proj) for m in supported_attentions(model)}
    blocks, fallback = [], []
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        own = {k: names_of[id(p)] for k, p in module._parameters.items() if p is not None and id(p) in names_of}
        if not own or id(module) in seen:
            continue
        seen.add(id(module))
        if not (_supported(module) or id(module) in attention_outputs and "forward" not in vars(module)):
            fallback.append(name)
        elif isinstance(module, nn.MultiheadAttention):
            weight, bias = (k in own for k in ("in_proj_weight", "in_proj_bias"))
            names = tuple(own[k] for k in ("in_proj_weight", "in_proj_bias") if k in own)
            shapes = tuple(getattr(module, k).shape for k in ("in_proj_weight", "in_proj_bias") if k in own)
            e = module.embed_dim
            blocks.append(Block(name, BlockKind.OUTER, names, 3 * e, e * weight + bias, 3, shapes, PackedProjection(module)))
        elif isinstance(module, nn.Embedding):
            blocks.append(Block(name, BlockKind.EMBEDDING, tuple(own.values()), module.num_embeddings, module.embedding_dim, 1, (module.weight.shape,), module))
        elif isinstance(module, SCALE_TYPES):
            shapes = tuple(getattr(module, k).shape for k in own)
            blocks.append(Block(name, BlockKind.SCALE, tuple(own.values()), 1, sum(map(math.prod, shapes)), 1, shapes, module))
        else:
            blocks.append(_outer_block(name, module, own))
    refused = _tie_shares(blocks)
    held_by_fallback = {names_of[id(p)] for name in fallback for p in model.get_submodule(name).parameters(recurse=False) if id(p) in names_of}
    fallback += [blk.name for blk in blocks if blk.name in refused or set(blk.params) & held_by_fallback]
    return [blk for blk in blocks if blk.name not in fallback], fallback

