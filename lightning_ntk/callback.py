"""``NTKAttributionCallback``: how faithful an NTK surrogate of the network is, checkpoint by checkpoint.

At each scheduled checkpoint it runs the pipeline's stages on fixed, seeded subsets of the training
(reference) and validation (query) data: features (sharded over the strategy's ranks and gathered)
→ feature store → kernels → :class:`~lightning_ntk.surrogate.KernelSurrogate` →
:class:`~lightning_ntk.metrics.SurrogateFidelity` → top-k attributions → loggers. It leaves the
training run untouched: it iterates its own ``DataLoader``s, never the trainer's, and restores RNG
states, module modes, ``requires_grad`` flags and ``.grad`` buffers afterwards, so the trained weights
are bit-identical with and without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torch.utils.data.dataloader import default_collate

from . import __version__, dashboards
from .attribution import Attribution, attribute
from .featurize import EMBEDDING_KINDS, FeatureSpec, Featurizer, embedding_features, gradient_features, stream_features
from .jacobian import check_logits, eval_mode, parameter_fingerprint, select_parameters
from .kernels import kernel_from_features
from .metrics import SurrogateFidelity, fidelity_scores, predictions
from .projection import DEFAULT_MEMORY_BUDGET, check_projection_dim
from .store import FeatureStore
from .surrogate import KernelSurrogate, fit_from_features, fit_from_kernel
from .task import Task, batch_size_of

PROJECTED_KERNELS = {"proj_trntk": "trntk", "proj_pntk": "pntk"}
EXACT_KERNELS = ("trntk", "trntk0", "pntk", "em", "ck")
KERNELS = (*PROJECTED_KERNELS, *EXACT_KERNELS)


@contextlib.contextmanager
def preserved_training_state(module: nn.Module) -> Iterator[None]:
    """Run a block with gradients enabled (even under ``inference_mode``) and undo its side effects on
    training: RNG states (torch, CUDA, numpy, python), every submodule's train/eval mode, the
    parameters' ``requires_grad`` flags and their ``.grad`` tensors (same objects, same values)."""
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    modes = [(m, m.training) for m in module.modules()]
    params = [(p, p.requires_grad, p.grad, None if p.grad is None else p.grad.clone()) for p in module.parameters()]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for m, mode in modes:
            m.training = mode
        for p, requires_grad, grad, values in params:
            p.requires_grad_(requires_grad)
            p.grad = grad
            if grad is not None:
                with torch.no_grad():
                    grad.copy_(values)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's informational messages (device summary, tips) while the surrogate's own
    Trainer runs inside a checkpoint; warnings and errors still show."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _trainable(data: Any) -> Any:
    """Inputs usable by autograd: inference tensors (from ``inference_mode``) are cloned."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t, data)


@dataclass
class ExampleSet:
    """A fixed, seeded subset of a map-style dataset: one side (reference or query) of the kernel.

    ``indices`` are positions in ``dataset``; ``labels`` and ``fingerprint`` (a hash of the subset's
    inputs and labels) are filled by :meth:`scan`.
    """

    name: str
    dataset: Dataset
    indices: torch.Tensor
    collate_fn: Callable
    labels: torch.Tensor | None = None
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def loader(self, positions: torch.Tensor | None = None, batch_size: int = 128) -> DataLoader:
        """The subset (or the given positions of it) in order, in a DataLoader of its own."""
        indices = self.indices if positions is None else self.indices[positions]
        return DataLoader(Subset(self.dataset, indices.tolist()), batch_size=batch_size, shuffle=False, collate_fn=self.collate_fn)

    def inputs(self, positions: torch.Tensor, task: Task) -> Any:
        """The model inputs of the examples at ``positions`` of the subset, as one batch."""
        return task.get_inputs(self.collate_fn([self.dataset[int(self.indices[p])] for p in positions.flatten()]))

    def describe(self) -> dict:
        return {"size": len(self), "fingerprint": self.fingerprint}

    def scan(self, task: Task, batch_size: int) -> None:
        """Read the subset once: collect its labels and hash its contents; refuse batches the task
        cannot read with one error that names the fix."""
        digest, labels = hashlib.sha256(), []
        for batch in self.loader(batch_size=batch_size):
            try:
                inputs, y = task.get_inputs(batch), task.get_labels(batch)
                leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
                if not leaves:
                    raise TypeError(f"the model inputs hold no tensor (got {type(inputs).__name__})")
            except (TypeError, KeyError, IndexError, ValueError) as err:
                raise TypeError(
                    f"NTKAttributionCallback cannot read the {self.name} set's batches ({type(batch).__name__}): {err}. "
                    "Batches must be a tensor, an (inputs, labels) tuple or a dict of tensors; for anything else pass "
                    "task=Task(inputs=lambda batch: ..., labels=lambda batch: ...) to the callback."
                ) from err
            if y is None:
                raise ValueError(
                    f"The {self.name} set's batches carry no labels, but the surrogate is fitted on labels and "
                    "scored against them: yield (inputs, labels) batches or pass task=Task(labels=...) to the callback."
                )
            y = torch.as_tensor(y)
            if y.ndim > 1 and y.shape[1:].numel() == 1:
                y = y.reshape(-1)
            if y.ndim != 1 or (y.is_floating_point() and not torch.equal(y, y.round())):
                raise ValueError(
                    f"The {self.name} set's labels must be class indices, one per example; got a {y.dtype} tensor of "
                    f"shape {tuple(y.shape)}. Convert one-hot or soft labels to class indices with task=Task(labels=...)."
                )
            for t in leaves + [y]:
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            labels.append(y.long())
        self.labels, self.fingerprint = torch.cat(labels), digest.hexdigest()[:16]


def example_set(name: str, source: Any, default: Any, limit: int | None, seed: int) -> ExampleSet:
    """Resolve ``source`` (a Dataset, a DataLoader, a tuple of tensors, or None for the trainer's own
    loader ``default``) into a seeded subset of at most ``limit`` examples."""
    option = "train_data" if name == "reference" else "query_data"
    if source is None:
        source = default[0] if isinstance(default, (list, tuple)) and default else default
        if not isinstance(source, DataLoader):
            raise ValueError(
                f"NTKAttributionCallback found no {name} set: the trainer has no single {'train' if name == 'reference' else 'validation'} "
                f"DataLoader (got {type(source).__name__}). Pass {option}=... (a Dataset, DataLoader or (inputs, labels) tensors)."
            )
    if isinstance(source, DataLoader):
        dataset, collate_fn = source.dataset, source.collate_fn
    elif isinstance(source, (tuple, list)) and source and all(isinstance(t, torch.Tensor) for t in source):
        dataset, collate_fn = TensorDataset(*source), default_collate
    else:
        dataset, collate_fn = source, default_collate
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"The {name} set must be a map-style dataset (with __len__ and __getitem__) so that the same seeded subset "
            f"can be drawn at every checkpoint; got {type(dataset).__name__}. Pass {option}= a map-style Dataset."
        )
    n = len(dataset)
    if n == 0:
        raise ValueError(f"The {name} set is empty; pass {option}= a non-empty dataset.")
    if limit is None or limit >= n:
        indices = torch.arange(n)
    else:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return ExampleSet(name, dataset, indices, collate_fn)


class NTKAttributionCallback(L.Callback):
    """Fit an NTK kernel-machine surrogate of the network at scheduled epochs, measure its fidelity,
    attribute predictions to training examples, and log it all.

    Args:
        kernel: ``"proj_trntk"`` / ``"proj_pntk"`` (random projections of dimension ``projection_dim``)
            or the exact ``"trntk"``, ``"trntk0"``, ``"pntk"`` (small models only), ``"em"``, ``"ck"``.
        projection_dim, projector, seed: the random projection; ``seed`` also draws the data subsets.
        every_n_epochs, epochs, at_fit_end: the schedule (0-based epochs; override
            :meth:`should_featurize` for others). A fit-end checkpoint is skipped when the weights have
            not changed since the last one.
        max_train_examples, max_query_examples: size of the seeded subsets (None: everything), the same
            at every checkpoint so that fidelity is comparable across epochs.
        train_data, query_data: the reference and query sets (Dataset, DataLoader or tensors); default
            the trainer's train and validation DataLoaders' datasets.
        module: name of the submodule that returns the logits (default: the LightningModule itself).
        params, layers, task, memory_budget, featurizer_options: passed to the kernel engine.
        top_k, table_examples, image_shape: attributions logged per checkpoint (``top_k=0``: none).
        alpha, formulation, surrogate_options: the surrogate (see :func:`fit_from_kernel`).
        store_dir, overwrite_store: the feature store (default ``<default_root_dir>/ntk_store``); a
            stored checkpoint with another manifest is refused unless ``overwrite_store``.
    """

    def __init__(
        self,
        kernel: str = "proj_trntk",
        projection_dim: int = 1024,
        projector: str = "rademacher",
        seed: int = 0,
        every_n_epochs: int | None = 1,
        epochs: list[int] | None = None,
        at_fit_end: bool = True,
        max_train_examples: int | None = 1000,
        max_query_examples: int | None = 500,
        train_data: Any = None,
        query_data: Any = None,
        module: str | None = None,
        params: str | list[str] | None = None,
        layers: list[str] | None = None,
        task: Task | None = None,
        top_k: int = 5,
        table_examples: int = 8,
        image_shape: list[int] | None = None,
        alpha: float = 1e-4,
        formulation: str = "multinomial",
        surrogate_options: dict | None = None,
        featurizer_options: dict | None = None,
        store_dir: str | None = None,
        overwrite_store: bool = False,
        batch_size: int = 128,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        if kernel not in KERNELS:
            raise ValueError(f"Unknown kernel {kernel!r}; choose one of {KERNELS}.")
        if kernel in PROJECTED_KERNELS:
            check_projection_dim(projection_dim)
        for name, value in (("every_n_epochs", every_n_epochs), ("max_train_examples", max_train_examples), ("max_query_examples", max_query_examples)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if top_k < 0 or table_examples < 0:
            raise ValueError(f"top_k and table_examples must be ≥ 0 (0 turns attributions off), got {top_k} and {table_examples}.")
        self.kernel = kernel
        self.kind = PROJECTED_KERNELS.get(kernel, kernel)
        self.projection_dim, self.projector, self.seed = projection_dim, projector, seed
        self.every_n_epochs, self.epochs, self.at_fit_end = every_n_epochs, set(epochs or ()), at_fit_end
        self.max_train_examples, self.max_query_examples = max_train_examples, max_query_examples
        self.train_data, self.query_data = train_data, query_data
        self.module, self.params, self.layers, self.task = module, params, layers, task or Task()
        self.top_k, self.table_examples, self.image_shape = top_k, table_examples, image_shape
        self.surrogate_options = dict(surrogate_options or {}, alpha=alpha, formulation=formulation)
        self.featurizer_options = dict(featurizer_options or {})
        self.store_dir, self.overwrite_store = store_dir, overwrite_store
        self.batch_size, self.memory_budget = batch_size, memory_budget
        self.history: list[dict[str, Any]] = []
        self.surrogate: KernelSurrogate | None = None
        self._model: nn.Module | None = None
        self._store: FeatureStore | None = None
        self._num_logits = 0
        self._featurizer: Featurizer | None = None
        self._reference: ExampleSet | None = None
        self._query: ExampleSet | None = None
        self._train_features: Any = None
        self._surrogate_spec: FeatureSpec | None = None
        self._epoch_end_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kernel=self.kernel, projection_dim=self.projection_dim, seed=self.seed, store_dir=self.store_dir)

    # -- schedule --------------------------------------------------------------------------------
    def should_featurize(self, trainer: L.Trainer) -> bool:
        """Whether to take a checkpoint at the end of the current training epoch."""
        epoch = trainer.current_epoch
        return epoch in self.epochs or (self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0)

    # -- Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resolve the model and the data, and check everything that can fail before training does."""
        self._model = self._logits_module(pl_module)
        self._store = FeatureStore(self.store_dir or os.path.join(trainer.default_root_dir, "ntk_store"))
        if trainer.is_global_zero:
            self._store.check_writable()
        with preserved_training_state(pl_module):
            self._reference = example_set("reference", self.train_data, trainer.train_dataloader, self.max_train_examples, self.seed)
            self._query = example_set("query", self.query_data, trainer.val_dataloaders, self.max_query_examples, self.seed)
            for examples in (self._reference, self._query):
                examples.scan(self.task, self.batch_size)
            self._num_logits = self._check_model()
            if self.kind in PROJECTED_KERNELS.values():
                self._featurizer = Featurizer(self._model, self.kind, self.projection_dim, self.projector, self.seed, self.params,
                                              self.task, self.memory_budget, **self.featurizer_options)
        if trainer.is_global_zero:
            for run in dashboards.wandb_runs(trainer.loggers):
                dashboards.define_epoch_axis(run)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end_step = trainer.global_step
        if self.should_featurize(trainer):
            self._checkpoint(trainer, pl_module, trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_fit_end or (self.history and self.history[-1]["step"] == trainer.global_step):
            return
        # After the last epoch, current_epoch already counts it; a fit stopped mid-epoch is in current_epoch.
        epoch = trainer.current_epoch - 1 if trainer.global_step == self._epoch_end_step else trainer.current_epoch
        self._checkpoint(trainer, pl_module, max(epoch, 0))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict["history"]]

    # -- attribution queries -----------------------------------------------------------------------
    def attribute(self, batch: Any, top_k: int = 5, target: torch.Tensor | None = None) -> Attribution:
        """Explain the network's predictions on ``batch`` (a batch as the data loaders yield it, or
        model inputs) with the latest surrogate. Indices are positions in the reference dataset."""
        if self.surrogate is None:
            raise RuntimeError(
                "NTKAttributionCallback has no surrogate yet: it is fitted at the first scheduled checkpoint (on rank 0 "
                "under DDP). Call attribute() after trainer.fit with at_fit_end=True or a scheduled epoch."
            )
        with preserved_training_state(self._model):
            inputs = _trainable(self.task.get_inputs(batch))
            spec = self._spec()
            if spec != self._surrogate_spec:
                raise ValueError(
                    f"The model changed since the surrogate was fitted (epoch {self.history[-1]['epoch']}): attribution needs "
                    "the weights the features were computed with. Call attribute() right after a checkpoint, e.g. after "
                    "trainer.fit with at_fit_end=True."
                )
            features = self._featurize(inputs).to(self._storage_dtype())
            rows = kernel_from_features(features, self._train_features, normalize=self.kind != "trntk0")
            result = attribute(self.surrogate, query_kernel=rows, top_k=top_k, target=target)
        return self._to_dataset_indices(result)

    # -- internals ---------------------------------------------------------------------------------
    def _logits_module(self, pl_module: L.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as err:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(f"module={self.module!r} is not a submodule of {type(pl_module).__name__}; its children are {names}.") from err

    def _logits(self, data: Any) -> torch.Tensor:
        """The network's logits on ``data`` (model inputs or a loader), refused unless ``[B, C]``."""

        def forward(inputs):
            return check_logits(self.task.forward(self._model, inputs), batch_size_of(inputs))

        with torch.no_grad(), eval_mode(self._model):
            return stream_features(self._model, data, forward, self.task, self.batch_size)

    def _check_model(self) -> int:
        """The number of logits, after checking the model's output on two examples and the labels' range."""
        try:
            logits = self._logits(self._reference.inputs(torch.arange(min(2, len(self._reference))), self.task))
        except (TypeError, ValueError) as err:
            hint = "" if self.module is not None else " If a submodule returns the logits, pass module='<its name>' to the callback."
            raise type(err)(f"NTKAttributionCallback: {err}{hint}") from err
        classes = max(2, logits.shape[1])
        for examples in (self._reference, self._query):
            low, high = int(examples.labels.min()), int(examples.labels.max())
            if low < 0 or high >= classes:
                raise ValueError(
                    f"The {examples.name} set holds labels {low}..{high}, outside the {classes} classes of the model's "
                    f"{logits.shape[1]} logit(s). Use a {examples.name} set with the training classes "
                    f"({'query_data' if examples.name == 'query' else 'train_data'}=...), or check the model's output size."
                )
        return logits.shape[1]

    def _storage_dtype(self) -> torch.dtype:
        param = next(self._model.parameters(), None)
        return torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32

    def _spec(self) -> FeatureSpec:
        if self._featurizer is not None:
            return self._featurizer.spec()
        selected = select_parameters(self._model, None if self.kind in EMBEDDING_KINDS else self.params)
        return FeatureSpec(self.kind, None, None, None, sum(p.numel() for p in selected.values()), parameter_fingerprint(selected))

    def _featurize(self, data: Any) -> torch.Tensor:
        if self._featurizer is not None:
            return self._featurizer(data, batch_size=self.batch_size)
        if self.kind in EMBEDDING_KINDS:
            return embedding_features(self._model, data, self.kind, self.layers, task=self.task, batch_size=self.batch_size)
        return gradient_features(self._model, data, self.kind, params=self.params, task=self.task, batch_size=self.batch_size)

    def _gathered_features(self, trainer: L.Trainer, examples: ExampleSet) -> torch.Tensor:
        """Features of a whole example set: each rank featurizes positions ``rank::world`` (padded by
        repetition to equal length, as ``all_gather`` needs) and the shards are interleaved back."""
        world, rank, n = trainer.world_size, trainer.global_rank, len(examples)
        positions = torch.arange(rank, n, world)
        per_rank = -(-n // world)
        filler = positions[-1:] if len(positions) else torch.zeros(1, dtype=torch.long)
        positions = torch.cat([positions, filler.repeat(per_rank - len(positions))])
        local = self._featurize(examples.loader(positions, self.batch_size)).to(self._storage_dtype())
        if world == 1:
            return local
        gathered = trainer.strategy.all_gather(local.to(trainer.strategy.root_device)).cpu()
        order = torch.arange(n)
        return gathered[order % world, order // world]

    def _request(self, spec: FeatureSpec) -> dict[str, Any]:
        """What the stored features of a checkpoint answer; a stored entry is reused only for an equal one."""
        return {
            **spec.to_dict(),
            "kernel": self.kernel,
            "layers": self.layers,
            "featurizer_options": self.featurizer_options,
            "dtype": str(self._storage_dtype()),
            "reference": self._reference.describe(),
            "query": self._query.describe(),
            "library_version": __version__,
        }

    def _checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        with preserved_training_state(pl_module):
            spec = self._spec()
            request = self._request(spec)
            name = f"epoch={epoch:04d}-{spec.parameters}"
            stored: dict[str, Any] = {}

            def load() -> bool:
                if not self.overwrite_store:
                    stored.update(self._store.load(name, request) or {})
                return bool(stored)

            reused = _on_rank_zero(trainer, load)
            featurize_seconds = 0.0
            if not reused:
                started = time.perf_counter()
                reference, query = (self._gathered_features(trainer, examples) for examples in (self._reference, self._query))
                featurize_seconds = time.perf_counter() - started

                def save() -> None:
                    arrays = {
                        "reference_features": reference, "reference_labels": self._reference.labels, "reference_indices": self._reference.indices,
                        "query_features": query, "query_labels": self._query.labels, "query_indices": self._query.indices,
                        "query_logits": self._logits(self._query.loader(batch_size=self.batch_size)).float(),
                    }
                    stored.update(self._store.save(name, request, arrays, {"epoch": epoch, "step": trainer.global_step}, overwrite=self.overwrite_store))

                _on_rank_zero(trainer, save)

            media: list[Any] = []

            def evaluate() -> dict[str, Any]:
                fidelity, scores, table = self._evaluate(stored, spec, trainer)
                media[:] = [scores, table]
                return {"epoch": epoch, "step": trainer.global_step, **fidelity, "featurize_seconds": featurize_seconds,
                        "store_reused": reused, "parameters": spec.parameters}

            row = _on_rank_zero(trainer, evaluate)
        self.history.append(row)
        dashboards.log_scalars(trainer.loggers, row)
        if trainer.is_global_zero:
            for run in dashboards.wandb_runs(trainer.loggers):
                dashboards.log_checkpoint_media(run, self.history, *media[0], table=media[1])

    def _evaluate(self, stored: dict[str, Any], spec: FeatureSpec, trainer: L.Trainer) -> tuple[dict[str, Any], tuple, Any]:
        """Rank 0: fit the surrogate on the reference features and score it on the query set. Returns the
        fidelity figures, the paired (network, surrogate) scores and, for W&B, the attribution table."""
        started = time.perf_counter()
        reference, query = stored["reference_features"], stored["query_features"]
        labels, query_labels = torch.as_tensor(stored["reference_labels"]), torch.as_tensor(stored["query_labels"])
        network_logits = torch.as_tensor(stored["query_logits"])
        normalize = self.kind != "trntk0"
        options = dict(num_outputs=self._num_logits, **self.surrogate_options)
        with quiet_lightning():
            if len(reference) ** 2 * 4 <= self.memory_budget:  # the N×N training kernel fits: fit on it directly
                surrogate = fit_from_kernel(kernel_from_features(reference, normalize=normalize), labels, **options)
            else:  # stream kernel rows from the stored features
                surrogate = fit_from_features(reference, labels, normalize=normalize, spec=spec, **options)
        query_rows = kernel_from_features(query, reference, normalize=normalize)
        surrogate_logits = surrogate.predict(query_rows)
        fit_seconds = time.perf_counter() - started
        self.surrogate, self._surrogate_spec, self._train_features = surrogate, spec, reference
        metric = SurrogateFidelity(sync_on_compute=False)  # rank 0 holds the whole query set
        metric.update(network_logits, surrogate_logits, query_labels)
        fidelity = {key: float(value) for key, value in metric.compute().items()}
        fidelity.update(fit_seconds=fit_seconds, surrogate_converged=bool(surrogate.converged), num_train=len(reference), num_query=len(query))
        table = None
        if self.top_k and self.table_examples and dashboards.wandb_runs(trainer.loggers):
            table = self._attribution_table(query_rows, network_logits, surrogate_logits)
        return fidelity, fidelity_scores(network_logits, surrogate_logits, query_labels), table

    def _attribution_table(self, query_rows: torch.Tensor, network_logits: torch.Tensor, surrogate_logits: torch.Tensor) -> Any:
        positions = torch.arange(min(self.table_examples, len(self._query)))
        result = attribute(self.surrogate, query_kernel=query_rows[positions], top_k=min(self.top_k, len(self._reference)))
        ranked = {
            kind: (
                self._reference.indices[getattr(result, f"{kind}_indices")],
                getattr(result, f"{kind}_scores"),
                self._reference.inputs(getattr(result, f"{kind}_indices"), self.task),
                self._reference.labels[getattr(result, f"{kind}_indices").flatten()],
            )
            for kind in ("proponent", "opponent")
        }
        predicted = [predictions(logits[positions]) for logits in (network_logits, surrogate_logits)]
        return dashboards.attribution_table(
            self._query.indices[positions], self._query.inputs(positions, self.task), self._query.labels[positions], *predicted, ranked, self.image_shape
        )

    def _to_dataset_indices(self, result: Attribution) -> Attribution:
        mapped = {f"{kind}_indices": self._reference.indices[getattr(result, f"{kind}_indices")] for kind in ("proponent", "opponent", "similar")}
        return dataclasses.replace(result, **mapped)


def _on_rank_zero(trainer: L.Trainer, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and broadcast its (small) result; a failure there is raised on every rank
    instead of leaving the others waiting in a collective."""
    result, error = None, None
    if trainer.is_global_zero:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the other ranks have been told
            if trainer.world_size == 1:
                raise
            error = err
    result, message = trainer.strategy.broadcast((result, None if error is None else f"{type(error).__name__}: {error}"), src=0)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"NTKAttributionCallback failed on rank 0: {message}")
    return result
