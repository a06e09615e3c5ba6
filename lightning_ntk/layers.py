"""Per-layer signals: what every per-example, per-class gradient is made of, without forming it.

A linear layer's per-example gradient for class ``c`` is ``G_c = δ_c aᵀ`` (``a``: the layer's input,
``δ_c = ∂f_c/∂output``); a convolution's is ``Σ_t δ_ct a_tᵀ`` over output positions ``t`` (``a_t``:
the input patch); a bias is a weight on a constant input 1. One forward pass with hooks records every
supported layer's input, and one backward pass vmapped over the C classes gives ``δ`` at every layer's
output for all examples at once, because examples are independent in eval mode. The cost is the
C-backward floor minus the weight gradients, in a number of operations that does not grow with C.
From these signals:

- :class:`~lightning_ntk.projection.SketchProjector` projects the gradients without forming them
  (inside the backward pass, see :meth:`LayerGradients.project`),
- :func:`factored_kernel` computes the exact trNTK from ``(δ·δ')(a·a')`` (summed over positions), and
- :meth:`LayerSignals.parameter_gradients` forms per-example gradients when asked to.

Supported: ``nn.Linear``, Hugging Face's ``Conv1D`` (a linear layer with its weight transposed),
``nn.ConvNd``, ``nn.Embedding`` (also one row of ids broadcast over the batch, as position ids),
normalisation affines, and ``nn.MultiheadAttention`` (its packed in-projection as a linear layer of
three groups: query, key, value; its output projection as a Linear). A weight tied between modules
gives a block per use; the uses' gradients add up.

Which modules take this path is decided from the model's structure alone (module type and options,
where its parameters are used, where its inputs hold the batch), never by comparing numbers, so
that it holds under TF32, autocast and half precision (:mod:`lightning_ntk.blocks`; attention is
rewritten by :mod:`lightning_ntk.attention`). Modules with parameters that are not supported
fall back, per module, to the generic ``torch.func`` path of
:class:`~lightning_ntk.jacobian.PerExampleGradients`; a warning names them and says why.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn
from torch.func import vmap
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from .attention import PackedProjection, explicit_attention
from .blocks import BATCH_NORM_TYPES, CONV_TYPES, SCALE_TYPES, Block, BlockKind, plan_blocks, supported_attentions
from .jacobian import DEFAULT_MEMORY_BUDGET, ParamSelection, PerExampleGradients, _autograd_on, check_logits, eval_mode, refuse_batch_statistics, select_parameters
from .task import Task, batch_size_of, differentiable, slice_inputs

# -- layer inputs and output gradients -------------------------------------------------------------


def gather_columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]``, gathered as a matrix (much faster than along the last of several dimensions)."""
    return x.reshape(-1, x.shape[-1]).index_select(1, index).view(*x.shape[:-1], len(index))


def _patch_index(shape: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...], groups: int,
                 with_weight: bool, with_bias: bool, device: torch.device) -> torch.Tensor:
    """``[T, groups, cols]``: where each entry of a convolution's input patches lies in one example's
    (padded) input ``shape`` = ``(channels, *spatial)`` flattened, with a constant 1 appended at the end
    for the bias column."""
    channels, spatial = shape[0], shape[1:]
    strides = [math.prod(spatial[i + 1 :]) for i in range(len(spatial))]
    out = [(spatial[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(len(spatial))]
    base = torch.zeros((), dtype=torch.long)  # offset of each output position's first patch entry
    within = torch.arange(channels // groups) * math.prod(spatial)  # offset of each patch entry
    for i in range(len(spatial)):
        base = base[..., None] + torch.arange(out[i]) * stride[i] * strides[i]
        within = within[..., None] + torch.arange(kernel[i]) * dilation[i] * strides[i]
    columns = [within.flatten()] if with_weight else []
    if with_bias:
        columns.append(torch.tensor([channels * math.prod(spatial)]))
    group_start = torch.arange(groups) * (channels // groups) * math.prod(spatial)
    index = base.flatten()[:, None, None] + group_start[None, :, None] + torch.cat(columns)[None, None, :]
    if with_bias:
        index[..., -1] = channels * math.prod(spatial)
    return index.to(device)


def _patches(blk: Block, x: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """The inputs ``a`` of a Linear/ConvNd layer: ``[B, T, groups, cols]``, the bias column (ones) last,
    or the columns in ``order`` if given; a convolution's are gathered from its input at once."""
    module, with_weight, with_bias = blk.module, any(n.endswith("weight") for n in blk.params), blk.params[-1].endswith("bias")
    b = x.shape[0]
    if not isinstance(module, CONV_TYPES):  # Linear, Conv1D, an attention's in-projection (3 groups)
        source = x.reshape(b, -1, 3 if isinstance(module, PackedProjection) and x.dim() == 4 else 1, x.shape[-1])
        parts = ([source] if with_weight else []) + ([source.new_ones(*source.shape[:3], 1)] if with_bias else [])
        a = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        return a if order is None else gather_columns(a, order)
    if any(module._reversed_padding_repeated_twice):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    source = x.reshape(b, -1)
    if with_bias:
        source = torch.cat([source, source.new_ones(b, 1)], 1)
    key = (tuple(x.shape[1:]), with_weight, with_bias, x.device)
    if key not in blk.patch_indices:
        blk.patch_indices[key] = _patch_index(key[0], module.kernel_size, module.stride, module.dilation, module.groups, with_weight, with_bias, x.device)
    index = blk.patch_indices[key]
    if order is not None:
        index = index[..., order]
    return source.index_select(1, index.flatten()).view(b, *index.shape)


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


def _layer_inputs(blk: Block, x: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """The input side of one call of a block, from the module's input, as :class:`LayerSignals` lays it out
    (an ``outer`` block's columns in ``order``, if given)."""
    if blk.kind == BlockKind.OUTER:
        return _patches(blk, x, order)
    if blk.kind == BlockKind.SCALE:
        return _normalised(blk.module, x)
    return x.reshape(x.shape[0], -1)  # embedding: the token ids


def _layer_grads(blk: Block, grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The gradients at one call's output, class-first ``[C, B, *output]``, as ``[C, B, T, width]`` views
    (channels-first outputs such as convolutions' stay laid out as they are: positions contiguous)."""
    module = blk.module
    c, b = grad.shape[:2]
    if isinstance(module, CONV_TYPES + BATCH_NORM_TYPES + (nn.GroupNorm,)):
        return grad.reshape(c, b, grad.shape[2], -1).transpose(2, 3)
    width = math.prod(module.normalized_shape) if isinstance(module, SCALE_TYPES) else grad.shape[-1]
    d = grad.reshape(c, b, -1, width)
    if blk.kind == BlockKind.EMBEDDING and module.padding_idx is not None:
        d = d * (inputs != module.padding_idx)[..., None]
    return d


@dataclass
class LayerSignals:
    """One block's signals for a batch of ``B`` examples and ``C`` classes (``C = 1`` for the pNTK),
    gradients class-first:

    ``outer``: ``inputs`` ``[B, T, groups, cols]`` and ``grads`` ``[C, B, T, rows]``;
    ``embedding``: ``inputs`` token ids ``[B, T]`` and ``grads`` ``[C, B, T, cols]``;
    ``scale``: ``inputs`` ``[B, T, D]`` (normalised) and ``grads`` ``[C, B, T, D]``;
    ``flat``: ``inputs`` None and ``grads`` the per-example gradients ``[C, B, cols]``.
    """

    block: Block
    inputs: torch.Tensor | None
    grads: torch.Tensor

    def matrix(self) -> torch.Tensor:
        """The per-example gradient matrices ``[B, C, rows, cols]``."""
        blk, d = self.block, self.grads
        if blk.kind == BlockKind.FLAT:
            return d.transpose(0, 1).unsqueeze(2)
        x = self.inputs
        c, b = d.shape[:2]
        if blk.kind == BlockKind.OUTER:
            return torch.einsum("cbtgo,btgi->bcgoi", d.unflatten(-1, (x.shape[2], -1)), x).reshape(b, c, blk.rows, blk.cols)
        if blk.kind == BlockKind.EMBEDDING:
            index = x[:, None, :, None].expand(-1, c, -1, blk.cols)
            return d.new_zeros(b, c, blk.rows, blk.cols).scatter_add_(2, index, d.transpose(0, 1))
        parts = [torch.einsum("cbtd,btd->bcd", d, x) if p.endswith("weight") else d.sum(2).transpose(0, 1) for p in blk.params]
        return torch.cat(parts, dim=-1).unsqueeze(2)

    def parameter_gradients(self) -> dict[str, torch.Tensor]:
        """Per-example, per-class gradients of each parameter of the block, ``[B, C, *shape]``."""
        blk = self.block
        g = self.matrix()
        b, c = g.shape[:2]
        if blk.kind == BlockKind.OUTER:  # the weight's columns, then the bias column
            with_bias = blk.params[-1].endswith("bias")
            grads = {}
            if blk.params[0].endswith("weight"):
                weight = g[..., :-1] if with_bias else g
                grads[blk.params[0]] = (weight.transpose(-1, -2) if blk.transposed else weight).reshape(b, c, *blk.shapes[0])
            if with_bias:
                grads[blk.params[-1]] = g[..., -1]
            return grads
        sizes = [math.prod(shape) for shape in blk.shapes]
        parts = g.reshape(b, c, -1).split(sizes, dim=-1)
        return {n: part.reshape(b, c, *shape) for n, part, shape in zip(blk.params, parts, blk.shapes)}


# -- what a projector of signals provides ----------------------------------------------------------


def hash_positions(blocks: list[Block]) -> list[int]:
    """The position in the layout whose hash each block uses: its own, or that of the first block holding
    the same parameters (the uses of a weight tied between modules), so that their projections add up to
    the projection of the weight's gradient."""
    first: dict[tuple, int] = {}
    return [first.setdefault(blk.params, position) for position, blk in enumerate(blocks)]


class RunningSum(Protocol):
    """The sum of blocks' projections ``[C, B, K]`` while :meth:`SignalProjector.sketch` adds blocks to it."""

    def result(self) -> torch.Tensor:
        """The finished sum ``[C, B, K]``: the tensor the sum was started on (:meth:`SignalProjector.running_sum`)."""


@runtime_checkable
class SignalProjector(Protocol):
    """What :meth:`LayerGradients.project` needs of a projector: a linear map ``R`` (``K × P``) applied to
    every block's gradient matrix from its signals (:class:`LayerSignals`), inside the backward pass.

    A block is identified by its ``position`` in the layout (:func:`hash_positions`: the uses of a tied
    weight share the position of the first, so that their projections add up) and its :class:`Block`
    (``kind``, ``rows``, ``cols``, ``groups``, ``params``); ``R`` must depend only on those and the
    projector's own options, never on the batch. Every block of every :class:`BlockKind` is given. The
    projector sees one call of a module at a time, all classes at once; per call it is asked once for
    :meth:`column_order` (``OUTER`` blocks only) and :meth:`prepare`, then :meth:`sketch` once per group
    of classes (the classes' backward passes). Its result is ``[B, C, K]``: the sum over blocks and calls.
    """

    projection_dim: int  # K

    def running_sum(self, out: torch.Tensor) -> RunningSum:
        """A sum of projections that adds into ``out`` ``[C, B, K]`` (zeros) and returns it from ``result()``."""

    def column_order(self, position: int, block: Block, device: torch.device) -> torch.Tensor | None:
        """For an ``OUTER`` block: the order of the input columns (a permutation of ``range(cols)``) in
        which :meth:`prepare` wants them, so that they are gathered in it at once; None for any order."""

    def prepare(self, position: int, block: Block, inputs: torch.Tensor | None, dtype: torch.dtype, ordered: bool = False) -> Any:
        """What :meth:`sketch` needs of a call's input side, the same for every class, from ``inputs`` laid
        out as :class:`LayerSignals` lays them out (an ``OUTER`` block's columns in :meth:`column_order`
        if ``ordered``); ``dtype``: the precision of the gradients to come."""

    def sketch(self, position: int, block: Block, inputs: torch.Tensor | None, grads: torch.Tensor, prepared: Any = None,
               into: RunningSum | None = None) -> RunningSum:
        """Add ``R`` applied to the block's gradient matrices for every class, ``[C, B, K]``, to ``into`` (a new
        sum if None) and return it; ``grads`` class-first as :class:`LayerSignals` lays them out; ``prepared``:
        :meth:`prepare`'s result for this call (``inputs`` is then None), or None to prepare ``inputs`` here.
        ``FLAT`` blocks come with ``inputs`` None and their formed gradients ``[C, B, cols]``."""


# -- one forward pass, one backward pass for all classes -------------------------------------------


@dataclass
class _Call:
    """One call of a block's module in the forward pass."""

    block: Block
    position: int
    input: torch.Tensor
    version: int  # of the input when the module ran: a later in-place change makes the signal wrong
    output_bytes: int


class _AllClasses(torch.autograd.Function):
    """``fn(layer_input, grads)`` with the classes of the gradients as a leading dimension, inside the
    backward pass vmapped over classes: the vmap rule hands all classes over at once, so that ``fn``
    batches them itself (e.g. as rows of one matrix product) instead of vmap's rules doing it. ``fn``
    works by its side effects; the output is empty."""

    generate_vmap_rule = False

    @staticmethod
    def forward(grad: torch.Tensor, layer_input: torch.Tensor, fn: Callable) -> torch.Tensor:
        fn(layer_input, grad.unsqueeze(0))
        return grad.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def vmap(info, in_dims, grad, layer_input, fn):
        fn(layer_input, grad.movedim(in_dims[0], 0))
        return grad.new_empty(info.batch_size, 0), 0


class _Tap(torch.autograd.Function):
    """The identity on a layer's output (as a copy, which later in-place operations may change), whose
    backward hands the gradient at that output to ``fn``. ``sink`` only puts the taps on the way of a
    backward pass to it (which then computes no weight gradients): ``fn`` sketches each layer's output
    gradients as the pass reaches them, which are then freed."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, layer_input: torch.Tensor, sink: torch.Tensor, fn: Callable) -> torch.Tensor:
        ctx.save_for_backward(layer_input)
        ctx.fn = fn
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (layer_input,) = ctx.saved_tensors
        ctx.fn(layer_input, grad)
        return grad, None, None, None


def _reached_around(root, outputs: dict[str, set], blocks: list[Block], params: dict[str, nn.Parameter]) -> set[str]:
    """The blocks whose parameters the autograd graph from ``root`` reaches other than through the
    block's outputs (``outputs``: the autograd nodes of each block's outputs, by name): parameters also
    used outside the module's forward (e.g. tied weights)."""
    parents: dict[Any, list] = {root: []}
    accumulators: dict[int, Any] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in parents:
                parents[child] = []
                stack.append(child)
                variable = getattr(child, "variable", None)
                if variable is not None:
                    accumulators[id(variable)] = child
            parents[child].append(node)
    around = set()
    for blk in blocks:
        stops = set().union(*(outputs.get(other.name, set()) for other in blocks if set(other.params) & set(blk.params)))
        frontier = [accumulators[id(params[n])] for n in blk.params if id(params[n]) in accumulators]
        seen = set(frontier)
        while frontier and blk.name not in around:
            node = frontier.pop()
            if node is root:
                around.add(blk.name)
            for parent in parents[node]:
                if parent not in stops and parent not in seen:
                    seen.add(parent)
                    frontier.append(parent)
    return around


class LayerGradients:
    """Records the signals of every supported layer: one forward pass with hooks, then backward passes
    for the classes (or one of the summed logits for the pNTK) for the whole batch, which compute the
    gradients at the layers' outputs only (no weight gradients).

    ``batch_classes`` runs all classes as one backward pass vmapped over them, so that the number of
    operations does not grow with the number of classes: the default on accelerators, where each
    operation costs a launch. On the CPU (default: one pass per class) vmap's batching rules cost
    more than they save, since they copy the saved activations once per class.

    ``__call__`` returns the signals (for exact kernels); :meth:`project` sketches them inside the
    backward pass, layer by layer, so that only the features outlive it. The model runs in eval mode.
    Parameters of unsupported modules are handled by :class:`~lightning_ntk.jacobian.PerExampleGradients`
    as one ``flat`` block, in chunks that fit ``memory_budget``. On the first batch, the model's structure
    is checked once (see :meth:`_check_structure`): modules whose parameters are also used outside their
    forward, or that do not see the batch in their inputs' first dimension, fall back too.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSelection = None,
        task: Task | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        batch_classes: bool | None = None,
    ):
        self.model = model
        self.task = task or Task()
        refuse_batch_statistics(model)
        self.params = select_parameters(model, params)
        self.num_parameters = sum(p.numel() for p in self.params.values())
        self.memory_budget = int(memory_budget)
        self.batch_classes = batch_classes
        self.blocks, fallback = plan_blocks(model, self.params)
        self.fallback_modules: list[str] = []
        self._fall_back(fallback, "is not supported by the structured path, or shares a weight with a module that is not or whose gradient is laid out differently")
        self._checked = False
        self._broadcast: set[str] = set()  # embeddings that see one row of ids for the whole batch
        self._vmap_backward = True  # until an operation turns out to have no batching rule
        self._vmapping = False  # whether the backward pass running is vmapped over classes

    def _fall_back(self, modules: list[str], reason: str) -> None:
        """Send ``modules`` to the generic path (with a warning that names them and says why), and with them
        the other uses of their tied weights."""
        dropped = {n for blk in self.blocks if blk.name in modules for n in blk.params}
        modules = modules + [blk.name for blk in self.blocks if blk.name not in modules and dropped & set(blk.params)]
        self.fallback_modules = self.fallback_modules + modules
        self.blocks = [blk for blk in self.blocks if blk.name not in modules]
        structured = {n for blk in self.blocks for n in blk.params}
        names = [n for n in self.params if n not in structured]
        self._fallback = PerExampleGradients(self.model, names, self.task, memory_budget=self.memory_budget) if names else None
        shapes = tuple(self.params[n].shape for n in names)
        self._flat = Block("+".join(self.fallback_modules), BlockKind.FLAT, tuple(names), 1, sum(map(math.prod, shapes)), 1, shapes) if names else None
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
        self._check_structure(inputs)
        signals = []
        if self.blocks:
            with eval_mode(self.model), _autograd_on():
                outputs: list[torch.Tensor] = []

                def keep(call: _Call, output: torch.Tensor) -> torch.Tensor:
                    outputs.append(output)
                    return output.clone()

                logits, calls = self._forward(differentiable(inputs), keep)
                grads = self._backward(logits, outputs, summed, calls)
            classes = 1 if summed else logits.shape[1]
            for blk in self.blocks:
                mine = [(call, g) for call, g in zip(calls, grads) if call.block is blk]
                if not mine:  # the layer did not run: its gradient is zero
                    signals.append(LayerSignals(blk, *self._zero_signals(blk, logits, classes)))
                    continue
                xs = [_layer_inputs(blk, call.input.detach()) for call, _ in mine]
                if blk.kind == BlockKind.OUTER:  # an attention's in-projection may have run on one input and on three
                    groups = max(x.shape[2] for x in xs)
                    xs = [x.expand(-1, -1, groups, -1) for x in xs]
                ds = [_layer_grads(blk, g, x) for (_, g), x in zip(mine, xs)]
                signals.append(LayerSignals(blk, torch.cat(xs, 1), torch.cat(ds, 2)))
        if self._fallback is not None:
            flat = self._fallback(inputs, summed)
            signals.append(LayerSignals(self._flat, None, flat.unsqueeze(0) if summed else flat.transpose(0, 1)))
        return signals

    @staticmethod
    def _zero_signals(blk: Block, logits: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and gradients of a block whose module did not run: one position of zeros."""
        b = logits.shape[0]
        if blk.kind == BlockKind.OUTER:
            return logits.new_zeros(b, 1, blk.groups, blk.cols), logits.new_zeros(classes, b, 1, blk.rows)
        if blk.kind == BlockKind.EMBEDDING:
            return torch.zeros(b, 1, dtype=torch.long, device=logits.device), logits.new_zeros(classes, b, 1, blk.cols)
        width = blk.cols // len(blk.params)
        return logits.new_zeros(b, 1, width), logits.new_zeros(classes, b, 1, width)

    def project(self, inputs: Any, projector: SignalProjector, summed: bool = False, with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, C, K]`` (``C = 1`` when ``summed``): ``projector``'s projection (:class:`SignalProjector`, e.g.
        :class:`~lightning_ntk.projection.SketchProjector`) of every example's per-class gradients, the
        structured blocks' sketched inside the backward pass, the fallback's chunk by chunk. ``with_logits``:
        also the logits ``[B, C]`` of the forward pass this takes (the model's eval-mode logits, detached),
        so that nobody runs another; None where every module fell back, so that none ran."""
        self._check_structure(inputs)
        n, features, logits = batch_size_of(inputs), None, None
        if self.blocks:
            param = next(iter(self.params.values()))
            dtype = torch.promote_types(param.dtype, torch.float32)
            sink = torch.zeros((), device=param.device, dtype=dtype, requires_grad=True)
            target: list[RunningSum] = []  # the sum of sketches of the classes being backpropagated

            def tap(call: _Call, output: torch.Tensor) -> torch.Tensor:
                prepared = []  # the input side, prepared once for all classes

                def sketch(x: torch.Tensor, grads: torch.Tensor) -> None:
                    autocast = torch.is_autocast_enabled(x.device.type)
                    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
                        if not prepared:
                            order = projector.column_order(call.position, call.block, x.device) if call.block.kind == BlockKind.OUTER else None
                            inputs = _layer_inputs(call.block, x, order)
                            prepared.append(projector.prepare(call.position, call.block, inputs, torch.promote_types(grads.dtype, torch.float32), order is not None))
                        projector.sketch(call.position, call.block, None, _layer_grads(call.block, grads, prepared[0]), prepared[0], target[0])

                def backward(x: torch.Tensor, grad: torch.Tensor) -> None:
                    if self._vmapping:
                        _AllClasses.apply(grad, x, sketch)
                    else:
                        sketch(x, grad.unsqueeze(0))

                return _Tap.apply(output, call.input.detach(), sink, backward)

            @contextlib.contextmanager
            def into(classes: slice) -> Iterator[None]:
                target[:] = [projector.running_sum(features[classes].zero_())]
                yield
                target.pop().result()

            with eval_mode(self.model), _autograd_on():
                logits, calls = self._forward(differentiable(inputs), tap)
                features = logits.new_empty(1 if summed else logits.shape[1], n, projector.projection_dim, dtype=dtype, device=param.device)
                self._backward(logits, [sink], summed, calls, into)
            features = features.transpose(0, 1)
        if self._fallback is not None:
            position = len(self.blocks)
            parts = [
                projector.sketch(position, self._flat, None, grads.unsqueeze(0) if summed else grads.transpose(0, 1)).result().transpose(0, 1)
                for _, grads in self._fallback.chunks(inputs, summed)
            ]
            flat = torch.cat(parts) if len(parts) > 1 else parts[0]
            features = flat if features is None else features + flat.to(features.dtype)
        if not with_logits:
            return features
        return features, None if logits is None else logits.detach()

    def _forward(self, inputs: Any, output_of: Callable[[_Call, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[_Call]]:
        """Run the model with a hook on every block that records each call and replaces the call's
        output by ``output_of(call, output)``; refuse inputs changed in place after a layer used them."""
        index = {id(blk.module): (position, blk) for position, blk in zip(hash_positions(self.blocks), self.blocks)}
        calls: list[_Call] = []

        batch = batch_size_of(inputs)

        def hook(module, args, output):
            position, blk = index[id(module)]
            x = args[0]
            if blk.name in self._broadcast and x.shape[0] == 1:  # one row for all examples: each its own copy
                x, output = x.expand(batch, *x.shape[1:]), output.expand(batch, *output.shape[1:])
            calls.append(_Call(blk, position, x, x._version, output.numel() * output.element_size()))
            return output_of(calls[-1], output)

        handles = [blk.module.register_forward_hook(hook) for blk in self.blocks]
        try:
            with explicit_attention(supported_attentions(self.model), self.blocks):
                logits = check_logits(self.task.forward(self.model, inputs), batch_size_of(inputs))
        finally:
            for h in handles:
                h.remove()
        for call in calls:
            if call.input._version != call.version:
                raise RuntimeError(
                    f"The input of layer '{call.block.name}' was modified in place after the layer used it, so its gradient "
                    "cannot be formed from it. Avoid in-place operations on that tensor (e.g. an inplace=True activation "
                    "applied to it afterwards), or exclude the layer with params=..."
                )
        return logits, calls

    def _backward(self, logits: torch.Tensor, targets: list[torch.Tensor], summed: bool, calls: list[_Call],
                  around: Callable[[slice], contextlib.AbstractContextManager] | None = None) -> list[torch.Tensor]:
        """The gradients of each class's logit (summed over the batch, whose examples are independent)
        with respect to ``targets``, class-first ``[C, *target.shape]``; ``around(classes)`` is entered
        around the backward pass of those classes.

        With ``batch_classes``, one backward pass vmapped over classes, for groups of classes whose
        output gradients at the largest layer fit the memory budget (a loop over classes where an
        operation has no batching rule, e.g. recurrent layers); otherwise one backward pass per class.
        """
        around = around or (lambda classes: contextlib.nullcontext())
        if summed:
            seeds = torch.ones_like(logits).unsqueeze(0)
        else:
            eye = torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
            seeds = eye[:, None, :].expand(-1, logits.shape[0], -1)

        def backward(seed: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(logits, targets, seed, retain_graph=True, materialize_grads=True)

        def loop(group: torch.Tensor, start: int) -> list[torch.Tensor]:
            grads = []
            for c, seed in enumerate(group, start):
                with around(slice(c, c + 1)):
                    grads.append(backward(seed))
            return [torch.stack(g) for g in zip(*grads)]

        batched = self.batch_classes if self.batch_classes is not None else logits.device.type != "cpu"
        if not batched or len(seeds) == 1:
            return loop(seeds, 0)
        largest = max(call.output_bytes for call in calls)
        size = max(1, self.memory_budget // largest)
        parts = []
        for start in range(0, len(seeds), size):
            group = seeds[start : start + size]
            unbatchable = False
            if self._vmap_backward:
                self._vmapping = True
                try:
                    with around(slice(start, start + len(group))):
                        parts.append(vmap(backward)(group))
                    continue
                except torch.OutOfMemoryError:
                    pass  # this group class by class, one class's gradients at a time; the next groups batched again
                except RuntimeError:
                    unbatchable = True  # an operation without a batching rule, if one class at a time runs
                finally:
                    self._vmapping = False
            parts.append(loop(group, start))
            if unbatchable:
                self._vmap_backward = False  # the backward runs class by class but not batched: for good
        return [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts)]

    def _check_structure(self, inputs: Any) -> None:
        """Once, on the first example: send to the fallback the blocks whose parameters reach the logits
        other than through the block's outputs (e.g. a weight tied to another layer), and those whose
        input or output does not hold the batch in its first dimension (seen with batches of one and two
        copies of the example); an embedding that sees one row of ids for both (e.g. position ids) is taken
        as broadcast over the batch, and its output expanded so that each example has its own copy. These
        are properties of the model's structure, so the decision holds at
        any precision (TF32, autocast, half-precision weights); exactness itself is tested in float64."""
        if self._checked or not self.blocks:
            return
        index = {id(blk.module): blk for blk in self.blocks}
        wrong_batch: set[str] = set()
        broadcast: set[str] = set()
        runs: list[Counter] = []
        with eval_mode(self.model), _autograd_on(self.params.values()):
            # the probes are made here, outside any inference mode of the caller's, whose tensors autograd cannot save
            one = differentiable(slice_inputs(inputs, 0, 1))
            two = tree_map(lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) else t, one)
            for n, sample in ((1, one), (2, two)):
                calls: Counter = Counter()
                outputs: dict[str, set] = {}  # the autograd nodes of each block's outputs

                def hook(module, args, output):
                    blk = index[id(module)]
                    calls[blk.name] += 1
                    outputs.setdefault(blk.name, set()).add(output.grad_fn)
                    if n > 1 and blk.kind == BlockKind.EMBEDDING and args[0].shape[:1] == output.shape[:1] == (1,):
                        broadcast.add(blk.name)
                    elif args[0].shape[:1] != (n,) or output.shape[:1] != (n,):
                        wrong_batch.add(blk.name)

                handles = [blk.module.register_forward_hook(hook) for blk in self.blocks]
                try:
                    with explicit_attention(supported_attentions(self.model), self.blocks):
                        logits = check_logits(self.task.forward(self.model, sample), n)
                finally:
                    for h in handles:
                        h.remove()
                runs.append(calls)
            around = _reached_around(logits.grad_fn, outputs, self.blocks, self.params) if logits.grad_fn is not None else set()
        wrong_batch |= {name for name in runs[0] | runs[1] if runs[0][name] != runs[1][name]}
        self._checked = True  # only once the probes have run: a failed check is made again, never skipped
        self._broadcast = broadcast - wrong_batch
        if wrong_batch:
            self._fall_back([blk.name for blk in self.blocks if blk.name in wrong_batch],
                            "does not hold the batch in the first dimension of its input and output")
        if around - wrong_batch:
            self._fall_back([blk.name for blk in self.blocks if blk.name in around],
                            "uses its parameters outside its own forward as well (e.g. a weight tied to another layer)")
