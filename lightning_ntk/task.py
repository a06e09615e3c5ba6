"""How to read model inputs and labels out of a batch, and how to call the model on them.

Every stage that touches data goes through a :class:`Task`, so that tensors, ``(x, y)`` tuples and
dict batches (e.g. tokenised text) all work without the stages knowing about them, and so that models
returning a dict, a dataclass or a Hugging Face ``ModelOutput`` need no wrapper to be explained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import LogitsTypeError

LABEL_KEYS = ("label", "labels", "y", "target", "targets")

Selector = Union[Callable[[Any], Any], str, int, None]
OutputSelector = Union[Callable[[Any], Any], str, int]


def _select(batch: Any, selector: Selector) -> Any:
    if callable(selector):
        return selector(batch)
    return batch[selector]


@dataclass
class Task:
    """Tells the engine where the inputs and labels of a batch are, how to call the model and where
    its logits are in what it returns.

    ``inputs``/``labels`` may be a callable ``batch -> value``, a dict key or a tuple index. By
    default a bare tensor is all inputs, a tuple/list is ``(inputs, labels, ...)``, and a dict holds
    its labels under one of ``label(s)``, ``y`` or ``target(s)`` and its inputs under every other key.
    Dict inputs are passed to the model as keyword arguments, tuple inputs as positional ones, e.g.
    ``Task(inputs=lambda batch: (batch["input_ids"], batch["attention_mask"]))`` for ``model(ids, mask)``.

    ``output``: where the logits are in what the model returns when it is not a tensor: a key of a
    dict or ``ModelOutput``, an attribute of a dataclass (default ``"logits"``, as Hugging Face
    models return), an index of a tuple, or a callable ``returned -> logits`` (applied to tensors too).
    ``mask``: the key of dict inputs that marks real (1) and padded (0) positions of token sequences;
    padded positions contribute nothing to layer-output features. ``decode``: turns one example's
    token ids (padding removed) into text for the attribution tables, e.g. a tokenizer's ``decode``.
    """

    inputs: Selector = None
    labels: Selector = None
    output: OutputSelector = "logits"
    mask: str | None = "attention_mask"
    decode: Callable[[Sequence[int]], str] | None = None

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

    def describe(self, inputs: Any) -> str:
        """How the model is called on a batch of inputs, in words, for error messages."""
        if isinstance(inputs, Mapping):
            return f"keyword arguments {list(inputs)}"
        if isinstance(inputs, (tuple, list)):
            return f"{len(inputs)} positional arguments"
        return f"one {type(inputs).__name__}" + (f" of shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else "")

    def logits(self, output: Any) -> Any:
        """The logits in what the model returned: ``output(returned)`` for a callable ``output``, else a
        tensor as it is, else the entry ``output`` names; a missing entry is refused with the fix named."""
        if callable(self.output):
            return self.output(output)
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping):  # dicts and ModelOutput (whose keys are its fields that are set)
            if self.output in output:
                return output[self.output]
            raise _missing_logits(output, f"a {type(output).__name__} with keys {list(output)}", self.output)
        if isinstance(output, (tuple, list)):
            if isinstance(self.output, int) and -len(output) <= self.output < len(output):
                return output[self.output]
            raise _missing_logits(output, f"a {type(output).__name__} of {len(output)} values", self.output)
        if isinstance(self.output, str) and hasattr(output, self.output):
            return getattr(output, self.output)
        fields = [f.name for f in dataclasses.fields(output)] if dataclasses.is_dataclass(output) else None
        raise _missing_logits(output, f"a {type(output).__name__}" + (f" with fields {fields}" if fields else ""), self.output)

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The model's logits on a batch of inputs."""
        args, kwargs = self.arguments(inputs)
        return self.logits(model(*args, **kwargs))

    def position_mask(self, inputs: Any) -> torch.Tensor | None:
        """The ``[B, T]`` (or, for one example, ``[T]``) mask of real positions in dict inputs, if any."""
        if self.mask is None or not isinstance(inputs, Mapping) or self.mask not in inputs:
            return None
        return inputs[self.mask]

    def mask_positions(self, hidden: torch.Tensor, inputs: Any) -> torch.Tensor:
        """``hidden`` with its padded positions zeroed when it is laid out ``[B, T, ...]`` like the
        inputs' mask, so that they contribute nothing to inner products; otherwise as it is."""
        mask = self.position_mask(inputs)
        if mask is None or hidden.ndim < 3 or hidden.shape[:2] != mask.shape:
            return hidden
        return hidden * (mask != 0).reshape(*mask.shape, *(1,) * (hidden.ndim - 2)).to(hidden.dtype)

    def text(self, example: Any) -> str | None:
        """One example's inputs as text through ``decode``: its ``input_ids`` (or the tensor itself)
        at the real positions; None without ``decode``."""
        if self.decode is None:
            return None
        ids = example.get("input_ids") if isinstance(example, Mapping) else example
        if not isinstance(ids, torch.Tensor):
            return None
        mask = self.position_mask(example)
        if mask is not None and mask.shape == ids.shape:
            ids = ids[mask != 0]
        return self.decode(ids.flatten().tolist())


def _missing_logits(output: Any, described: str, wanted: Any) -> LogitsTypeError:
    hint = (
        "pass task=Task(output=<key, attribute or index>) naming where the logits are, or task=Task(output=lambda out: ...)"
    )
    if isinstance(output, (tuple, list)):
        hint = "pass task=Task(output=0) if the logits come first (Hugging Face models with return_dict=False), or " + hint.removeprefix("pass ")
    return LogitsTypeError(f"The model returned {described}, with no logits at {wanted!r}: {hint}.")


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
    """Yield batches from model inputs (a tensor, a dict of keyword or a tuple of positional inputs)
    split along dim 0, or from any other iterable of batches such as a ``DataLoader`` or a list."""
    if is_raw_inputs(data):
        n = batch_size_of(data)
        for start in range(0, n, batch_size):
            yield slice_inputs(data, start, start + batch_size)
    elif isinstance(data, Iterable):
        yield from data
    else:
        raise TypeError(
            f"Expected a tensor, a dict or tuple of tensors, or a DataLoader, got {type(data).__name__}."
        )


def is_raw_inputs(data: Any) -> bool:
    """Whether ``data`` is the inputs themselves rather than an iterable of batches: a tensor, a dict of
    keyword inputs, or a tuple of positional ones (several batches come as a list or a DataLoader)."""
    return isinstance(data, (torch.Tensor, dict)) or (isinstance(data, tuple) and any(isinstance(t, torch.Tensor) for t in tree_flatten(data)[0]))
