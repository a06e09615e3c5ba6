"""How to read model inputs and labels out of a batch, and how to call the model on them.

Every stage that touches data goes through a :class:`Task`, so that tensors, ``(x, y)`` tuples and
dict batches (e.g. tokenised text) all work without the stages knowing about them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

LABEL_KEYS = ("label", "labels", "y", "target", "targets")

Selector = Union[Callable[[Any], Any], str, int, None]


def _select(batch: Any, selector: Selector) -> Any:
    if callable(selector):
        return selector(batch)
    return batch[selector]


@dataclass
class Task:
    """Tells the engine where the inputs and labels of a batch are and how to call the model.

    ``inputs``/``labels`` may be a callable ``batch -> value``, a dict key or a tuple index. By
    default a bare tensor is all inputs, a tuple/list is ``(inputs, labels, ...)``, and a dict holds
    its labels under one of ``label(s)``, ``y`` or ``target(s)`` and its inputs under every other key.
    Dict inputs are passed to the model as keyword arguments, tuple inputs as positional ones.
    """

    inputs: Selector = None
    labels: Selector = None

    def get_inputs(self, batch: Any) -> Any:
        if self.inputs is not None:
            return _select(batch, self.inputs)
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError("Got an empty tuple as a batch; expected (inputs, labels).")
            return batch[0]
        if isinstance(batch, dict):
            return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        raise TypeError(
            f"Cannot find the model inputs in a batch of type {type(batch).__name__}. Batches may be a "
            "tensor, an (inputs, labels) tuple or a dict; for anything else pass "
            "task=Task(inputs=lambda batch: ..., labels=lambda batch: ...)."
        )

    def get_labels(self, batch: Any) -> torch.Tensor | None:
        if self.labels is not None:
            return _select(batch, self.labels)
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            return batch[1]
        if isinstance(batch, dict):
            return next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return None

    def arguments(self, inputs: Any) -> tuple[tuple, dict]:
        """The positional and keyword arguments of ``model(...)`` for a batch of inputs."""
        if isinstance(inputs, dict):
            return (), dict(inputs)
        if isinstance(inputs, (tuple, list)):
            return tuple(inputs), {}
        return (inputs,), {}

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        args, kwargs = self.arguments(inputs)
        return model(*args, **kwargs)


def batch_size_of(inputs: Any) -> int:
    """Number of examples in a batch of inputs (the leading size of its first tensor)."""
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    if not leaves:
        raise TypeError(f"The model inputs hold no tensor (got {type(inputs).__name__}).")
    return leaves[0].shape[0]


def slice_inputs(inputs: Any, start: int, stop: int) -> Any:
    return tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, inputs)


def differentiable(inputs: Any) -> Any:
    """The inputs with inference-mode tensors (e.g. batches of ``trainer.validate``) cloned: autograd
    cannot save inference tensors for a backward pass."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t, inputs)


def move_inputs(inputs: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor to ``device``; floating tensors also to ``dtype`` (token ids stay integers)."""

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

    return tree_map(move, inputs)


def iter_batches(data: Any, batch_size: int) -> Iterator[Any]:
    """Yield batches from a tensor (or dict/tuple of tensors) split along dim 0, or from any iterable
    of batches such as a ``DataLoader``."""
    if isinstance(data, (torch.Tensor, dict)):
        n = batch_size_of(data)
        for start in range(0, n, batch_size):
            yield slice_inputs(data, start, start + batch_size)
    elif isinstance(data, Iterable):
        yield from data
    else:
        raise TypeError(
            f"Expected a tensor, a dict of tensors or a DataLoader, got {type(data).__name__}."
        )


def is_raw_inputs(data: Any) -> bool:
    """Whether ``data`` is the inputs themselves rather than an iterable of batches."""
    return isinstance(data, (torch.Tensor, dict))
