"""Per-layer signals: what every per-example, per-class gradient is made of, without forming it.

A linear layer's per-example gradient for class ``c`` is ``G_c = δ_c aᵀ`` (``a``: the layer's input,
``δ_c = ∂f_c/∂output``); a convolution's is ``Σ_t δ_ct a_tᵀ`` over output positions ``t`` (``a_t``:
the input patch); a bias is a weight on a constant input 1. One forward pass with hooks records every
supported layer's input, and C backward passes (batched over classes) give ``δ`` at every layer's
output for all examples at once, because examples are independent in eval mode. The cost is the
C-backward floor minus the weight gradients. From these signals:

- :class:`~lightning_ntk.projection.SketchProjector` projects the gradients without forming them,
- :func:`factored_kernel` computes the exact trNTK from ``(δ·δ')(a·a')`` (summed over positions), and
- :meth:`LayerSignals.parameter_gradients` forms per-example gradients when asked to.

Modules with parameters that are not supported fall back, per module, to the generic ``torch.func``
path of :class:`~lightning_ntk.jacobian.PerExampleGradients`; a warning names them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from .jacobian import ParamSelection, PerExampleGradients, check_logits, eval_mode, select_parameters
from .task import Task, batch_size_of, slice_inputs

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SCALE_TYPES = BATCH_NORM_TYPES + (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
SUPPORTED_TYPES = (nn.Linear, nn.Embedding) + CONV_TYPES + SCALE_TYPES
WORK_BYTES = 1 << 28  # cap on the temporary per-layer gradient buffers of one batch


@dataclass(frozen=True)
class Block:
    """The selected parameters of one module, seen as one gradient matrix ``G`` of ``rows × cols``.

    ``outer`` (Linear, ConvNd): rows are output channels, columns the input patch (``in/groups ·
    kernel``) then a column for the bias; ``embedding``: rows are tokens, columns the embedding
    dimension; ``scale`` (normalisation affine): one row, the weight's then the bias's entries;
    ``flat``: one row holding the per-example gradients of the modules that fell back.
    """

    name: str
    kind: str
    params: tuple[str, ...]
    rows: int
    cols: int
    groups: int = 1
    shapes: tuple[torch.Size, ...] = ()
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return self.rows * self.cols


def _outer_block(name: str, module: nn.Module, chosen: dict[str, nn.Parameter]) -> Block:
    weight, bias = f"{name}.weight" if name else "weight", f"{name}.bias" if name else "bias"
    groups = getattr(module, "groups", 1)
    patch = module.weight[0].numel() if weight in chosen else 0
    cols = patch + (1 if bias in chosen else 0)
    names = tuple(n for n in (weight, bias) if n in chosen)
    return Block(name, "outer", names, module.weight.shape[0], cols, groups, tuple(chosen[n].shape for n in names), module)


def _supported(module: nn.Module) -> bool:
    """Whether the module's gradient is structured as this module knows it: exact types only (a subclass
    may change forward), no options that make gradients depend on more than the signals."""
    if type(module) not in SUPPORTED_TYPES:
        return False
    if isinstance(module, CONV_TYPES):
        return module.padding_mode in ("zeros", "reflect", "replicate", "circular")
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq
    if isinstance(module, BATCH_NORM_TYPES):
        return module.track_running_stats and module.running_mean is not None
    return True


def plan_blocks(model: nn.Module, chosen: dict[str, nn.Parameter]) -> tuple[list[Block], list[str]]:
    """Split the chosen parameters into structured blocks and the names of the modules that fall back.

    A parameter shared by several modules (tied weights) falls back too, since each module would
    only see its own share of the gradient.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    blocks, fallback = [], []
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = {f"{name}.{k}" if name else k: p for k, p in module._parameters.items() if p is not None}
        own = {n: p for n, p in own.items() if n in chosen}
        if not own or id(module) in seen:
            continue
        seen.add(id(module))
        shared = any(len(owners[id(p)]) > 1 for p in own.values())
        if shared or not _supported(module):
            fallback.append(name)
        elif isinstance(module, nn.Embedding):
            blocks.append(Block(name, "embedding", tuple(own), module.num_embeddings, module.embedding_dim, 1, (module.weight.shape,), module))
        elif isinstance(module, SCALE_TYPES):
            shapes = tuple(p.shape for p in own.values())
            blocks.append(Block(name, "scale", tuple(own), 1, sum(p.numel() for p in own.values()), 1, shapes, module))
        else:
            blocks.append(_outer_block(name, module, chosen))
    return blocks, fallback


def _differentiable(inputs: Any) -> Any:
    """Clone inference-mode tensors (e.g. batches of ``trainer.validate``), which autograd cannot save."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t, inputs)


# -- layer inputs -------------------------------------------------------------------------------------


def _patches(module: nn.Module, x: torch.Tensor, with_weight: bool, with_bias: bool) -> torch.Tensor:
    """The inputs ``a`` of a Linear/ConvNd layer: ``[B, T, groups, cols]``, the bias column (ones) last."""
    if isinstance(module, nn.Linear):
        view = x.reshape(x.shape[0], -1, 1, x.shape[-1])
    else:
        dims = x.ndim - 2
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        if any(module._reversed_padding_repeated_twice):
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        x = x.contiguous()
        b, c = x.shape[:2]
        g = module.groups
        k, s, d = module.kernel_size, module.stride, module.dilation
        out = [(x.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(dims)]
        st = x.stride()
        view = x.as_strided(
            (b, *out, g, c // g, *k),
            (st[0], *(s[i] * st[2 + i] for i in range(dims)), (c // g) * st[1], st[1], *(d[i] * st[2 + i] for i in range(dims))),
        ).reshape(b, math.prod(out), g, -1)
    if not with_weight:
        view = view[..., :0]
    if not with_bias:
        return view
    a = view.new_empty(*view.shape[:-1], view.shape[-1] + 1)
    a[..., :-1] = view
    a[..., -1] = 1
    return a


def _normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x̂`` of a normalisation layer, laid out ``[B, T, D]`` with ``D`` the affine parameters' size."""
    if isinstance(module, nn.GroupNorm):
        xh = F.group_norm(x, module.num_groups, None, None, module.eps)
    elif isinstance(module, BATCH_NORM_TYPES):
        xh = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    else:
        shape = module.normalized_shape
        if isinstance(module, nn.LayerNorm):
            xh = F.layer_norm(x, shape, None, None, module.eps)
        else:
            xh = F.rms_norm(x, shape, None, module.eps)
        return xh.reshape(x.shape[0], -1, math.prod(shape))
    return xh.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)


def _channels_last(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """``δ`` of one class from ``[B, *output]`` to a ``[B, T, channels]`` view (channels-first outputs
    such as convolutions' stay laid out as they are: positions contiguous)."""
    b = grad.shape[0]
    if isinstance(module, CONV_TYPES + BATCH_NORM_TYPES + (nn.GroupNorm,)):
        return grad.reshape(b, grad.shape[1], -1).transpose(1, 2)
    width = math.prod(module.normalized_shape) if isinstance(module, SCALE_TYPES) else grad.shape[-1]
    return grad.reshape(b, -1, width)


@dataclass
class LayerSignals:
    """One block's signals for a batch of ``B`` examples and ``C`` classes (``C = 1`` for the pNTK).
    ``grads`` holds one tensor per class, as the backward passes return them (stacking them would
    cost a copy of all of them):

    ``outer``: ``inputs`` ``[B, T, groups, cols]`` and ``grads`` ``C × [B, T, rows]``;
    ``embedding``: ``inputs`` token ids ``[B, T]`` and ``grads`` ``C × [B, T, cols]``;
    ``scale``: ``inputs`` ``[B, T, D]`` (normalised) and ``grads`` ``C × [B, T, D]``;
    ``flat``: ``inputs`` None and ``grads`` the per-example gradients ``C × [B, cols]``.
    """

    block: Block
    inputs: torch.Tensor | None
    grads: tuple[torch.Tensor, ...]

    def stacked(self) -> torch.Tensor:
        """The gradients as one class-first tensor ``[C, B, ...]``."""
        return torch.stack(self.grads)

    def matrix(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The per-example gradient matrices ``[b, C, rows, cols]`` of examples ``start:stop``."""
        blk = self.block
        d = torch.stack([g[start:stop] for g in self.grads], dim=1)
        if blk.kind == "flat":
            return d.unsqueeze(2)
        x = self.inputs[start:stop]
        b, c, t = d.shape[:3]
        if blk.kind == "outer":
            d = d.reshape(b, c, t, blk.groups, -1)
            return torch.einsum("bctgo,btgi->bcgoi", d, x).reshape(b, c, blk.rows, blk.cols)
        if blk.kind == "embedding":
            index = x[:, None, :, None].expand(-1, c, -1, blk.cols)
            return d.new_zeros(b, c, blk.rows, blk.cols).scatter_add_(2, index, d)
        parts = [torch.einsum("bctd,btd->bcd", d, x) if p.endswith("weight") else d.sum(2) for p in blk.params]
        return torch.cat(parts, dim=-1).unsqueeze(2)

    def parameter_gradients(self) -> dict[str, torch.Tensor]:
        """Per-example, per-class gradients of each parameter of the block, ``[B, C, *shape]``."""
        blk = self.block
        g = self.matrix()
        b, c = g.shape[:2]
        if blk.kind == "outer" and len(blk.params) == 2:  # the weight's columns, then the bias column
            return {blk.params[0]: g[..., :-1].reshape(b, c, *blk.shapes[0]), blk.params[1]: g[..., -1]}
        sizes = [math.prod(shape) for shape in blk.shapes]
        parts = g.reshape(b, c, -1).split(sizes, dim=-1)
        return {n: part.reshape(b, c, *shape) for n, part, shape in zip(blk.params, parts, blk.shapes)}


class LayerGradients:
    """Records the signals of every supported layer: one forward pass with hooks, then one backward
    pass per class (or one of the summed logits for the pNTK), each for the whole batch.

    :meth:`stream` hands the signals over one class at a time, so that only one class's gradients
    are in memory (and their buffers are reused from class to class); ``__call__`` gathers them all.
    The model runs in eval mode. Parameters of unsupported modules (or shared between modules) are
    handled by :class:`~lightning_ntk.jacobian.PerExampleGradients` as one ``flat`` block. On the first
    batch, the summed gradients of two examples are checked against plain autograd per parameter;
    modules whose parameters disagree (e.g. a weight also used outside its module's forward) fall back.
    """

    def __init__(self, model: nn.Module, params: ParamSelection = None, task: Task | None = None):
        self.model = model
        self.task = task or Task()
        self.params = select_parameters(model, params)
        self.num_parameters = sum(p.numel() for p in self.params.values())
        self.blocks, fallback = plan_blocks(model, self.params)
        self._set_fallback(fallback)
        self._checked = False

    def _set_fallback(self, modules: list[str], reason: str = "is not supported by the structured path") -> None:
        self.fallback_modules = modules
        structured = {n for blk in self.blocks for n in blk.params}
        names = [n for n in self.params if n not in structured]
        self._fallback = PerExampleGradients(self.model, names, self.task) if names else None
        shapes = tuple(self.params[n].shape for n in names)
        self._flat = Block("+".join(modules), "flat", tuple(names), 1, sum(map(math.prod, shapes)), 1, shapes) if names else None
        if modules:
            warnings.warn(
                f"Per-example gradients of module(s) {', '.join(repr(m or '<model>') for m in modules)} use the generic "
                f"torch.func path (slower): the module {reason}.",
                stacklevel=3,
            )

    @property
    def all_blocks(self) -> list[Block]:
        """The structured blocks, then the fallback block if any: the layout of the sketch."""
        return self.blocks + ([self._flat] if self._flat is not None else [])

    def __call__(self, inputs: Any, summed: bool = False) -> list[LayerSignals]:
        """The signals of every block for a batch of inputs, all classes, in :attr:`all_blocks` order."""
        per_class = list(self.stream(inputs, summed))
        return [
            LayerSignals(blocks[0].block, blocks[0].inputs, tuple(sig.grads[0] for sig in blocks))
            for blocks in zip(*per_class)
        ]

    def stream(self, inputs: Any, summed: bool = False) -> Iterator[list[LayerSignals]]:
        """Yield, class by class, the signals of every block (one class each); the inputs' side of the
        signals is computed once and shared by all classes."""
        if not self._checked:
            self._checked = True
            self._check(inputs)
        with eval_mode(self.model):
            fallback = self._fallback(inputs, summed) if self._fallback is not None else None
            if not self.blocks:
                classes = range(1 if summed else fallback.shape[1])
                yield from ([LayerSignals(self._flat, None, (fallback if summed else fallback[:, c],))] for c in classes)
                return
            with torch.inference_mode(False), torch.enable_grad():
                inputs = _differentiable(inputs)
                logits, calls, probes = self._forward(inputs)
                xs = {id(blk): self._inputs(blk, calls[id(blk)], logits) for blk in self.blocks}
                if summed:
                    seeds = [torch.ones_like(logits)]
                else:
                    eye = torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
                    seeds = [eye[c].expand_as(logits) for c in range(logits.shape[1])]
                for c, seed in enumerate(seeds):
                    grads = torch.autograd.grad(logits, probes, seed, retain_graph=c + 1 < len(seeds), allow_unused=True)
                    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, probes)]
                    signals = [LayerSignals(blk, xs[id(blk)], (self._grads(blk, calls[id(blk)], grads, xs[id(blk)], logits),)) for blk in self.blocks]
                    if fallback is not None:
                        signals.append(LayerSignals(self._flat, None, (fallback if summed else fallback[:, c],)))
                    yield signals

    def _forward(self, inputs: Any) -> tuple[torch.Tensor, dict[int, list], list[torch.Tensor]]:
        """Run the model with hooks that record each block's input and add a zero "probe" to its output:
        the gradient with respect to the probe is the gradient at the output, even when a later
        operation modifies the output in place."""
        modules = {id(blk.module): blk for blk in self.blocks}
        calls: dict[int, list] = {id(blk): [] for blk in self.blocks}
        probes: list[torch.Tensor] = []

        def hook(module, args, output):
            blk = modules[id(module)]
            x = args[0]
            if blk.kind == "scale":
                with torch.no_grad():
                    x = _normalised(module, x)
            calls[id(blk)].append((x.detach(), x._version, len(probes)))
            probes.append(torch.zeros_like(output, requires_grad=True))
            return output + probes[-1]

        handles = [blk.module.register_forward_hook(hook) for blk in self.blocks]
        try:
            logits = check_logits(self.task.forward(self.model, inputs), batch_size_of(inputs))
        finally:
            for h in handles:
                h.remove()
        return logits, calls, probes

    def _inputs(self, blk: Block, calls: list, logits: torch.Tensor) -> torch.Tensor:
        """The block's input side, its calls' positions concatenated (a layer may run several times)."""
        parts = []
        for x, version, _ in calls:
            if x._version != version:
                raise RuntimeError(
                    f"The input of layer '{blk.name}' was modified in place after the layer used it, so its gradient "
                    "cannot be formed from it. Avoid in-place operations on that tensor (e.g. an inplace=True activation "
                    "applied to it afterwards), or exclude the layer with params=..."
                )
            if blk.kind == "outer":
                x = _patches(blk.module, x, any(n.endswith("weight") for n in blk.params), blk.params[-1].endswith("bias"))
            parts.append(x.reshape(x.shape[0], -1) if blk.kind == "embedding" else x)
        if not parts:  # the layer did not run: its gradient is zero
            b = logits.shape[0]
            if blk.kind == "outer":
                return logits.new_zeros(b, 1, blk.groups, blk.cols)
            if blk.kind == "embedding":
                return torch.zeros(b, 1, dtype=torch.long, device=logits.device)
            return logits.new_zeros(b, 1, blk.cols // len(blk.params))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _grads(self, blk: Block, calls: list, grads: list[torch.Tensor], x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The block's gradient at its output(s) for one class, ``[B, T, width]``."""
        parts = [_channels_last(blk.module, grads[i]) for _, _, i in calls]
        if not parts:
            width = {"outer": blk.rows, "embedding": blk.cols, "scale": blk.cols // len(blk.params)}[blk.kind]
            return logits.new_zeros(logits.shape[0], 1, width)
        d = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if blk.kind == "embedding" and blk.module.padding_idx is not None:
            d = d * (x != blk.module.padding_idx)[..., None]
        return d

    def _check(self, inputs: Any) -> None:
        """Compare the structured gradients of the summed logits of (up to) two examples with autograd's,
        and send the modules whose parameters disagree to the fallback path."""
        if not self.blocks:
            return
        sample = slice_inputs(inputs, 0, 2)
        got: dict[str, torch.Tensor] = {}
        for sig in self(sample, summed=True):
            if sig.block.kind != "flat":
                got.update({k: v[:, 0] for k, v in sig.parameter_gradients().items()})
        names = list(got)
        wrong: set[str] = set()
        with eval_mode(self.model), torch.inference_mode(False), torch.enable_grad():
            sample = _differentiable(sample)
            for i in range(batch_size_of(sample)):
                out = self.task.forward(self.model, slice_inputs(sample, i, i + 1))
                want = torch.autograd.grad(out.sum(), [self.params[n] for n in names], allow_unused=True)
                for name, w in zip(names, want):
                    w = torch.zeros_like(self.params[name]) if w is None else w
                    tol = 1e-4 * (w.norm() + got[name][i].norm()) + 1e-30
                    if (got[name][i] - w).norm() > tol:
                        wrong.add(name)
        if wrong:
            bad = [blk for blk in self.blocks if wrong & set(blk.params)]
            self.blocks = [blk for blk in self.blocks if blk not in bad]
            self._set_fallback(
                self.fallback_modules + [blk.name for blk in bad],
                "gives per-example gradients that differ from autograd's (is a weight also used outside the module's "
                "forward, or does the layer see the batch in a dimension other than the first?)",
            )



# -- exact kernels from signals ------------------------------------------------------------------------


def gram_factors(signals: list[LayerSignals]) -> list[LayerSignals]:
    """The signals in the form that is cheaper for exact inner products, block by block.

    Linear-like blocks keep their factors (the Gram of a pair costs ``T·T'·(cols + C·rows)``); blocks
    whose positions make that dearer than the gradient itself (``C·rows·cols``), and normalisation
    blocks, are replaced by their formed per-example gradients, as ``flat`` blocks.
    """
    out = []
    for sig in signals:
        blk, classes = sig.block, len(sig.grads)
        if blk.kind == "outer":
            t = sig.inputs.shape[1]
            keep = t * t * (blk.groups * blk.cols + classes * blk.rows) <= classes * blk.rows * blk.cols
        else:
            keep = blk.kind != "scale"
        if keep:
            out.append(sig)
        else:
            flat = Block(blk.name, "flat", blk.params, 1, blk.size, 1, blk.shapes, blk.module)
            out.append(LayerSignals(flat, None, sig.matrix().flatten(2).unbind(1)))
    return out


def signal_gram(signals_a: list[LayerSignals], signals_b: list[LayerSignals]) -> torch.Tensor:
    """``Σ_c <G_c(x), G_c(x')>`` between the examples of two batches, ``[Ba, Bb]``, summed over blocks:
    ``(δ·δ')(a·a')`` summed over positions for linear-like blocks, token matches for embeddings."""
    total = None
    for sa, sb in zip(signals_a, signals_b):
        kind = sa.block.kind
        if kind == "flat":
            ga, gb = sa.stacked(), sb.stacked()  # [C, B, P]
            k = torch.einsum("cbp,csp->bs", ga, gb)
        elif kind == "outer":
            g = sa.block.groups
            da, db = (s.stacked().unflatten(-1, (g, -1)) for s in (sa, sb))  # [C, B, T, g, rows/g]
            same_inputs = torch.einsum("btgi,sugi->gbtsu", sa.inputs, sb.inputs)
            same_grads = torch.einsum("cbtgo,csugo->gbtsu", da, db)
            k = (same_inputs * same_grads).sum((0, 2, 4))
        else:  # embedding: a token's one-hot inputs match only the same token
            same_inputs = sa.inputs[:, :, None, None] == sb.inputs[None, None]
            same_grads = torch.einsum("cbtj,csuj->btsu", sa.stacked(), sb.stacked())
            k = (same_grads * same_inputs).sum((1, 3))
        total = k if total is None else total + k
    return total
