"""Typed options of the fidelity pipeline, grouped by stage.

Each group is a dataclass that checks its values when it is built (so that a typo fails before
training, not at the first checkpoint), reads from a plain dict (``ProjectionConfig.of({"dim": 512})``),
and serialises to JSON for the feature store's manifests. LightningCLI and jsonargparse accept them
as nested options (``--trainer.callbacks.init_args.projection.dim 512``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .projection import PROJECTOR_KINDS, check_product_precision, check_projection_dim
from .surrogate import FORMULATIONS

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

_Config = TypeVar("_Config", bound="_Options")


def _check_count(name: str, value: Any, allow_none: bool = True, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}{' or None' if allow_none else ''}, got {value!r}.")


class _Options:
    @classmethod
    def of(cls: type[_Config], value: _Config | dict | None) -> _Config:
        """``value`` as this config: an instance as it is, a dict by its keys (unknown keys are refused
        with the valid ones named), None as the defaults."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"Expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}.")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} option(s) {unknown}; the options are {fields}.")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProjectionConfig(_Options):
    """The random projection of the gradients: its dimension K, the projector and its seed.

    ``projector="sketch"`` is the structured count-sketch applied to layer signals (fast, memory of a
    few activations); ``"rademacher"``/``"gaussian"`` the paper's dense projections of materialised
    gradients (the reference for kernel quality, far slower). ``product_precision``: that of the
    sketch's per-example matrix products (see :class:`~lightning_ntk.projection.SketchProjector`) and of
    the projected kernels' products (see :func:`~lightning_ntk.kernels.kernel_blocks`).
    """

    dim: int = 1024
    projector: str = "sketch"
    seed: int = 0
    product_precision: str = "auto"

    def __post_init__(self) -> None:
        check_projection_dim(self.dim)
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(f"Unknown projector {self.projector!r}; choose one of {PROJECTOR_KINDS}.")
        check_product_precision(self.product_precision)


@dataclass(frozen=True)
class SubsetConfig(_Options):
    """The fixed, seeded reference (training) and query (validation) subsets, the same at every
    checkpoint so that fidelity is comparable across epochs (None: the whole set)."""

    max_train_examples: int | None = 1000
    max_query_examples: int | None = 500
    seed: int = 0
    batch_size: int = 128

    def __post_init__(self) -> None:
        _check_count("max_train_examples", self.max_train_examples)
        _check_count("max_query_examples", self.max_query_examples)
        _check_count("batch_size", self.batch_size, allow_none=False)


@dataclass(frozen=True)
class SurrogateConfig(_Options):
    """The kernel-machine surrogate: L2 penalty ``alpha`` on the mean loss, the ``formulation``
    (``"multinomial"`` softmax, or the paper's class-balanced one-vs-rest ``"ovr"``), the solver's cap
    on Newton steps and its tolerance on the estimated relative distance to the optimal objective, and
    whether each checkpoint starts from the previous one's solution (consecutive checkpoints' problems
    are close)."""

    alpha: float = 1e-4
    formulation: str = "multinomial"
    max_iter: int = 100
    tolerance: float = 1e-9
    warm_start: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha is an L2 penalty and must be a number > 0 (without it the fit has no minimum), got {self.alpha!r}.")
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"Unknown formulation {self.formulation!r}; choose one of {FORMULATIONS}.")
        _check_count("max_iter", self.max_iter, allow_none=False)
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance!r}.")


@dataclass(frozen=True)
class StoreConfig(_Options):
    """Where and how the features of each checkpoint are kept on disk.

    ``dir``: default ``<trainer log folder>/ntk_store``. ``overwrite``: compute each checkpoint's features
    again and replace its stored entry instead of reusing it. ``keep_last``: delete all but the newest
    ``keep_last`` checkpoints this run wrote (None keeps every one; other runs' entries are left alone). ``dtype``: storage precision of the features
    (``"float16"``/``"bfloat16"`` halve the store; kernels still accumulate in float32; None keeps the
    model's precision).
    """

    dir: str | None = None
    overwrite: bool = False
    keep_last: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        _check_count("keep_last", self.keep_last)
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"Unknown storage dtype {self.dtype!r}; choose one of {list(STORAGE_DTYPES)} or None.")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else STORAGE_DTYPES[self.dtype]
