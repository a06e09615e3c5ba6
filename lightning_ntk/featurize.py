"""Stream data through a network and turn each example into kernel features.

Feature kinds: projected per-class gradients ``[N, C, K]`` (proj-trNTK), projected gradients of the
summed logits ``[N, K]`` (proj-pNTK), the raw gradients themselves (exact trNTK/pNTK/eNTK, small
models only) and layer outputs ``[N, D]`` (em, ck baselines). Kernels are inner products of these
features (see :mod:`lightning_ntk.kernels`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from .config import ProjectionConfig, SubsetConfig
from .jacobian import DEFAULT_MEMORY_BUDGET, NonFiniteGradientError, ParamSelection, PerExampleGradients, all_finite, check_logits, eval_mode, non_finite_raises, state_fingerprint
from .layers import CONV_TYPES, LayerGradients, SignalProjector
from .projection import RandomProjector, SketchProjector, bfloat16_products
from .registry import get_kernel, names, projected
from .task import Task, batch_size_of, is_raw_inputs, iter_batches, move_inputs, slice_inputs


@dataclass(frozen=True)
class FeatureSpec:
    """What a set of features was computed from. Kernels may only combine features with equal specs."""

    kind: str
    projection_dim: int | None
    projector: str | None
    seed: int | None
    num_parameters: int
    parameters: str  # fingerprint of the selected parameters' names, shapes and values, and of the model's buffers
    product_precision: str | None = None  # "bfloat16": the sketch's large products were; None: as the signals

    def to_dict(self) -> dict:
        return asdict(self)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters of glibc's malloc.h
_MMAP_CEILING = 32 << 20  # the largest mmap threshold glibc's adaptive rule sets on 64-bit systems
_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")  # a user's own choice


class _HeapScope:
    """The open :func:`retained_heap` scopes of the process, over all threads: the thresholds change when
    the first opens and are put back when the last closes, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0


_heap_scope = _HeapScope()


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (whose malloc :func:`retained_heap` tunes), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc's own functions)
    except (OSError, AttributeError):
        return None
    return libc


def _malloc_chosen_by_user() -> bool:
    """Whether the environment set glibc's malloc thresholds, which :func:`retained_heap` then leaves alone."""
    return any(name in os.environ for name in _MALLOC_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


@contextlib.contextmanager
def retained_heap(device: torch.device) -> Iterator[None]:
    """Keep freed memory in the process while featurizing on the CPU under glibc.

    glibc hands freed blocks of a few MB back to the operating system whenever the top of its heap
    holds more than its trim threshold, so every batch's C backward passes may fault the same pages in
    again (seen: 30,000–130,000 page faults and 10–20% of the time for 1,500 digits, in some processes
    and not others). Meanwhile nothing is handed back; when the last scope of the process closes (any
    thread's, an exception's too), the free memory is handed back (``malloc_trim``) and the trim
    threshold goes back to where glibc's adaptive rule itself ends (mmap above 32 MiB, trim above
    64 MiB): glibc can neither report its thresholds nor be told to adapt again. Thresholds set in the
    environment (``MALLOC_*_``, ``GLIBC_TUNABLES``) are the user's and are never changed."""
    libc = _glibc() if device.type == "cpu" and not _malloc_chosen_by_user() else None
    if libc is None:
        yield
        return
    with _heap_scope.lock:
        _heap_scope.open += 1
        if _heap_scope.open == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest it takes
    try:
        yield
    finally:
        with _heap_scope.lock:
            _heap_scope.open -= 1
            if _heap_scope.open == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_CEILING)
                libc.malloc_trim(0)


def stream_batches(
    model: nn.Module,
    data: Any,
    featurize_batch: Callable[[Any], Any],
    task: Task | None = None,
    batch_size: int = SubsetConfig.batch_size,
    progress: bool | str = False,
) -> Iterator[Any]:
    """Yield ``featurize_batch`` of the model inputs of every non-empty batch of ``data``, moved to the
    model's device. ``data`` is a tensor/dict of inputs or an iterable of batches."""
    task = task or Task()
    raw = is_raw_inputs(data)
    device, dtype = model_device_dtype(model)
    batches = iter_batches(data, batch_size)
    if progress:
        total = None
        if raw:
            total = -(-batch_size_of(data) // batch_size)
        elif hasattr(data, "__len__"):
            total = len(data)
        batches = tqdm(batches, total=total, desc=progress if isinstance(progress, str) else "featurizing", leave=False)
    empty = True
    with retained_heap(device):
        for batch in batches:
            inputs = batch if raw else task.get_inputs(batch)
            if batch_size_of(inputs) == 0:
                continue
            empty = False
            yield featurize_batch(move_inputs(inputs, device, dtype))
    if empty:
        raise ValueError("The data holds no examples: pass a non-empty tensor or DataLoader.")


def stream_features(
    model: nn.Module,
    data: Any,
    featurize_batch: Callable[[Any], torch.Tensor | tuple[torch.Tensor, ...]],
    task: Task | None = None,
    batch_size: int = SubsetConfig.batch_size,
    progress: bool | str = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Apply ``featurize_batch`` to the model inputs of every batch of ``data`` and concatenate the
    results on the CPU, detached from the network's autograd graph (a tuple of them where it returns
    tuples). ``data`` is a tensor/dict of inputs or an iterable of batches."""
    outs = [
        tuple(t.detach().cpu() for t in out) if isinstance(out, tuple) else out.detach().cpu()
        for out in stream_batches(model, data, featurize_batch, task, batch_size, progress)
    ]
    return tuple(map(torch.cat, zip(*outs))) if isinstance(outs[0], tuple) else torch.cat(outs)


class Featurizer:
    """Projected NTK features of a model: ``[N, C, K]`` for ``kind="proj_trntk"``, ``[N, K]`` for
    ``"proj_pntk"`` (a gradient kernel's name, e.g. ``"trntk"``, stands for its projection).

    ``projector="sketch"`` is the fast path: per-layer signals (:class:`~lightning_ntk.layers.LayerGradients`)
    projected by a structured count-sketch (:class:`~lightning_ntk.projection.SketchProjector`) inside
    one backward pass vmapped over classes, without forming per-example gradients; its memory is a few
    times the activations of a batch, whatever K·P. ``"rademacher"``/``"gaussian"`` are the paper's
    dense projections of materialised gradients, the reference for kernel quality.

    ``memory_budget`` (bytes) bounds the largest buffer of per-example gradients wherever they are
    formed (the dense projectors, and modules the sketch cannot structure), which are then computed and
    projected in chunks of examples; the dense projection matrix ``R`` (``K·P`` floats) is kept between
    batches when it fits too. ``chunk_size`` fixes the examples per chunk instead.

    ``product_precision`` is the sketch's (see :class:`~lightning_ntk.projection.SketchProjector`).
    ``dtype`` stores the features in another precision (``torch.float16``/``torch.bfloat16`` halve
    their memory; kernels still accumulate in float32).
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "trntk",
        projection_dim: int = ProjectionConfig.dim,
        projector: str = ProjectionConfig.projector,
        seed: int = ProjectionConfig.seed,
        params: ParamSelection = None,
        task: Task | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        chunk_size: int | None = None,
        dtype: torch.dtype | None = None,
        product_precision: str = ProjectionConfig.product_precision,
    ):
        self.kernel = projected(kind)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype such as torch.float16 or torch.bfloat16, got {dtype!r}.")
        self.model = model
        self.task = task or Task()
        if projector == "sketch":
            self.gradients = LayerGradients(model, params, self.task, memory_budget)
            self.projector = SketchProjector(projection_dim, seed, product_precision=product_precision)
        else:
            self.gradients = PerExampleGradients(model, params, self.task, chunk_size, memory_budget)
            self.projector = RandomProjector(self.gradients.num_parameters, projection_dim, projector, seed, memory_budget)
        self.memory_budget = memory_budget
        self.chunk_size = chunk_size
        self.dtype = dtype

    @property
    def summed(self) -> bool:
        return self.kernel.summed

    def spec(self) -> FeatureSpec:
        device, dtype = model_device_dtype(self.model)
        # a projector without a choice of product precision multiplies in the signals' own
        bfloat16 = bfloat16_products(getattr(self.projector, "product_precision", "float32"), dtype, device)
        return FeatureSpec(
            kind=self.kernel.family,
            projection_dim=self.projector.projection_dim,
            projector=self.projector.kind,
            seed=self.projector.seed,
            num_parameters=self.gradients.num_parameters,
            parameters=state_fingerprint(self.model, self.gradients.params),
            product_precision="bfloat16" if bfloat16 else None,
        )

    def featurize_batch(self, inputs: Any, with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The batch's features; ``with_logits``: and the model's eval-mode logits ``[B, C]``, which the
        sketch takes from its own forward pass (the dense projections, and a sketch whose modules all
        fell back, run one more)."""
        if isinstance(self.projector, SignalProjector):  # it projects layer signals inside the backward pass
            features, logits = self._sketch(inputs)
        else:
            features = torch.cat([self.projector.project(grads) for _, grads in self.gradients.chunks(inputs, self.summed)])
            logits = None
        features = features if self.dtype is None else features.to(self.dtype)
        if not with_logits:
            return features
        if logits is None:
            with torch.no_grad(), eval_mode(self.model):
                logits = check_logits(self.task.forward(self.model, inputs), batch_size_of(inputs))
        return features, logits

    def _sketch(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = batch_size_of(inputs)
        step = self.chunk_size or n
        parts = [self.gradients.project(slice_inputs(inputs, s, s + step), self.projector, self.summed, with_logits=True) for s in range(0, n, step)]
        features = torch.cat([f for f, _ in parts]) if len(parts) > 1 else parts[0][0]
        logits = None if parts[0][1] is None else torch.cat([l for _, l in parts])
        if non_finite_raises() and not all_finite(features):  # name the culprit (only on this rare path)
            for sig in self.gradients(inputs, self.summed):
                for name, g in sig.parameter_gradients().items():
                    if not all_finite(g):
                        raise NonFiniteGradientError.of(name)
            raise NonFiniteGradientError("The projected features hold NaN or inf: check the inputs for NaN/inf.")
        return (features[:, 0] if self.summed else features), logits

    def __call__(self, data: Any, batch_size: int = SubsetConfig.batch_size, progress: bool | str = False, with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Features of ``data`` on the CPU (and its logits, ``with_logits``)."""
        featurize_batch = functools.partial(self.featurize_batch, with_logits=with_logits)
        return stream_features(self.model, data, featurize_batch, self.task, batch_size, progress)


def project_features(
    model: nn.Module,
    data: Any,
    kind: str = "trntk",
    projection_dim: int = ProjectionConfig.dim,
    projector: str = ProjectionConfig.projector,
    seed: int = ProjectionConfig.seed,
    *,
    params: ParamSelection = None,
    task: Task | None = None,
    batch_size: int = SubsetConfig.batch_size,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool | str = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Random-projection NTK features: ``[N, C, K]`` for ``kind="proj_trntk"`` (or ``"trntk"``), ``[N, K]``
    for ``"proj_pntk"`` (or ``"pntk"``). ``data`` is a tensor of inputs or a DataLoader of batches.

    ``projector="sketch"`` is the fast structured path; ``"rademacher"``/``"gaussian"`` the dense
    reference. Kernels follow with :func:`lightning_ntk.kernel_from_features`. See :class:`Featurizer`.
    """
    featurizer = Featurizer(model, kind, projection_dim, projector, seed, params, task, memory_budget, dtype=dtype)
    return featurizer(data, batch_size=batch_size, progress=progress)


def gradient_features(
    model: nn.Module,
    data: Any,
    kind: str = "trntk",
    *,
    params: ParamSelection = None,
    task: Task | None = None,
    batch_size: int = SubsetConfig.batch_size,
) -> torch.Tensor:
    """Exact (unprojected) gradients: ``[N, C, P]`` for trntk/trntk0/entk, ``[N, P]`` for pntk."""
    kernel = get_kernel(kind)
    if not kernel.from_gradients or kernel.projected:
        raise ValueError(f"gradient_features computes the exact gradient kernels {names(from_gradients=True, projected=False)}, not {kernel.name!r}.")
    gradients = PerExampleGradients(model, params, task)

    def featurize_batch(inputs):
        gradients.num_classes(inputs)  # refuses non-logit outputs with a clear message
        return gradients(inputs, summed=kernel.summed)

    return stream_features(model, data, featurize_batch, task, batch_size)


def _last_linear(model: nn.Module, inputs: Any, task: Task) -> nn.Module:
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, a, o: order.append(mod)) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            task.forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("The ck kernel needs a final nn.Linear layer, and the model ran none; use kind='em' with layers=[...].")
    return order[-1]


def embedding_features(
    model: nn.Module,
    data: Any,
    kind: str = "em",
    layers: Sequence[str] | None = None,
    *,
    task: Task | None = None,
    batch_size: int = SubsetConfig.batch_size,
) -> torch.Tensor:
    """Layer-output features ``[N, D]`` for the embedding baselines.

    ``em``: the outputs of ``layers`` (module names; default every Linear/Conv layer but the last
    linear one), each flattened per example and concatenated, so that ``<h(x), h(x')>`` sums over layers.
    ``ck``: the input of the final linear layer (the penultimate representation).
    Outputs laid out ``[B, T, ...]`` over token positions have their padded positions (the task's
    ``mask``, e.g. ``attention_mask``) zeroed, so that padding contributes nothing.
    """
    kind = get_kernel(kind).family
    if kind not in ("em", "ck"):
        raise ValueError(f"embedding_features computes the kernels em and ck, not {kind!r}.")
    task = task or Task()
    modules = dict(model.named_modules())
    unknown = [n for n in (layers or []) if n not in modules]
    if unknown:
        raise ValueError(f"Unknown layer names {unknown}; choose among {[n for n in modules if n][:12]}.")

    def hooked_modules(inputs) -> list[nn.Module]:
        if kind == "ck":
            return [_last_linear(model, inputs, task)]
        if layers is not None:
            return [modules[n] for n in layers]
        last = _last_linear(model, inputs, task)
        return [m for m in model.modules() if isinstance(m, (nn.Linear, *CONV_TYPES)) and m is not last]

    targets: list[nn.Module] = []  # fixed by the model: found on the first batch, whose forward pass that costs
    batch_dims: list[int] = []  # per call of a hooked module, in call order: the dimension of its tensor that holds the batch
    widths: list[int] = []  # features per example, fixed by the first batch

    def capture(inputs) -> list[tuple[nn.Module, torch.Tensor]]:
        """The hooked modules' outputs (``ck``: inputs), in call order, from one forward pass."""
        captured: list[tuple[nn.Module, torch.Tensor]] = []
        if kind == "ck":
            hook = lambda mod, args, out: captured.append((mod, args[0]))  # noqa: E731
        else:
            hook = lambda mod, args, out: captured.append((mod, out))  # noqa: E731
        handles = [m.register_forward_hook(hook) for m in targets]
        try:
            check_logits(task.forward(model, inputs), batch_size_of(inputs))
        finally:
            for h in handles:
                h.remove()
        if not captured:
            raise ValueError("None of the chosen layers ran in the forward pass; check layers=[...].")
        return captured

    def featurize_batch(inputs):
        with eval_mode(model), torch.no_grad():
            if not targets:
                targets.extend(hooked_modules(inputs))
                batch_dims.extend(_batch_dims(capture, inputs, {m: n for n, m in modules.items()}, "input" if kind == "ck" else "output"))
            captured = capture(inputs)
        if len(captured) != len(batch_dims):
            raise ValueError(
                f"The chosen layers ran {len(captured)} times on this batch and {len(batch_dims)} times on one example: "
                "choose layers=[...] that run once per forward pass whatever the batch."
            )
        # sequence-first layers ([T, B, ...]) are laid out batch-first, as the mask of padded positions is
        hidden = [h.movedim(dim, 0) for (_, h), dim in zip(captured, batch_dims)]
        features = torch.cat([task.mask_positions(h, inputs).reshape(h.shape[0], -1) for h in hidden], dim=1)
        if not widths:
            widths.append(features.shape[1])
        elif features.shape[1] != widths[0]:
            raise ValueError(
                f"This batch has {features.shape[1]} {kind} features per example, the first one {widths[0]}: outputs over token "
                "positions depend on the padded length. Pad every batch to the same length, or choose layers=[...] with one "
                "output vector per example."
            )
        return features

    return stream_features(model, data, featurize_batch, task, batch_size)


def _batch_dims(capture: Callable[[Any], list[tuple[nn.Module, torch.Tensor]]], inputs: Any, names: dict[nn.Module, str], what: str) -> list[int]:
    """For each tensor ``capture`` records, the dimension that holds the batch: the one that grows from 1 to 2
    when the first example is passed alone and twice (``[T, B, E]`` for sequence-first layers, such as
    ``nn.TransformerEncoderLayer(batch_first=False)``), found from the structure, not from values."""
    one = slice_inputs(inputs, 0, 1)
    two = tree_map(lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) else t, one)
    single, double = capture(one), capture(two)
    if [m for m, _ in single] != [m for m, _ in double]:
        raise ValueError("The chosen layers run a different number of times for one example and for two: choose layers=[...] "
                         "that run once per forward pass whatever the batch.")
    dims = []
    for (module, a), (_, b) in zip(single, double):
        grown = [d for d in range(a.ndim) if a.ndim == b.ndim and a.shape[d] != b.shape[d]]
        if len(grown) != 1 or (a.shape[grown[0]], b.shape[grown[0]]) != (1, 2):
            raise ValueError(
                f"The {what} of layer '{names.get(module, type(module).__name__)}' "
                f"({tuple(a.shape)} for one example, {tuple(b.shape)} for two) does not hold the batch in one dimension, so its "
                "rows cannot be told apart by example: choose other layers=[...]."
            )
        dims.append(grown[0])
    return dims
