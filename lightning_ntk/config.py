"""Typed options of the fidelity pipeline, grouped by stage.

Each group is a dataclass that checks its values when it is built (so that a typo fails before
training, not at the first checkpoint), reads from a plain dict (``ProjectionConfig.of({"dim": 512})``),
and serialises to JSON for the feature store's manifests. LightningCLI and jsonargparse accept them
as nested options (``--trainer.callbacks.init_args.projection.dim 512``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from .checks import FORMULATIONS, check_alpha, check_choice, check_count, check_flag, check_path, check_solver_options
from .projection import PROJECTOR_KINDS, check_product_precision, check_projection_dim

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

_Config = TypeVar("_Config", bound="_Options")


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
        check_choice("projector", self.projector, PROJECTOR_KINDS)
        check_count("seed", self.seed, allow_none=False, minimum=0)
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
        check_count("max_train_examples", self.max_train_examples)
        check_count("max_query_examples", self.max_query_examples)
        check_count("seed", self.seed, allow_none=False, minimum=0)
        check_count("batch_size", self.batch_size, allow_none=False)


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
        check_alpha(self.alpha)
        check_choice("formulation", self.formulation, FORMULATIONS)
        check_solver_options(self.tolerance, self.max_iter, minimum_iterations=1)
        check_flag("warm_start", self.warm_start)


@dataclass(frozen=True)
class StoreConfig(_Options):
    """Where and how the features of each checkpoint are kept on disk.

    ``dir``: default ``<trainer log folder>/ntk_store``. ``overwrite``: compute each checkpoint's features
    again and replace its stored entry instead of reusing it. ``keep_last``: which of the checkpoints this
    run wrote stay on disk (other runs' entries are left alone): ``"ensemble"`` those the attribution
    ensemble holds (the callback's ``ensemble``, the latest always), an integer the newest ``keep_last``,
    None every one. ``dtype``: storage precision of the features. ``"auto"``: float16 for projected kernels
    of models below float64 precision, which halves the store and moves neither Kendall-τ nor the
    attributions beyond the projection's own seed-to-seed spread (``benchmarks/storage_precision.py``;
    kernels still accumulate in float32, and features beyond float16's range are kept wider with a
    warning), else the model's precision (exact kernels stay exact); None: the model's precision.
    """

    dir: str | None = None
    overwrite: bool = False
    keep_last: int | str | None = "ensemble"
    dtype: str | None = "auto"

    def __post_init__(self) -> None:
        check_path("dir", self.dir)
        check_flag("overwrite", self.overwrite)
        if self.keep_last != "ensemble":
            check_count("keep_last", self.keep_last, hint=' or "ensemble"')
        if self.dtype is not None:
            check_choice("storage dtype", self.dtype, ["auto", *STORAGE_DTYPES])

    def storage_dtype(self, projected: bool, model_dtype: torch.dtype) -> torch.dtype | None:
        """The features' dtype in the store for a kernel (projected or not) of a model of ``model_dtype``
        (None: the model's precision)."""
        if self.dtype == "auto":
            return torch.float16 if projected and model_dtype != torch.float64 else None
        return None if self.dtype is None else STORAGE_DTYPES[self.dtype]


_GROUPS: dict[str, type[_Options]] = {"projection": ProjectionConfig, "subsets": SubsetConfig, "surrogate": SurrogateConfig, "store": StoreConfig}
# keyword options of earlier versions → (the constructor's config argument, its field; None: the dict's keys are fields)
MOVED_OPTIONS: dict[str, tuple[str, str | None]] = {
    "projection_dim": ("projection", "dim"),
    "projector": ("projection", "projector"),
    "seed": ("projection", "seed"),
    "featurizer_options": ("projection", None),
    "max_train_examples": ("subsets", "max_train_examples"),
    "max_query_examples": ("subsets", "max_query_examples"),
    "batch_size": ("subsets", "batch_size"),
    "alpha": ("surrogate", "alpha"),
    "formulation": ("surrogate", "formulation"),
    "surrogate_options": ("surrogate", None),
    "store_dir": ("store", "dir"),
    "overwrite_store": ("store", "overwrite"),
}


def refuse_moved_options(elsewhere: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Decorate a constructor so that an option of :data:`MOVED_OPTIONS` it no longer takes is refused with
    where it moved, instead of Python's bare "unexpected keyword argument". ``elsewhere``: for a config
    group the constructor does not take, where its options go instead. The signature is kept (for LightningCLI)."""

    def decorate(init: Callable) -> Callable:
        accepted = set(inspect.signature(init).parameters)

        def where(option: str) -> str:
            group, field = MOVED_OPTIONS[option]
            if group not in accepted:
                return f"{option} moved: {(elsewhere or {})[group]}"
            config = _GROUPS[group].__name__
            if field is None:
                return f"{option} moved into {group}={config}(...) (or {group}={{...}}): its keys are {config}'s fields {[f.name for f in dataclasses.fields(_GROUPS[group])]}"
            text = f"{option} moved into {group}={config}({field}=...) (or {group}={{'{field}': ...}})"
            if option == "seed":  # the one option of two groups
                text += " for the projection; the subsets' seed: " + ("subsets=SubsetConfig(seed=...)" if "subsets" in accepted else (elsewhere or {})["subsets"])
            return text

        @functools.wraps(init)
        def checked(self, *args: Any, **kwargs: Any) -> None:
            moved = [option for option in kwargs if option in MOVED_OPTIONS and option not in accepted]
            if moved:
                raise TypeError(f"{type(self).__name__}: " + "; ".join(where(option) for option in moved) + ".")
            init(self, *args, **kwargs)

        return checked

    return decorate
