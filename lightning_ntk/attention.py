"""The attention rewrite of the structured path: ``nn.MultiheadAttention`` run with its packed
in-projection and its output projection as modules (:class:`PackedProjection`, ``out_proj``), so that
:mod:`lightning_ntk.layers`' hooks see their inputs and output gradients like any linear layer's; the
attention itself computes what the module computes."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F


class PackedProjection(nn.Module):
    """The in-projection of an ``nn.MultiheadAttention``: three linear maps with the rows of its packed
    ``in_proj_weight``/``in_proj_bias``, of the query, key and value laid out ``[B, T, 3, E]`` (a grouped
    linear layer, ``groups = 3``), to ``[B, T, 3E]``. Not a submodule of the model: the attention's
    forward calls it while the structured path runs (see :func:`explicit_attention`)."""

    groups = 3

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.attention = [attention]  # in a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the query, key and value ``[B, T, 3, E]``, or ``[B, T, E]`` when they are one tensor
        (self-attention): then a plain linear layer of ``3E`` outputs (one group)."""
        attention = self.attention[0]
        if x.dim() == 3:
            return F.linear(x, attention.in_proj_weight, attention.in_proj_bias)
        e = attention.embed_dim
        out = torch.einsum("btgi,goi->btgo", x, attention.in_proj_weight.view(3, e, e))
        if attention.in_proj_bias is not None:
            out = out + attention.in_proj_bias.view(3, e)
        return out.flatten(2)


def _attention_forward(attention: nn.MultiheadAttention, projection: PackedProjection, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` with its in-projection and output projection run as modules on
    batch-first inputs, so that their hooks see them; the attention itself by
    ``F.multi_head_attention_forward`` with identity projections (exact), or, for self-attention
    without weights returned or masks other than padding (as ``nn.TransformerEncoderLayer`` calls it),
    by ``F.scaled_dot_product_attention`` on the batch-first heads, which is what that function
    computes then, without the identity products and the sequence-first copies."""
    if query.dim() != 3:
        raise ValueError("The structured path needs batched inputs of nn.MultiheadAttention ([B, T, E] or [T, B, E]).")
    one_input = query is key is value  # self-attention: one input, projected as one linear layer
    if not attention.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    tq, tk, e = query.shape[1], key.shape[1], attention.embed_dim
    if one_input and not need_weights and attn_mask is None and not is_causal:
        heads = attention.num_heads
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in projection(query).split(e, dim=-1))
        mask = None
        if key_padding_mask is not None:
            mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=None, other_name="", target_type=q.dtype)
            mask = mask.view(query.shape[0], 1, 1, tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attention.dropout if attention.training else 0.0)
        out = attention.out_proj(out.transpose(1, 2).flatten(2))
        return (out if attention.batch_first else out.transpose(0, 1)), None
    if one_input:
        q, k, v = (t.transpose(0, 1) for t in projection(query).split(e, dim=-1))
    else:
        length = max(tq, tk)  # positions beyond a sequence's end are zeros, which add nothing to the gradient
        stacked = torch.stack([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in (query, key, value)], dim=2)
        projected = projection(stacked).unflatten(-1, (3, e))
        q, k, v = (projected[:, :n, i].transpose(0, 1) for i, n in enumerate((tq, tk, tk)))
    eye = torch.eye(e, dtype=q.dtype, device=q.device)
    out, weights = F.multi_head_attention_forward(
        q, k, v, e, attention.num_heads, None, None, None, None, False, attention.dropout, eye, None,
        training=attention.training, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=average_attn_weights, is_causal=is_causal,
    )
    out = attention.out_proj(out.transpose(0, 1))
    return (out if attention.batch_first else out.transpose(0, 1)), weights



@contextlib.contextmanager
def explicit_attention(patched: list[nn.MultiheadAttention], blocks: list) -> Iterator[None]:
    """Each attention of ``patched`` (the supported ones, :func:`~lightning_ntk.blocks.supported_attentions`)
    runs :func:`_attention_forward` meanwhile, with the in-projection of its block among ``blocks`` (a
    fresh one if its parameters are not chosen)."""
    projections = {id(blk.module.attention[0]): blk.module for blk in blocks if isinstance(blk.module, PackedProjection)}
    for m in patched:
        m.forward = functools.partial(_attention_forward, m, projections.get(id(m)) or PackedProjection(m))
    try:
        yield
    finally:
        for m in patched:
            del m.forward

