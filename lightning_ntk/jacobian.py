"""Per-example, per-class gradients ``g_c(x) = ∂f_c(x)/∂θ`` of a classifier, with ``torch.func``.

This is the generic path: it works for any module that ``torch.func.functional_call`` can run, and it
materialises ``[b, C, P]`` gradients for chunks of ``b`` examples sized to a memory budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import hashlib
import warnings
from typing import Any, Iterable, Iterator, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import LogitsError, LogitsShapeError, LogitsTypeError
from .task import Task, batch_size_of, differentiable, slice_inputs

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes: the largest buffer a featurization step may allocate

ParamSelection = Union[None, str, nn.Module, Sequence[Union[str, nn.Module]]]


class FunctionalForwardError(RuntimeError):
    """The model's forward pass cannot run under ``torch.func`` transforms."""


def all_finite(values: torch.Tensor) -> bool:
    """Whether ``values`` holds no NaN or inf, read in one pass without a mask of its size (NaN and inf
    reach the extrema)."""
    return values.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(values))).all())


class NonFiniteGradientError(FloatingPointError):
    """A per-example gradient holds NaN or inf."""

    @classmethod
    def of(cls, name: str) -> "NonFiniteGradientError":
        return cls(
            f"The per-example gradient of parameter '{name}' holds NaN or inf. Check the inputs for "
            "NaN/inf, lower the learning rate if training diverged, or exclude the parameter with params=..."
        )


_non_finite_kept = contextvars.ContextVar("non_finite_kept", default=False)


@contextlib.contextmanager
def non_finite_rows_kept() -> Iterator[None]:
    """Meanwhile, an example whose gradient holds NaN or inf keeps them in its rows of gradients and features
    instead of raising :class:`NonFiniteGradientError`: the caller leaves such examples out. Examples are
    independent in eval mode, so the other rows are as without it."""
    token = _non_finite_kept.set(True)
    try:
        yield
    finally:
        _non_finite_kept.reset(token)


def non_finite_raises() -> bool:
    """Whether NaN or inf in a per-example gradient raises (outside :func:`non_finite_rows_kept`)."""
    return not _non_finite_kept.get()


def select_parameters(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """The parameters whose gradients define the kernel, by name.

    ``params`` may be ``None`` (every parameter with ``requires_grad``), a glob pattern or exact name
    (``"fc2.*"``, ``"classifier"`` matches the module ``classifier`` and everything under it), a
    submodule of ``model``, or a list of these.
    """
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
        if not selected:
            raise ValueError("The model has no parameter with requires_grad=True; pass params=... to choose some.")
        return selected
    items = [params] if isinstance(params, (str, nn.Module)) else list(params)
    module_names = {id(m): n for n, m in model.named_modules()}
    wanted: dict[str, nn.Parameter] = {}
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in module_names:
                raise ValueError(f"The module {type(item).__name__} passed in params is not part of the model.")
            prefix = module_names[id(item)]
            hits = {f"{prefix}.{n}" if prefix else n: p for n, p in item.named_parameters()}
        else:
            hits = {
                n: p
                for n, p in named.items()
                if fnmatch.fnmatchcase(n, item) or n.startswith(item + ".")
            }
        if not hits:
            sample = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
            raise ValueError(
                f"The parameter selection {item!r} matches no parameter of the model. "
                f"Parameter names look like: {sample}. Use a glob such as 'fc.*' or a submodule."
            )
        wanted.update(hits)
    # Keep the model's own order, so that the flattened layout does not depend on how params were listed.
    return {n: p for n, p in named.items() if n in wanted}


def parameter_fingerprint(params: dict[str, torch.Tensor]) -> str:
    """A short hash of the selected parameters' names, shapes and values: two featurisations with the
    same fingerprint describe the same network state."""
    h = hashlib.sha256()
    for name, p in params.items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def state_fingerprint(model: nn.Module, params: dict[str, torch.Tensor]) -> str:
    """The fingerprint of the selected parameters and of every buffer of the model: eval-mode outputs, and
    with them gradients, depend on buffers such as BatchNorm's running statistics, which a forward pass in
    train mode moves without a parameter changing. BatchNorm's ``num_batches_tracked`` is left out: a count of
    training steps that no eval-mode output reads."""
    buffers = {f"buffer {name}": b for name, b in model.named_buffers() if not name.endswith("num_batches_tracked")}
    return parameter_fingerprint({**params, **buffers})


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (BatchNorm uses running stats, Dropout is off) and restore each
    submodule's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


@contextlib.contextmanager
def _autograd_on(params: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Gradients recorded whatever the caller's mode (``no_grad``, ``inference_mode``), and ``params``
    requiring them meanwhile."""
    frozen = [p for p in params if not p.requires_grad]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in frozen:
                p.requires_grad_(True)
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _locate_failure(model: nn.Module, run) -> tuple[str, str]:
    """Re-run ``run`` with hooks that track which module is executing: where it fails, in words, and
    what the user can do about it."""
    stack: list[nn.Module] = []
    names = {m: n for n, m in model.named_modules()}

    def leave(mod, args, out) -> None:  # returns None: a hook's return value would replace the module's output
        stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args: stack.append(mod)))
        handles.append(m.register_forward_hook(leave))
    try:
        run()
    except Exception:
        if stack:
            module = stack[-1]
            return f"module '{names[module] or '<model>'}' ({type(module).__name__})", "exclude that module's parameters, and those before it, with params=..."
    finally:
        for h in handles:
            h.remove()
    return "the model's forward", "avoid data-dependent Python control flow on tensors there, or restrict the kernel with params=..."


def refuse_batch_statistics(model: nn.Module) -> None:
    """Refuse a model with a BatchNorm layer that keeps no running statistics, whatever the path: it
    normalises with the batch's statistics even in eval mode, so no example has a gradient of its own."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (not module.track_running_stats or module.running_mean is None):
            raise FunctionalForwardError(
                f"Per-example gradients do not exist for this model: module '{name or '<model>'}' ({type(module).__name__}) normalises "
                "with the statistics of the batch even in eval mode, so no example has a gradient of its own. Keep running "
                "statistics (track_running_stats=True), or use LayerNorm/GroupNorm."
            )


def check_logits(output: Any, batch_size: int) -> torch.Tensor:
    """Refuse anything but a ``[B, C]`` floating tensor of logits."""
    if not isinstance(output, torch.Tensor):
        raise LogitsTypeError(
            f"The model's logits are a {type(output).__name__}, not a tensor. Tell the engine where the [batch, classes] "
            "logits are in the model's output with task=Task(output=<key, attribute, index or callable>)."
        )
    if output.ndim != 2 or output.shape[0] != batch_size or not output.is_floating_point():
        raise LogitsShapeError(
            f"The model must return classification logits of shape [batch, classes] = [{batch_size}, C] "
            f"(a single column for a binary classifier), but returned {tuple(output.shape)} ({output.dtype}). "
            "Reshape the output in forward, or wrap the model, so that it returns [B, C] logits before any softmax."
        )
    return output


class _LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor that any operation creates."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


class PerExampleGradients:
    """Computes ``[B, C, P]`` per-example, per-class gradients (or ``[B, P]`` gradients of the summed
    logits, for the pNTK) of the selected parameters, in chunks of examples.

    The model is run in eval mode with its buffers frozen; parameters outside the selection are
    treated as constants. ``P`` is the total size of the selected parameters, in their model order.
    :meth:`chunks` keeps every buffer within ``memory_budget`` bytes (see :meth:`chunk_length`), so
    that a consumer which projects each chunk never holds a whole batch's gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSelection = None,
        task: Task | None = None,
        chunk_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.model = model
        self.task = task or Task()
        refuse_batch_statistics(model)
        self.params = select_parameters(model, params)
        self.num_parameters = sum(p.numel() for p in self.params.values())
        self.chunk_size = chunk_size
        self.memory_budget = int(memory_budget)
        self._profiles: dict[tuple, tuple[int, int]] = {}
        self._loop = False  # whether torch.func failed on this model, so that gradients come from a loop
        self._cause = ""

    def _profile(self, inputs: Any) -> tuple[int, int]:
        """The number of logits, and the bytes of the largest tensor the forward pass of one example
        creates, for inputs shaped like these (measured once per shape)."""
        one = slice_inputs(inputs, 0, 1)
        key = tuple((tuple(t.shape[1:]), t.dtype) for t in tree_flatten(one)[0] if isinstance(t, torch.Tensor))
        if key not in self._profiles:
            with torch.no_grad(), eval_mode(self.model), _LargestTensor() as largest:
                try:
                    out = self.task.forward(self.model, one)
                except Exception as err:
                    where, fix = _locate_failure(self.model, lambda: self.task.forward(self.model, one))
                    raise FunctionalForwardError(
                        f"The model cannot run on one example alone, as per-example gradients need: it fails in {where}: "
                        f"{type(err).__name__}: {err}. To fix it, {fix}."
                    ) from err
            self._profiles[key] = (check_logits(out, 1).shape[1], largest.bytes)
        return self._profiles[key]

    def chunk_length(self, inputs: Any, summed: bool = False) -> int:
        """Examples per vmap call (``chunk_size`` if set): as many as keep the largest buffer within
        ``memory_budget``, and at least one. Per example and output, that buffer is the larger of the
        gradient (``P`` values) and the largest tensor of the forward pass (vmap's backward holds it once
        per output); large chunks are faster, since each call has a fixed cost."""
        if self.chunk_size is not None:
            return max(1, int(self.chunk_size))
        classes, largest = self._profile(inputs)
        itemsize = next(iter(self.params.values())).element_size()
        per_example = (1 if summed else classes) * max(self.num_parameters * itemsize, largest)
        return max(1, self.memory_budget // per_example)

    def _logits_fn(self, summed: bool):
        buffers = dict(self.model.named_buffers())

        def logits(params: dict[str, torch.Tensor], single_input: Any) -> torch.Tensor:
            batched = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, single_input)
            args, kwargs = self.task.arguments(batched)
            out = self.task.logits(functional_call(self.model, (params, buffers), args=args, kwargs=kwargs)).squeeze(0)
            return out.sum() if summed else out

        return logits

    def num_classes(self, inputs: Any) -> int:
        """Check the model's output on a batch and return its number of logits."""
        return self._profile(inputs)[0]

    def __call__(self, inputs: Any, summed: bool = False) -> torch.Tensor:
        """Gradients for one batch of inputs, flattened over parameters: ``[B, C, P]`` (``[B, P]`` when
        ``summed``)."""
        return torch.cat([grads for _, grads in self.chunks(inputs, summed)])

    def chunks(self, inputs: Any, summed: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(rows, gradients)`` for consecutive chunks of the batch, ``gradients`` as in
        :meth:`__call__` for the examples ``rows``, :meth:`chunk_length` examples at a time.

        Where ``torch.func`` cannot run the model (e.g. recurrent layers, custom autograd Functions,
        data-dependent control flow), the gradients come from a loop of ``torch.autograd.grad`` calls,
        one forward pass per example, with one warning that names the module and the cause."""
        n = batch_size_of(inputs)
        step = self.chunk_length(inputs, summed)
        for start in range(0, n, step):
            chunk = slice_inputs(inputs, start, start + step)
            grads = None if self._loop else self._vmapped(chunk, summed)
            if grads is None:
                grads = self._looped(chunk, summed)
            yield slice(start, min(start + step, n)), self._flatten(grads, summed)

    def _vmapped(self, chunk: Any, summed: bool) -> dict[str, torch.Tensor] | None:
        """The chunk's gradients by ``torch.func``; None (after a warning, once) where it cannot run the model."""
        params = {k: v.detach() for k, v in self.params.items()}
        fn = self._logits_fn(summed)
        transform = vmap(grad(fn) if summed else jacrev(fn), in_dims=(None, 0))
        with eval_mode(self.model), torch.no_grad():  # no graph through the parameters left out
            try:
                return transform(params, chunk)
            except LogitsError:
                raise
            except Exception as err:
                where, _ = _locate_failure(self.model, lambda: transform(params, slice_inputs(chunk, 0, 1)))
                self._cause = f"torch.func (vmap/jacrev) cannot run {where}: {type(err).__name__}: {err}"
        self._loop = True
        warnings.warn(f"{self._cause}. Per-example gradients use a loop of torch.autograd.grad calls instead (slower).", stacklevel=4)
        return None

    def _looped(self, chunk: Any, summed: bool) -> dict[str, torch.Tensor]:
        """The chunk's gradients one example at a time: a forward pass, then one ``torch.autograd.grad``
        call per class (one for the summed logits)."""
        names, params = list(self.params), list(self.params.values())
        rows = []
        with eval_mode(self.model), _autograd_on(params):
            for i in range(batch_size_of(chunk)):
                example = differentiable(slice_inputs(chunk, i, i + 1))
                try:
                    logits = check_logits(self.task.forward(self.model, example), 1)[0]
                    outputs = [logits.sum()] if summed else list(logits)
                    per_class = [torch.autograd.grad(out, params, retain_graph=True, allow_unused=True, materialize_grads=True) for out in outputs]
                except LogitsError:
                    raise
                except Exception as err:
                    where, fix = _locate_failure(self.model, lambda: self.task.forward(self.model, example))
                    raise FunctionalForwardError(
                        f"Per-example gradients cannot be computed: {self._cause}; and one example alone fails in {where} "
                        f"too: {type(err).__name__}: {err}. To fix it, {fix}."
                    ) from err
                rows.append([torch.stack(g) for g in zip(*per_class)])
        grads = {name: torch.stack([row[j] for row in rows]) for j, name in enumerate(names)}
        return {name: g[:, 0] if summed else g for name, g in grads.items()}

    def _flatten(self, grads: dict[str, torch.Tensor], summed: bool) -> torch.Tensor:
        lead = 1 if summed else 2
        flat = []
        for name, g in grads.items():
            if non_finite_raises() and not all_finite(g):
                raise NonFiniteGradientError.of(name)
            flat.append(g.reshape(*g.shape[:lead], -1))
        return torch.cat(flat, dim=-1)
