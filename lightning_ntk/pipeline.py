"""The fidelity pipeline, without Lightning: featurize → store → fit → score → attribute.

:class:`FidelityPipeline` holds a network and the kernel to explain it with; each stage is a named
method that returns values, so the pipeline runs from plain PyTorch::

    pipeline = FidelityPipeline(model, "proj_trntk")
    checkpoint = pipeline.run((x_train, y_train), (x_test, y_test))
    checkpoint.record.kendall_tau, pipeline.attribute(checkpoint, x_test[:4])

:class:`~lightning_ntk.callback.NTKAttributionCallback` drives the same methods on a schedule, adding
only what a training run needs (sharding over ranks, logging).
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from .attribution import Attribution, attribute, suspicious
from .checks import check_count
from .config import ProjectionConfig, SubsetConfig, SurrogateConfig, refuse_moved_options
from .errors import LabelError
from .featurize import FeatureSpec, Featurizer, embedding_features, gradient_features, model_device_dtype, retained_heap, stream_batches, stream_features
from .jacobian import DEFAULT_MEMORY_BUDGET, NonFiniteGradientError, check_logits, eval_mode, non_finite_rows_kept, select_parameters, state_fingerprint
from .kernels import DEFAULT_BLOCK_SIZE, as_tensor, kernel_from_features
from .metrics import SurrogateFidelity, check_label_range, fidelity_scores
from .registry import Kernel, get_kernel
from .store import EntryWriter, FeatureStore, request_digest
from .surrogate import KernelSurrogate, check_several_classes, fit_from_features, fit_from_kernel
from .task import Task, batch_size_of, differentiable, move_inputs
from .version import __version__


@dataclass
class ExampleSet:
    """A fixed, seeded subset of a map-style dataset: one side (reference or query) of the kernel.

    The examples are read once, by :meth:`scan`, and kept: random augmentations of the dataset are
    drawn once, so every checkpoint featurizes exactly the same inputs. ``indices`` are positions in
    ``dataset``; ``labels`` and ``fingerprint`` (a hash of the inputs and labels) come from the scan.
    """

    name: str
    dataset: Dataset
    indices: torch.Tensor
    collate_fn: Callable = default_collate
    labels: torch.Tensor | None = None
    fingerprint: str | None = None
    examples: list | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def loader(self, positions: torch.Tensor | None = None, batch_size: int = 128) -> DataLoader:
        """The kept examples (or those at ``positions`` of the subset) in order, in batches."""
        examples = self._examples()
        chosen = examples if positions is None else [examples[int(p)] for p in positions]
        return DataLoader(chosen, batch_size=batch_size, shuffle=False, collate_fn=self.collate_fn)

    def inputs(self, positions: torch.Tensor, task: Task) -> Any:
        """The model inputs of the examples at ``positions`` of the subset, as one batch."""
        examples = self._examples()
        return task.get_inputs(self.collate_fn([examples[int(p)] for p in positions.flatten()]))

    def describe(self) -> dict:
        return {"size": len(self), "fingerprint": self.fingerprint}

    def positions_of(self, indices: Any) -> torch.Tensor:
        """The positions in the subset of the examples at dataset ``indices`` (those a checkpoint kept)."""
        return torch.searchsorted(self.indices, torch.as_tensor(indices))

    def _examples(self) -> list:
        if self.examples is None:
            raise RuntimeError(f"The {self.name} set has not been read yet: call scan(task) first.")
        return self.examples

    def scan(self, task: Task, batch_size: int = 128) -> None:
        """Read the subset once: keep its examples, collect its labels and hash its contents; refuse
        batches the task cannot read with one error that names the fix."""
        self.examples = [self.dataset[int(i)] for i in self.indices]
        digest, labels = hashlib.sha256(), []
        for batch in self.loader(batch_size=batch_size):
            try:
                inputs, y = task.get_inputs(batch), task.get_labels(batch)
                leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
                if not leaves:
                    raise TypeError(f"the model inputs hold no tensor (got {type(inputs).__name__})")
            except (TypeError, KeyError, IndexError, ValueError) as err:
                raise TypeError(
                    f"Cannot read the {self.name} set's batches ({type(batch).__name__}): {err}. Batches must be a tensor, "
                    "an (inputs, labels) tuple or a dict of tensors; for anything else pass "
                    "task=Task(inputs=lambda batch: ..., labels=lambda batch: ...)."
                ) from err
            y = _class_indices(y, self.name)
            for t in leaves + [y]:
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            labels.append(y)
        self.labels, self.fingerprint = torch.cat(labels), digest.hexdigest()[:16]


def _class_indices(labels: Any, name: str) -> torch.Tensor:
    """A batch's labels as a ``[B]`` long tensor of class indices, or an error that says how to get one."""
    if labels is None:
        raise LabelError(
            f"The {name} set's batches carry no labels, but the surrogate is fitted on labels and scored against "
            "them: yield (inputs, labels) batches or pass task=Task(labels=...)."
        )
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as err:
        raise LabelError(
            f"The {name} set's labels must be class indices (integers), got {type(labels).__name__} "
            f"({str(labels)[:60]}): map them to integers in the dataset, or pass task=Task(labels=...)."
        ) from err
    if y.ndim > 1 and y.shape[1:].numel() == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or y.dtype == torch.bool or y.is_complex() or (y.is_floating_point() and not torch.equal(y, y.round())):
        raise LabelError(
            f"The {name} set's labels must be class indices, one per example; got a {y.dtype} tensor of shape "
            f"{tuple(y.shape)}. Convert one-hot or soft labels to class indices with task=Task(labels=...)."
        )
    return y.long()


class TensorExamples(Dataset):
    """The examples of ``(inputs, labels)`` given as whole tensors: ``inputs`` a tensor or a dict of tensors
    (keyword inputs, e.g. ``input_ids`` and ``attention_mask``), each example ``(inputs[i], labels[i])``."""

    def __init__(self, inputs: Any, labels: torch.Tensor):
        sizes = {t.shape[0] for t in tree_flatten((inputs, labels))[0] if isinstance(t, torch.Tensor)}
        if len(sizes) != 1:
            raise ValueError(f"The inputs and labels hold different numbers of examples ({sorted(sizes)}): pass one label per example.")
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        return tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) else t, self.inputs), self.labels[index]


def _tensor_pair(name: str, source: tuple | list) -> TensorExamples:
    """``(inputs, labels)`` as examples; numpy arrays become tensors, anything else is refused in words."""
    inputs, labels = tree_map(lambda t: torch.as_tensor(t) if isinstance(t, np.ndarray) else t, tuple(source))
    leaves = tree_flatten(inputs)[0]
    if not (isinstance(labels, torch.Tensor) and leaves and all(isinstance(t, torch.Tensor) for t in leaves) and isinstance(inputs, (torch.Tensor, dict))):
        raise TypeError(
            f"The {name} set given as a pair must be (inputs, labels): the inputs a tensor or a dict of tensors (keyword inputs), "
            f"the labels a tensor of class indices; got ({type(source[0]).__name__}, {type(source[1]).__name__}). Or pass a Dataset or DataLoader."
        )
    return TensorExamples(inputs, labels)


def example_set(name: str, source: Any, limit: int | None = None, seed: int = 0) -> ExampleSet:
    """A seeded subset of at most ``limit`` examples of ``source``: a map-style Dataset, a DataLoader
    (its dataset and collate function) or ``(inputs, labels)`` tensors, the inputs a tensor or a dict of
    tensors."""
    if isinstance(source, DataLoader):
        dataset, collate_fn = source.dataset, source.collate_fn
    elif isinstance(source, (tuple, list)) and len(source) == 2 and isinstance(source[1], (torch.Tensor, np.ndarray)):
        dataset, collate_fn = _tensor_pair(name, source), default_collate
    else:
        dataset, collate_fn = source, default_collate
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"The {name} set must be a map-style dataset (with __len__ and __getitem__), a DataLoader over one or "
            f"(inputs, labels) tensors, so that the same seeded subset is used at every checkpoint; got {type(dataset).__name__}."
        )
    n = len(dataset)
    if n == 0:
        raise ValueError(f"The {name} set is empty; pass a non-empty dataset.")
    if limit is None or limit >= n:
        indices = torch.arange(n)
    else:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return ExampleSet(name, dataset, indices, collate_fn)


def storable(values: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``values`` in ``dtype``, unless they exceed its range (float16 ends at 65,504, where unnormalised
    features of large inputs overflow to inf): then in bfloat16, of the same size and float32's range (float32
    if even that overflows), with a warning naming the array."""
    if not (values.is_floating_point() and dtype.is_floating_point) or values.numel() == 0:
        return values.to(dtype)
    peak = float(values.abs().max())
    if not math.isfinite(peak) or peak <= torch.finfo(dtype).max:
        return values.to(dtype)
    wider = torch.bfloat16 if peak <= torch.finfo(torch.bfloat16).max else torch.float32
    warnings.warn(
        f"The {name} reach {peak:.4g}, beyond the range of {str(dtype).removeprefix('torch.')} (up to {torch.finfo(dtype).max:.6g}): "
        f"they are kept in {str(wider).removeprefix('torch.')} instead. Use a normalised kernel (proj_trntk, trntk), or "
        "store={'dtype': 'bfloat16'} (or float32), to keep them in one dtype.",
        stacklevel=3,
    )
    return values.to(wider)


def describe_params(params: Any) -> Any:
    """A parameter selection as JSON can hold it: names and patterns as they are, modules by their repr."""
    return params if isinstance(params, (str, list, tuple, type(None))) else repr(params)


def entry_name(prefix: str, request: dict[str, Any]) -> str:
    """The store entry of a checkpoint's request: ``<prefix>-<weights' fingerprint>-<digest of the rest>``, so
    that checkpoints of other weights or other options (kernel, K, projector, data, dtype) live side by side in
    one store, and the entries of one set of options share their last part."""
    options = {key: value for key, value in request.items() if key != "parameters"}
    return f"{prefix}-{request['parameters']}-{request_digest(options)}"


ARRAYS = ("reference_features", "reference_labels", "reference_indices", "query_features", "query_labels", "query_indices", "query_logits")


@dataclass
class CheckpointFeatures:
    """What one checkpoint featurizes, and the feature store keeps: both sides' features, labels and
    dataset indices, and the network's logits on the query set."""

    reference_features: Any
    reference_labels: torch.Tensor
    reference_indices: torch.Tensor
    query_features: Any
    query_labels: torch.Tensor
    query_indices: torch.Tensor
    query_logits: torch.Tensor

    def arrays(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ARRAYS}

    def same_examples(self, other: "CheckpointFeatures") -> bool:
        """Whether both hold the same reference and query examples (none left out by one only)."""
        return all(torch.equal(torch.as_tensor(getattr(self, name)), torch.as_tensor(getattr(other, name))) for name in ("reference_indices", "query_indices"))

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> "CheckpointFeatures":
        """From stored arrays; features stay as they are (memory maps are read block by block)."""
        features = ("reference_features", "query_features")
        return cls(**{name: arrays[name] if name in features else as_tensor(arrays[name]) for name in ARRAYS})


@dataclass(frozen=True)
class CheckpointRecord:
    """The figures of one fidelity checkpoint (see :class:`~lightning_ntk.metrics.SurrogateFidelity`)
    and where its time went."""

    epoch: int | None
    step: int | None
    kendall_tau: float
    tad: float
    agreement: float
    surrogate_acc: float
    network_acc: float
    miss_overlap: float
    miss_overlap_p: float
    num_train: int
    num_query: int
    featurize_seconds: float
    fit_seconds: float
    score_seconds: float
    fit_iterations: int
    surrogate_converged: bool
    store_reused: bool
    parameters: str
    warning: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scalars(self) -> dict[str, float]:
        """The numeric figures (booleans as 0/1), for loggers."""
        return {k: float(v) for k, v in self.to_dict().items() if k not in ("epoch", "step") and isinstance(v, (int, float))}


@dataclass
class Checkpoint:
    """One evaluated checkpoint: its record, the fitted surrogate, the features it was fitted on, and
    the query kernel rows and surrogate logits it was scored with. ``weights``: the network's state when
    it was computed, on the CPU, if kept (:meth:`FidelityPipeline.keep_weights`), so that new inputs can
    be attributed with it after the network has moved on."""

    record: CheckpointRecord
    surrogate: KernelSurrogate
    features: CheckpointFeatures
    spec: FeatureSpec
    query_rows: torch.Tensor
    surrogate_logits: torch.Tensor
    weights: dict[str, torch.Tensor] | None = None


# Below these the surrogate is flagged as unfaithful. Every normalised kernel of the surrogate study (README, "Does it reproduce the
# paper?") stays above them on every setup (agreement ≥ 0.942, τ ≥ 0.660); the unnormalised trNTK⁰ on the CNN falls to τ 0.33.
FAITHFUL_AGREEMENT = 0.9
FAITHFUL_TAU = 0.5


def finite_rows(values: Any, block: int = 4096) -> torch.Tensor:
    """``[N]``: whether each row (first dimension) of a tensor or array holds no NaN or inf, read in blocks of
    rows (memory maps stay on disk) without a mask of their size (NaN and inf reach the extrema)."""
    parts = [torch.ones(0, dtype=torch.bool)]
    for start in range(0, len(values), block):
        rows = as_tensor(values[start : start + block])
        rows = rows.reshape(len(rows), -1)
        parts.append(torch.isfinite(torch.stack(torch.aminmax(rows, dim=1))).all(0) if rows.shape[1] else torch.ones(len(rows), dtype=torch.bool))
    return torch.cat(parts)


def _finite_examples(features: CheckpointFeatures) -> tuple[CheckpointFeatures, str]:
    """The features without the examples whose features (or, on the query side, network logits) hold NaN or
    inf, and a warning that counts them and names them (empty when none is left out). Where every example of
    a side is non-finite, nothing is left out: features are refused (:class:`NonFiniteGradientError`), and
    logits left to the record's warning, as without this."""
    kept, notes = {}, []
    for side in ("reference", "query"):
        feature_rows = finite_rows(getattr(features, f"{side}_features"))
        good = feature_rows & (finite_rows(features.query_logits) if side == "query" else True)
        if not feature_rows.any():
            raise NonFiniteGradientError(
                f"The gradients of all {len(good)} {side} examples hold NaN or inf: check the inputs for NaN/inf, lower the "
                "learning rate if training diverged, or exclude the parameters concerned with params=..."
            )
        if good.all() or not good.any():
            continue
        bad = (~good).nonzero().flatten()
        indices = torch.as_tensor(getattr(features, f"{side}_indices"))[bad].tolist()
        more = "…" if len(bad) > 10 else ""
        notes.append(f"{len(bad)} of {len(good)} {side} examples (positions {bad[:10].tolist()}{more} of the {side} set, "
                     f"dataset indices {indices[:10]}{more})")
        keep = good.nonzero().flatten()
        for name in ("features", "labels", "indices") + (("logits",) if side == "query" else ()):
            array = getattr(features, f"{side}_{name}")
            kept[f"{side}_{name}"] = array[keep] if isinstance(array, torch.Tensor) else as_tensor(np.asarray(array)[keep.numpy()])  # the rows kept, read alone
    if not notes:
        return features, ""
    return dataclasses.replace(features, **kept), (
        f"the network's logits or gradients hold NaN or inf on {' and '.join(notes)}, which are left out of this checkpoint: "
        "check the model's output on them (an overflow, a log of zero, 0/0)."
    )


def _fidelity_warning(features: CheckpointFeatures, surrogate_logits: torch.Tensor, fidelity: dict[str, float]) -> str:
    """Why a checkpoint's figures are not numbers, in words (empty when they are)."""
    network = torch.as_tensor(features.query_logits)
    bad = int((~torch.isfinite(network)).any(1).sum())
    if bad:
        return (f"the network's logits hold NaN or inf on {bad} of {len(network)} query examples, so Kendall-τ and the "
                "accuracies are not meaningful: check the model's output (overflow, a log of zero) on those examples.")
    if not torch.isfinite(surrogate_logits).all():
        return "the surrogate's logits hold NaN or inf: check the features for NaN/inf (the network's gradients)."
    if math.isnan(fidelity["kendall_tau"]):
        classes = int(torch.as_tensor(features.query_labels).unique().numel())
        return (f"Kendall-τ is undefined on {len(network)} query example(s) of {classes} class(es): it needs at least two examples "
                "whose scores differ and whose network probability is neither 0 nor 1. Use a larger query set with several classes.")
    if fidelity["agreement"] < FAITHFUL_AGREEMENT or fidelity["kendall_tau"] < FAITHFUL_TAU:
        return (f"the surrogate is not faithful to the network (agreement {fidelity['agreement']:.3f}, Kendall-τ "
                f"{fidelity['kendall_tau']:.3f}; faithful surrogates reach agreement ≥ {FAITHFUL_AGREEMENT} and τ ≥ {FAITHFUL_TAU}), so "
                "its attributions do not explain this network. A large positive TAD means the kernel machine is more accurate than "
                "the network, i.e. it solves the task its own way. A larger reference set (subsets={'max_train_examples': ...}), "
                "a normalised kernel (proj_trntk, the default) or a later checkpoint of a network trained further usually does better.")
    return ""


class FidelityPipeline:
    """A network, a registered kernel and the options of each stage.

    Args:
        model: the network; it must return ``[B, C]`` logits (see ``task`` for other batch layouts).
        kernel: a name of :mod:`lightning_ntk.registry` with a scalar kernel: ``proj_trntk`` (default),
            ``proj_trntk0``, ``proj_pntk``, the exact ``trntk``/``trntk0``/``pntk`` (small models:
            ``[N, C, P]`` gradients are held), ``em`` or ``ck``.
        projection, surrogate: :class:`ProjectionConfig`, :class:`SurrogateConfig` (or dicts of them).
        params: the parameters whose gradients define the kernel (default: all trainable ones).
        layers: the layers of the ``em`` kernel.
        storage_dtype: precision of the kept features (default: float64 for a float64 model, else float32).
        batch_size, memory_budget: examples per featurized batch, and the bytes the stages may hold.
    """

    @refuse_moved_options(elsewhere={
        "subsets": "pass max_train_examples, max_query_examples and seed (of the subsets) to run()",
        "store": "pass store=FeatureStore(folder) and overwrite=True to run()",
    })
    def __init__(
        self,
        model: nn.Module,
        kernel: str = "proj_trntk",
        projection: ProjectionConfig | dict | None = None,
        surrogate: SurrogateConfig | dict | None = None,
        *,
        params: Any = None,
        layers: Sequence[str] | None = None,
        task: Task | None = None,
        storage_dtype: torch.dtype | None = None,
        batch_size: int = 128,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.kernel: Kernel = get_kernel(kernel)
        if not self.kernel.scalar:
            raise ValueError(f"The {self.kernel.name} is a C×C block per pair, not a kernel a surrogate can use; choose trntk or pntk.")
        check_count("batch_size", batch_size, allow_none=False)
        self.model = model
        self.projection = ProjectionConfig.of(projection)
        self.surrogate = SurrogateConfig.of(surrogate)
        self.params, self.layers, self.task = params, layers, task or Task()
        self.batch_size, self.memory_budget = batch_size, memory_budget
        self.featurizer = None
        if self.kernel.projected:
            p = self.projection
            self.featurizer = Featurizer(model, self.kernel.name, p.dim, p.projector, p.seed, params, self.task, memory_budget,
                                         product_precision=p.product_precision)
        param = next(model.parameters(), None)
        self.storage_dtype = storage_dtype or (torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32)

    @property
    def product_precision(self) -> str:
        """That of the kernels' products: the projection's for projected kernels, whose features carry the
        projection's error anyway; float32 for exact ones."""
        return self.projection.product_precision if self.kernel.projected else "float32"

    # -- featurize ---------------------------------------------------------------------------------
    def spec(self) -> FeatureSpec:
        """What features computed now describe: the kernel, the projection and the network's state."""
        if self.featurizer is not None:
            return self.featurizer.spec()
        selected = select_parameters(self.model, None if not self.kernel.from_gradients else self.params)
        return FeatureSpec(self.kernel.family, None, None, None, sum(p.numel() for p in selected.values()), state_fingerprint(self.model, selected))

    def features(
        self, data: Any, progress: bool | str = False, with_logits: bool = False, name: str = "features"
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Kernel features of ``data`` (model inputs, or an iterable of batches), on the CPU in the
        storage precision (or a wider one where they exceed its range, see :func:`storable`): the kernel
        is their (normalised) inner product. ``with_logits``: and the network's logits on ``data``
        (float32), from the featurization's own forward passes where it has them. ``name``: the array's,
        for the warning. An example whose gradients hold NaN or inf keeps them in its row (:meth:`evaluate`
        leaves it out)."""
        logits = None
        with non_finite_rows_kept():
            if self.featurizer is not None:
                out = self.featurizer(data, batch_size=self.batch_size, progress=progress, with_logits=with_logits)
                out, logits = out if with_logits else (out, None)
            elif self.kernel.from_gradients:
                out = gradient_features(self.model, data, self.kernel.name, params=self.params, task=self.task, batch_size=self.batch_size)
            else:
                out = embedding_features(self.model, data, self.kernel.name, self.layers, task=self.task, batch_size=self.batch_size)
        out = storable(out, self.storage_dtype, name)
        if not with_logits:
            return out
        return out, (logits if logits is not None else self.logits(data)).float()

    def logits(self, data: Any) -> torch.Tensor:
        """The network's logits on ``data`` in eval mode, refused unless ``[B, C]``."""

        def forward(inputs):
            return check_logits(self.task.forward(self.model, inputs), batch_size_of(inputs))

        with torch.no_grad(), eval_mode(self.model):
            return stream_features(self.model, data, forward, self.task, self.batch_size)

    def check(self, reference: ExampleSet, query: ExampleSet) -> int:
        """The number of logits, after a dry run on two examples (the model's output, and their features:
        whatever would fail at a checkpoint fails here) and a check that both sets' labels are among its classes
        and that the reference set holds several, as the fit needs."""
        check_several_classes(reference.labels)
        sample = reference.inputs(torch.arange(min(2, len(reference))), self.task)
        args, kwargs = self.task.arguments(move_inputs(sample, *model_device_dtype(self.model)))
        try:
            with torch.no_grad(), eval_mode(self.model):
                self.model(*args, **kwargs)
        except Exception as err:
            raise TypeError(
                f"The model's forward fails on two {reference.name} examples called with {self.task.describe(sample)}: "
                f"{type(err).__name__}: {err}. Choose the model's inputs out of a batch with task=Task(inputs=lambda batch: ...) "
                "(a tuple is passed as positional arguments, a dict as keyword arguments)."
            ) from err
        logits = self.logits(sample)
        with torch.inference_mode(False), torch.enable_grad():
            self.features(sample)
        for examples in (reference, query):
            check_label_range(examples.labels, logits.shape[1], f"The {examples.name} set's examples",
                              f"Use a {examples.name} set with the training classes, or check the model's output size.")
        return logits.shape[1]

    def featurize(self, reference: ExampleSet, query: ExampleSet) -> CheckpointFeatures:
        """Both sides' features and the network's query logits, in one process."""
        with retained_heap(model_device_dtype(self.model)[0]):  # one heap for both sides
            reference_features = self.features(reference.loader(batch_size=self.batch_size), name="reference_features")
            query_features, query_logits = self.features(query.loader(batch_size=self.batch_size), with_logits=True, name="query_features")
        return CheckpointFeatures(reference_features, reference.labels, reference.indices, query_features, query.labels, query.indices, query_logits)

    def write_features(self, writer: EntryWriter, reference: ExampleSet, query: ExampleSet, progress: Callable[[str], bool | str] = lambda name: False) -> None:
        """Featurize both sides into a store entry's writer, batch by batch, the arrays of :meth:`featurize` in
        the storage precision: no array of all the features is held in memory. Kernels without a projection
        (exact gradients, embeddings) are featurized whole, then written. ``progress(name)``: the progress bar of
        the side ``name``."""
        with retained_heap(model_device_dtype(self.model)[0]):  # one heap for both sides
            for examples in (reference, query):
                logits = self._write_side(writer, examples, progress(examples.name), with_logits=examples is query)
                writer.put(f"{examples.name}_labels", examples.labels)
                writer.put(f"{examples.name}_indices", examples.indices)
        writer.put("query_logits", logits)

    def _write_side(self, writer: EntryWriter, examples: ExampleSet, progress: bool | str, with_logits: bool) -> torch.Tensor | None:
        """Write one side's features into ``writer`` as they are computed; return the network's logits on it
        (``with_logits``: kernels without a projection need a forward pass of their own for them)."""
        key, loader = f"{examples.name}_features", examples.loader(batch_size=self.batch_size)
        if self.featurizer is None:
            out = self.features(loader, with_logits=with_logits, name=key)
            features, logits = out if with_logits else (out, None)
            writer.put(key, features)
            return logits
        featurize = functools.partial(self.featurizer.featurize_batch, with_logits=True)
        start, logits = 0, []
        with non_finite_rows_kept():
            for features, batch_logits in stream_batches(self.model, loader, featurize, self.task, self.batch_size, progress):
                if not start:
                    writer.allocate(key, (len(examples), *features.shape[1:]), self.storage_dtype)
                features = storable(features.detach().cpu(), writer.dtype(key), key)
                writer.write(key, start, features)
                start += len(features)
                logits.append(batch_logits.detach().cpu().float())
        return torch.cat(logits)

    # -- store -------------------------------------------------------------------------------------
    def request(self, spec: FeatureSpec, reference: ExampleSet, query: ExampleSet) -> dict[str, Any]:
        """What a checkpoint's stored features answer; a stored entry is reused only for an equal one."""
        return {
            **spec.to_dict(),
            "kernel": self.kernel.name,
            "params": describe_params(self.params),
            "layers": list(self.layers) if self.layers is not None else None,
            "dtype": str(self.storage_dtype).removeprefix("torch."),
            "reference": reference.describe(),
            "query": query.describe(),
            "library_version": __version__,
        }

    # -- fit, score --------------------------------------------------------------------------------
    def fit(
        self, features: CheckpointFeatures, num_outputs: int, init: KernelSurrogate | None = None, progress: Callable[[int, float], None] | None = None
    ) -> KernelSurrogate:
        """The surrogate fitted on the reference features: on the ``N×N`` kernel when it fits the memory
        budget, else from the features, read in blocks (memory-mapped
        stored features stay on disk). ``init``: a previous solution to start from;
        ``progress(iteration, objective)`` is called at every solver iterate."""
        reference, labels = features.reference_features, features.reference_labels
        options = dict(num_outputs=num_outputs, alpha=self.surrogate.alpha, formulation=self.surrogate.formulation,
                       max_iter=self.surrogate.max_iter, tolerance=self.surrogate.tolerance, progress=progress)
        if init is not None and self.surrogate.warm_start:
            options["init"] = init
        if len(reference) ** 2 * 4 <= self.memory_budget:
            kernel = kernel_from_features(reference, normalize=self.kernel.normalized, product_precision=self.product_precision)
            return fit_from_kernel(kernel, labels, **options)
        return fit_from_features(reference, labels, normalize=self.kernel.normalized, spec=self.spec(), block_size=DEFAULT_BLOCK_SIZE, **options)

    def score(self, surrogate: KernelSurrogate, features: CheckpointFeatures) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """Fidelity of the surrogate on the query set: the figures, the query kernel rows and the
        surrogate's logits."""
        rows = kernel_from_features(features.query_features, features.reference_features, normalize=self.kernel.normalized,
                                    product_precision=self.product_precision)
        surrogate_logits = surrogate.predict(rows)
        metric = SurrogateFidelity(sync_on_compute=False)  # one process holds the whole query set
        metric.update(features.query_logits, surrogate_logits, features.query_labels)
        return {key: float(value) for key, value in metric.compute().items()}, rows, surrogate_logits

    def evaluate(
        self,
        features: CheckpointFeatures,
        spec: FeatureSpec,
        init: Checkpoint | None = None,
        *,
        epoch: int | None = None,
        step: int | None = None,
        featurize_seconds: float = 0.0,
        store_reused: bool = False,
        progress: Callable[[int, float], None] | None = None,
    ) -> Checkpoint:
        """Fit and score: the checkpoint with its record. ``init``: the previous checkpoint, whose
        surrogate starts the fit when it has the same shape."""
        started = time.perf_counter()
        features, left_out = _finite_examples(features)
        if left_out:
            warnings.warn(f"Fidelity checkpoint{'' if epoch is None else f' at epoch {epoch}'}: {left_out}", stacklevel=2)
        num_outputs = int(features.query_logits.shape[1])
        previous = init.surrogate if init is not None and init.surrogate.weight.shape == (num_outputs, len(features.reference_labels)) else None
        surrogate = self.fit(features, num_outputs, previous, progress)
        fitted = time.perf_counter()
        fidelity, rows, surrogate_logits = self.score(surrogate, features)
        # a fit cut short comes first: it may be why the surrogate is unfaithful
        warning = " ".join(filter(None, [surrogate.fit_record.get("warning", ""), _fidelity_warning(features, surrogate_logits, fidelity)]))
        if warning:
            warnings.warn(f"Fidelity checkpoint{'' if epoch is None else f' at epoch {epoch}'}: {warning}", stacklevel=2)
        record = CheckpointRecord(
            epoch=epoch, step=step, **fidelity, num_train=len(features.reference_labels), num_query=len(features.query_labels),
            featurize_seconds=featurize_seconds, fit_seconds=fitted - started, score_seconds=time.perf_counter() - fitted,
            fit_iterations=int(surrogate.fit_record["iterations"]), surrogate_converged=surrogate.converged,
            store_reused=store_reused, parameters=spec.parameters, warning=" ".join(filter(None, (left_out, warning))),
        )
        return Checkpoint(record, surrogate, features, spec, rows, surrogate_logits)

    def fidelity_scores(self, checkpoint: Checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
        """The paired (network, surrogate) probabilities that Kendall-τ ranks."""
        f = checkpoint.features
        return fidelity_scores(f.query_logits, checkpoint.surrogate_logits, f.query_labels)

    # -- all stages --------------------------------------------------------------------------------
    def run(
        self,
        reference: Any,
        query: Any,
        *,
        max_train_examples: int | None = None,
        max_query_examples: int | None = None,
        seed: int = 0,
        store: FeatureStore | None = None,
        name: str = "checkpoint",
        overwrite: bool = False,
        init: Checkpoint | None = None,
    ) -> Checkpoint:
        """Featurize ``reference`` and ``query`` (Datasets, DataLoaders or ``(inputs, labels)``
        tensors, subsampled with ``seed``), keep the features in ``store`` (as the entry
        ``<name>-<weights' fingerprint>-<digest of the other options>``, reused by a run that asks for the
        same, side by side with those of other weights or options), fit the surrogate and score it."""
        subsets = SubsetConfig(max_train_examples, max_query_examples, seed, self.batch_size)  # checks them before any work
        reference_set = example_set("reference", reference, subsets.max_train_examples, subsets.seed)
        query_set = example_set("query", query, subsets.max_query_examples, subsets.seed)
        for examples in (reference_set, query_set):
            examples.scan(self.task, self.batch_size)
        self.check(reference_set, query_set)
        with torch.inference_mode(False), torch.enable_grad():
            spec = self.spec()
            request = self.request(spec, reference_set, query_set)
            name = entry_name(name, request)
            stored = None if store is None or overwrite else store.load(name, request)
            started = time.perf_counter()
            if stored is not None:
                features = CheckpointFeatures.from_arrays(stored)
            elif store is not None:  # written to the store as they are computed, read back as memory maps
                with store.writer(name, request, overwrite=overwrite) as writer:
                    self.write_features(writer, reference_set, query_set)
                    features = CheckpointFeatures.from_arrays(writer.publish())
            else:
                features = self.featurize(reference_set, query_set)
            seconds = 0.0 if stored is not None else time.perf_counter() - started
            checkpoint = self.evaluate(features, spec, init, featurize_seconds=seconds, store_reused=stored is not None)
        return checkpoint

    # -- attribute ---------------------------------------------------------------------------------
    def keep_weights(self, checkpoint: Checkpoint) -> Checkpoint:
        """The checkpoint with a CPU copy of the network's current state (parameters and buffers), which
        must be the state it was computed with."""
        self._check_state(checkpoint)
        return dataclasses.replace(checkpoint, weights={k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()})

    def _check_state(self, checkpoint: Checkpoint) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            if self.spec() != checkpoint.spec:
                raise ValueError(
                    "The model changed since the surrogate was fitted: attribution needs the weights and buffers (e.g. BatchNorm's "
                    "running statistics, which a forward pass in train mode moves) the features were computed with. Attribute right after the checkpoint (e.g. after trainer.fit with at_fit_end=True), or keep the "
                    "checkpoint's weights with keep_weights()."
                )

    @contextlib.contextmanager
    def _state_of(self, checkpoint: Checkpoint) -> Iterator[None]:
        """The network in the state the checkpoint was computed with meanwhile: as it is, or loaded from the
        checkpoint's kept weights and restored afterwards, bit for bit."""
        if checkpoint.weights is None:
            self._check_state(checkpoint)
            yield
            return
        if self.spec() == checkpoint.spec:  # the network holds the checkpoint's state already
            yield
            return
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            with torch.no_grad():
                self.model.load_state_dict(checkpoint.weights)
            self._check_state(checkpoint)
            yield
        finally:
            with torch.no_grad():
                self.model.load_state_dict(current)

    def attribute(self, checkpoints: Checkpoint | Sequence[Checkpoint], inputs: Any, top_k: int = 5, target: Any = None,
                  method: str = "influence") -> Attribution:
        """Explain the network's predictions on model ``inputs``: the training examples whose removal would
        most lower (proponents) or raise (opponents) the margin of the network's predicted class (or of
        ``target``), as positions in the reference dataset, and the most similar ones; ``method`` as in
        :func:`~lightning_ntk.attribution.attribute`.

        Several checkpoints (of one training run, over the same reference examples) make an ensemble: the
        inputs are featurized with each one's network state and the scores averaged. The network must hold
        each checkpoint's state, or the checkpoint must keep its weights (:meth:`keep_weights`)."""
        members = [checkpoints] if isinstance(checkpoints, Checkpoint) else list(checkpoints)
        indices = members[-1].features.reference_indices
        if any(not torch.equal(torch.as_tensor(m.features.reference_indices), torch.as_tensor(indices)) for m in members):
            raise ValueError("The checkpoints of an ensemble must share their reference examples (the same subset of one dataset).")
        rows = []
        for checkpoint in members:
            with torch.inference_mode(False), torch.enable_grad(), self._state_of(checkpoint):
                features, network_logits = self.features(differentiable(inputs), with_logits=True)
            bad = (~finite_rows(features)).nonzero().flatten().tolist()
            if bad:
                raise NonFiniteGradientError(
                    f"The gradients of the inputs at positions {bad[:10]} hold NaN or inf, so they cannot be attributed: check "
                    "the inputs for NaN/inf and the model's output on them (an overflow, a log of zero, 0/0)."
                )
            rows.append(kernel_from_features(features, checkpoint.features.reference_features, normalize=self.kernel.normalized,
                                             product_precision=self.product_precision))
        result = attribute([m.surrogate for m in members], query_kernel=rows, top_k=top_k, target=target, network_logits=network_logits, method=method)
        return dataclasses.replace(result, **{f"{kind}_indices": indices[getattr(result, f"{kind}_indices")] for kind in ("proponent", "opponent", "similar")})

    def suspicious(self, checkpoint: Checkpoint, top_k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``top_k`` reference examples most likely mislabelled, as positions in the reference dataset,
        with their scores: the surrogate's loss on each (see :func:`~lightning_ntk.attribution.suspicious`)."""
        positions, losses = suspicious(checkpoint.surrogate, top_k)
        return torch.as_tensor(checkpoint.features.reference_indices)[positions], losses
