"""``NTKAttributionCallback``: how faithful an NTK surrogate of the network is, checkpoint by checkpoint.

The callback only schedules, shards and logs: at each scheduled checkpoint it runs the stages of a
:class:`~lightning_ntk.pipeline.FidelityPipeline` on fixed, seeded subsets of the training
(reference) and validation (query) data, with featurization sharded over the strategy's ranks and
gathered, the feature store, fit and score on rank 0, and the record broadcast and logged. It leaves
the training run untouched: it iterates its own copies of the subsets, never the trainer's loaders,
and restores RNG states, module modes, ``requires_grad`` flags and ``.grad`` buffers afterwards, so
the trained weights are bit-identical with and without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from tqdm.auto import tqdm

from . import dashboards
from .attribution import Attribution, attribute, suspicious
from .config import ProjectionConfig, StoreConfig, SubsetConfig, SurrogateConfig, refuse_moved_options
from .errors import LabelError
from .featurize import model_device_dtype, retained_heap
from .metrics import predictions
from .pipeline import ARRAYS, Checkpoint, CheckpointFeatures, CheckpointRecord, ExampleSet, FidelityPipeline, describe_params, entry_name, example_set
from .jacobian import DEFAULT_MEMORY_BUDGET
from .registry import get_kernel
from .store import FeatureStore, StoreError, StoreMismatchError
from .surrogate import KernelSurrogate
from .task import Task

DEFAULT_BUDGET = 0.25
PROBE_EXAMPLES = 32  # featurized before training to estimate a checkpoint's cost


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


def _trainer_source(name: str, loaders: Any) -> Any:
    """The trainer's single train/validation DataLoader, or an error that says what to pass instead."""
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    if not isinstance(loader, torch.utils.data.DataLoader):
        option = "train_data" if name == "reference" else "query_data"
        kind = "train" if name == "reference" else "validation"
        raise ValueError(
            f"NTKAttributionCallback found no {name} set: the trainer has no single {kind} DataLoader (got "
            f"{type(loader).__name__}). Pass {option}=... (a Dataset, DataLoader or (inputs, labels) tensors)."
        )
    return loader


class NTKAttributionCallback(L.Callback):
    """Fit an NTK kernel-machine surrogate of the network at scheduled epochs, measure its fidelity,
    attribute predictions to training examples, and log it all.

    Args:
        kernel: a registered kernel name (:mod:`lightning_ntk.registry`): ``"proj_trntk"`` (default),
            ``"proj_trntk0"``, ``"proj_pntk"``, the exact ``"trntk"``, ``"trntk0"``, ``"pntk"`` (small
            models only), ``"em"`` or ``"ck"``.
        projection, subsets, surrogate, store: the stages' options (:mod:`lightning_ntk.config`
            dataclasses, or dicts of their fields).
        budget: the share of the training time the checkpoints may take (default 0.25), which decides the
            schedule unless ``every_n_epochs`` or ``epochs`` is given: the callback times the training epochs
            and its checkpoints as the run goes (the first estimate from featurizing a few examples before
            training) and takes a checkpoint at an epoch's end only while the time it has spent, that
            checkpoint and the one at the fit's end stay within ``budget`` times the time trained so far.
            One log line before the first checkpoint says what a checkpoint costs in epochs and how often
            that allows one. ``None``: no budget (every epoch, unless ``every_n_epochs``/``epochs`` say otherwise).
        every_n_epochs, epochs, at_fit_end: an explicit schedule, obeyed exactly (0-based epochs; override
            :meth:`should_featurize` for others). A fit-end checkpoint is skipped when the weights have
            not changed since the last one. Nothing runs under ``fast_dev_run``.
        train_data, query_data: the reference and query sets (Dataset, DataLoader or tensors); default
            the trainer's train and validation DataLoaders' datasets.
        module: name of the submodule that returns the logits (default: the LightningModule itself).
        params: the parameters whose gradients define the kernel (a glob such as ``"head.*"``, or a list
            of names; default every trainable one).
        layers: the layers whose outputs the ``em`` kernel concatenates.
        task: how to read a batch (:class:`~lightning_ntk.task.Task`): its inputs, its labels (class
            indices), the logits in the model's output, e.g. ``Task(inputs=lambda b: b["pixels"],
            labels=lambda b: b["target"])``. The default takes ``(inputs, labels)`` tuples, and dicts with
            ``labels`` whose other keys are the model's keyword arguments (Hugging Face batches).
        memory_budget: the bytes the stages may hold at once (the kernel is streamed beyond it).
        top_k, table_examples, image_shape: attributions logged per checkpoint (``top_k=0``: none);
            ``image_shape`` shows inputs as images in them (default: the datamodule's ``image_shape``
            attribute, if it has one).
        ensemble: how many checkpoints, spread over the run, attributions average their scores over (the
            first, the latest and evenly spaced ones between; 1: the latest only). Averaging over checkpoints
            predicts retraining better than the last one alone; each kept checkpoint holds its surrogate, its
            query kernel rows and a CPU copy of the network's weights (for :meth:`attribute` on new inputs).
        name: tells several callbacks of one Trainer apart: their states in Lightning checkpoints, and
            their logged metrics (``ntk/<name>/...`` instead of ``ntk/...``).

    Example::

        ntk = NTKAttributionCallback()                  # proj_trntk, K = 1,024, within 25% of training time
        trainer = L.Trainer(max_epochs=10, callbacks=[ntk])
        trainer.fit(model, datamodule=data)             # batches (inputs, labels); forward returns [B, C] logits
        print(ntk.history[-1].kendall_tau)              # how faithful the kernel machine is
        explained = ntk.attribute(next(iter(data.val_dataloader())))  # training examples behind each prediction

    Cost and disk: a checkpoint featurizes the reference and query subsets (1,000 + 500 examples by
    default) with C backward passes per example for C classes, so on a small data set one checkpoint
    can cost more than an epoch; the default ``budget`` spaces them accordingly (an explicit schedule
    is obeyed, and the log line says what it will cost). Each checkpoint's features are stored on disk
    (about (N_ref + N_query)·C·K·2 bytes in float16: 31 MB with the defaults and 10 classes) in the
    run's log folder; the store keeps the entries the attribution ensemble needs (see
    :class:`~lightning_ntk.config.StoreConfig`) and its size is logged.
    """

    @refuse_moved_options()
    def __init__(
        self,
        kernel: str = "proj_trntk",
        projection: ProjectionConfig | None = None,
        subsets: SubsetConfig | None = None,
        surrogate: SurrogateConfig | None = None,
        store: StoreConfig | None = None,
        budget: float | None = DEFAULT_BUDGET,
        every_n_epochs: int | None = None,
        epochs: list[int] | None = None,
        at_fit_end: bool = True,
        train_data: Any = None,
        query_data: Any = None,
        module: str | None = None,
        params: str | list[str] | None = None,
        layers: list[str] | None = None,
        task: Task | None = None,
        top_k: int = 5,
        table_examples: int = 8,
        image_shape: list[int] | None = None,
        ensemble: int = 4,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        name: str | None = None,
    ):
        self.kernel = get_kernel(kernel)
        if not self.kernel.scalar:
            raise ValueError(f"The {self.kernel.name} is a C×C block per pair, not a kernel a surrogate can use; choose proj_trntk or trntk.")
        self.projection = ProjectionConfig.of(projection)
        self.subsets = SubsetConfig.of(subsets)
        self.surrogate_config = SurrogateConfig.of(surrogate)
        self.store_config = StoreConfig.of(store)
        if every_n_epochs is not None and (isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be a positive integer or None, got {every_n_epochs!r}.")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf):
            raise ValueError(f"budget must be a share of the training time > 0 (e.g. 0.25) or None, got {budget!r}.")
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs or ()):
            raise ValueError(f"epochs must be 0-based epoch numbers (integers ≥ 0), got {epochs!r}.")
        for option, value in (("top_k", top_k), ("table_examples", table_examples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{option} must be an integer ≥ 0 (0 turns attributions off), got {value!r}.")
        if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
            raise ValueError(f"ensemble must be a positive integer (1: the latest checkpoint only), got {ensemble!r}.")
        self.ensemble = ensemble
        self.every_n_epochs, self.epochs, self.at_fit_end = every_n_epochs, set(epochs or ()), at_fit_end
        self.budget, self._explicit = budget, every_n_epochs is not None or epochs is not None
        self.train_data, self.query_data = train_data, query_data
        self.module, self.params, self.layers, self.task = module, params, layers, task or Task()
        self.top_k, self.table_examples, self.image_shape = top_k, table_examples, image_shape
        self.memory_budget, self.name = memory_budget, name
        self.prefix = dashboards.PREFIX + (f"{name}/" if name else "")
        # Under ddp_spawn the fit runs in child processes: rank 0 hands its results back through this file.
        self._creator = os.getpid()
        self._handoff = Path(tempfile.gettempdir()) / f"lightning_ntk-{uuid.uuid4().hex}.pt"
        # not left behind when the results are never read: removed when this callback is collected or, at the latest,
        # when the interpreter exits (a finalizer is not pickled, so the spawned processes hold none)
        weakref.finalize(self, _remove_handoff, self._handoff)
        self._resumed: dict[str, Any] | None = None  # the state a resumed fit brought back
        self._foreign: dict[str, Any] = {}  # states of other NTKAttributionCallbacks in the resumed checkpoint
        self._run = uuid.uuid4().hex  # tags the store entries this run writes, so that keep_last deletes only its own
        self._history: list[CheckpointRecord] = []
        self.pipeline: FidelityPipeline | None = None
        self._last: Checkpoint | None = None
        self._kept: list[Checkpoint] = []  # rank 0: the checkpoints attributions average over, the latest last
        self._store: FeatureStore | None = None
        self._reference: ExampleSet | None = None
        self._query: ExampleSet | None = None
        self._epoch_end_step = -1
        self._cost: CheckpointCost | None = None
        self._written: dict[int, str] = {}  # rank 0: the store entries this fit wrote, by epoch
        self._image_shape = image_shape

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kernel=self.kernel.name, name=self.name)

    @property
    def history(self) -> list[CheckpointRecord]:
        """One record per checkpoint taken in this fit (and, when resumed, before it)."""
        self._take_handoff()
        return self._history

    @property
    def surrogate(self) -> KernelSurrogate | None:
        """The latest checkpoint's surrogate (on rank 0), None before the first checkpoint."""
        self._take_handoff()
        return None if self._last is None else self._last.surrogate

    def _options(self) -> dict[str, Any]:
        """What decides the rows of the history: a resumed history is only continued with the same (the
        reference and query sets by their size and a digest of their examples, once read)."""
        surrogate = {"alpha": self.surrogate_config.alpha, "formulation": self.surrogate_config.formulation}
        return {"kernel": self.kernel.name, "projection": self.projection.to_dict(), "subsets": self.subsets.to_dict(), "module": self.module,
                "params": describe_params(self.params), "layers": None if self.layers is None else list(self.layers), "surrogate": surrogate,
                **{examples.name: examples.describe() for examples in (self._reference, self._query) if examples is not None}}

    # -- schedule --------------------------------------------------------------------------------
    def should_featurize(self, trainer: L.Trainer) -> bool:
        """Whether to take a checkpoint at the end of the current training epoch: the explicit schedule's
        rule, or whether it and the fit end's checkpoint stay within the budget (decided on rank 0)."""
        epoch = trainer.current_epoch
        if self._explicit or self.budget is None:
            return self._scheduled(epoch)
        if self.at_fit_end and epoch + 1 == trainer.max_epochs:  # the fit end takes it
            return False
        cost = self._cost
        reserve = cost.checkpoint if self.at_fit_end else 0.0
        affordable = cost.spent + cost.checkpoint + reserve <= self.budget * cost.training_seconds()
        return bool(trainer.strategy.broadcast(affordable, src=0)) if trainer.world_size > 1 else affordable

    def _scheduled(self, epoch: int) -> bool:
        """The explicit schedule (every epoch without one and without a budget)."""
        if not self._explicit:
            return True
        return epoch in self.epochs or (self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0)

    def _schedule_line(self, trainer: L.Trainer) -> str:
        """What a checkpoint costs against an epoch, and what the schedule makes of it."""
        cost = self._cost
        epoch_seconds = cost.training_seconds() / max(cost.epochs, 1)
        ratio = cost.checkpoint / max(epoch_seconds, 1e-9)  # a checkpoint, in epochs
        spacing = math.ceil(ratio / (self.budget or DEFAULT_BUDGET))
        line = f"NTK checkpoints: each ≈ {cost.checkpoint:.3g} s ({cost.source}) ≈ {ratio:.2g} epochs of {epoch_seconds:.3g} s; "
        if self.budget is not None and not self._explicit:
            line += f"one every {spacing} epochs keeps the callback under {self.budget:.0%} of training, with one at the fit's end."
            epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
            if epochs and self.at_fit_end and ratio > self.budget * epochs:
                line += (f" This {epochs}-epoch run is too short for even that one: it adds ≈ {ratio / epochs:.0%}. Smaller subsets "
                         "(subsets={'max_train_examples': ..., 'max_query_examples': ...}) make checkpoints cheaper.")
            return line
        planned = self._planned(trainer)
        if planned is not None:
            count, epochs = planned
            share = f"this schedule ({count} checkpoint(s) in {epochs} epochs) makes the callback ≈ {count * ratio / epochs:.0%} of training"
        elif self.every_n_epochs:  # a run of unknown length
            share = f"every_n_epochs={self.every_n_epochs} makes the callback ≈ {ratio / self.every_n_epochs:.0%} of training"
        else:
            share = f"the {len(self.epochs)} listed epoch(s) are obeyed"
        return line + f"{share}; budget={self.budget or DEFAULT_BUDGET} without an explicit schedule would take one every {spacing} epochs."

    def _planned(self, trainer: L.Trainer) -> tuple[int, int] | None:
        """How many checkpoints the explicit schedule takes in the run's epochs (the fit end's included), if it has a known length."""
        epochs = trainer.max_epochs
        if epochs in (None, -1):
            return None
        count = sum(self._scheduled(e) for e in range(epochs))
        return count + (self.at_fit_end and not self._scheduled(epochs - 1)), epochs

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit starts a new history; a resumed one gets its own back in load_state_dict
            self._history, self._last, self._kept, self._resumed, self._foreign, self._written = [], None, [], None, {}, {}
            self._run = uuid.uuid4().hex

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resolve the model and the data, and check everything that can fail before training does."""
        if trainer.fast_dev_run:
            return
        started = time.perf_counter()
        model = self._logits_module(pl_module)
        self._store = FeatureStore(self.store_config.dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "ntk_store"))
        if trainer.is_global_zero:
            with _store_options_named():
                self._store.check_writable()
        with preserved_training_state(pl_module):
            self._reference = example_set(
                "reference", self.train_data if self.train_data is not None else _trainer_source("reference", trainer.train_dataloader),
                self.subsets.max_train_examples, self.subsets.seed,
            )
            self._query = example_set(
                "query", self.query_data if self.query_data is not None else _trainer_source("query", trainer.val_dataloaders),
                self.subsets.max_query_examples, self.subsets.seed,
            )
            for examples in (self._reference, self._query):
                examples.scan(self.task, self.subsets.batch_size)
            self._check_resumed(trainer)
            self.pipeline = FidelityPipeline(
                model, self.kernel.name, self.projection, self.surrogate_config, params=self.params, layers=self.layers, task=self.task,
                storage_dtype=self.store_config.storage_dtype(self.kernel.projected, model_device_dtype(model)[1]), batch_size=self.subsets.batch_size, memory_budget=self.memory_budget,
            )
            try:
                self.pipeline.check(self._reference, self._query)
            except (TypeError, ValueError) as err:
                option = " (train_data=/query_data=)" if isinstance(err, LabelError) else ""  # the data's fault, not the module's
                hint = "" if self.module is not None or option else " If a submodule returns the logits, pass module='<its name>' to the callback."
                raise type(err)(f"NTKAttributionCallback: {err}{option}{hint}") from err
            self._image_shape = self._resolve_image_shape(trainer)
            self._cost = self._estimate_cost(trainer, started)
        if trainer.is_global_zero:
            for run in dashboards.wandb_runs(trainer.loggers):
                dashboards.define_epoch_axis(run)

    def _estimate_cost(self, trainer: L.Trainer, started: float) -> CheckpointCost:
        """A checkpoint's seconds estimated from featurizing a few reference examples (its featurization
        dominates; each rank featurizes its share), with this hook's own time as spent."""
        probe = torch.arange(min(PROBE_EXAMPLES, len(self._reference)))
        timer = time.perf_counter()
        with retained_heap(model_device_dtype(self.pipeline.model)[0]):  # as a checkpoint featurizes
            self.pipeline.features(self._reference.loader(probe, self.subsets.batch_size))
        per_example = (time.perf_counter() - timer) / len(probe)
        examples = len(self._reference) + len(self._query)
        estimate = per_example * -(-examples // trainer.world_size)
        cost = CheckpointCost(started, estimate, f"estimated from featurizing {len(probe)} of its {examples} examples")
        cost.spent = time.perf_counter() - started
        return cost

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end_step = trainer.global_step
        if self.pipeline is None:
            return
        self._cost.epochs += 1
        if self._cost.epochs == 1:
            rank_zero_info(self._schedule_line(trainer))
        if self.should_featurize(trainer):
            self._timed_checkpoint(trainer, pl_module, trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pipeline is None or not self.at_fit_end or (self._history and self._history[-1].step == trainer.global_step):
            return
        # After the last epoch, current_epoch already counts it; a fit stopped mid-epoch is in current_epoch.
        epoch = trainer.current_epoch - 1 if trainer.global_step == self._epoch_end_step else trainer.current_epoch
        self._timed_checkpoint(trainer, pl_module, max(epoch, 0))

    def _timed_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """A checkpoint, its seconds counted as the callback's (and as the next checkpoint's estimate unless it was read back)."""
        started = time.perf_counter()
        self._checkpoint(trainer, pl_module, epoch)
        seconds = time.perf_counter() - started
        self._cost.spent += seconds
        if not self._history[-1].store_reused:
            self._cost.checkpoint, self._cost.source = seconds, f"measured at epoch {epoch}"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and os.getpid() != self._creator and trainer.is_global_zero:  # a spawned process: hand back
            torch.save({"history": self._history, "last": self._last, "kept": self._kept, "pipeline": self.pipeline}, self._handoff)

    def _take_handoff(self) -> None:
        """In the process that built the callback, take over what a spawned rank 0 handed back."""
        if os.getpid() == self._creator and self._handoff.exists():
            state = torch.load(self._handoff, weights_only=False)
            self._handoff.unlink()
            self._history, self._last, self._kept, self.pipeline = state["history"], state["last"], state["kept"], state["pipeline"]

    def state_dict(self) -> dict[str, Any]:
        return {"history": [row.to_dict() for row in self._history], "options": self._options(), "run": self._run}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = [CheckpointRecord(**row) for row in state_dict["history"]]
        self._resumed = state_dict
        self._run = state_dict.get("run", self._run)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Note the states of this kind of callback that no callback of this trainer takes (saved under another
        kernel or name): resuming without them would silently drop their history."""
        taken = {callback.state_key for callback in trainer.callbacks}
        self._foreign = {key: state for key, state in (checkpoint.get("callbacks") or {}).items()
                         if isinstance(key, str) and key.startswith(NTKAttributionCallback.__qualname__ + "{") and key not in taken}

    def _check_resumed(self, trainer: L.Trainer) -> None:
        """Continue a resumed history only with the options and data its rows were computed with, and say so
        when a resumed fit brings no history back."""
        current = self._options()
        if self._resumed is None:
            if self._foreign:
                found = "; ".join(f"{key} ({_differing(state.get('options') or {}, current) or 'other name'})" for key, state in self._foreign.items())
                raise ValueError(
                    f"NTKAttributionCallback: the resumed checkpoint holds a fidelity history under another key: {found}; this callback's "
                    f"key is {self.state_key}, so that history would be dropped. Resume with the same kernel, name and options, or "
                    "start a new fit without ckpt_path."
                )
            if trainer.ckpt_path is not None and trainer.current_epoch > 0:
                rank_zero_warn(
                    f"NTKAttributionCallback: the run resumes at epoch {trainer.current_epoch} from a checkpoint that holds no fidelity "
                    f"history (it was written without this callback), so the history starts at epoch {trainer.current_epoch}."
                )
            return
        saved = self._resumed.get("options") or {}
        differing = _differing(saved, current)
        if differing:
            raise ValueError(
                f"NTKAttributionCallback: the resumed checkpoint's fidelity history was computed with other options ({differing}), "
                "so its rows would not compare with new ones. Resume with the same options and data, or start a new fit without ckpt_path."
            )
        unrecorded = [key for key in current if key not in saved]
        if unrecorded:
            rank_zero_warn(
                f"NTKAttributionCallback: the resumed checkpoint was written by an earlier version of lightning-ntk that did not record "
                f"{', '.join(unrecorded)}; the history continues, but its rows compare with new ones only if these are unchanged. "
                "If they changed, start a new fit without ckpt_path."
            )

    def _resolve_image_shape(self, trainer: L.Trainer) -> list[int] | None:
        """The option's image shape, checked against an input; else the datamodule's, if it fits one."""
        example = self._reference.inputs(torch.arange(1), self.task)
        size = example[0].numel() if isinstance(example, torch.Tensor) else None
        if self.image_shape is None:
            shape = _datamodule_image_shape(trainer)
            return shape if shape is not None and size == math.prod(shape) else None
        if size != math.prod(self.image_shape):
            raise ValueError(
                f"image_shape={list(self.image_shape)} holds {math.prod(self.image_shape)} values, but an example's input "
                f"{'holds ' + str(size) + ' values' if size is not None else 'is not one tensor'}. Pass the shape of one input "
                "(e.g. [1, 28, 28]), or image_shape=None to show inputs as text."
            )
        return list(self.image_shape)

    # -- attribution queries -----------------------------------------------------------------------
    def attribute(self, batch: Any, top_k: int = 5, target: torch.Tensor | None = None, method: str = "influence") -> Attribution:
        """Explain the network's predictions on ``batch`` (a batch as the data loaders yield it, or model
        inputs): the reference examples whose removal would most lower (proponents) or raise (opponents) the
        margin of the network's predicted class (or of ``target``), averaged over the kept checkpoints
        (``ensemble``), as positions in the reference dataset; ``method="representer"`` ranks the latest
        surrogate's logit contributions instead."""
        self._take_handoff()
        if isinstance(batch, list) and all(isinstance(t, torch.Tensor) for t in batch) and not _is_inputs_and_labels(batch):
            raise TypeError(
                f"attribute() got a list of {len(batch)} tensors: pass the examples stacked into one tensor "
                "(torch.stack(examples)), or a batch as the data loaders yield it, e.g. a tuple (inputs, labels)."
            )
        if self._last is None:
            raise RuntimeError(
                "NTKAttributionCallback has no surrogate yet: it is fitted at the first scheduled checkpoint (on rank 0 "
                "under DDP). Call attribute() after trainer.fit with at_fit_end=True or a scheduled epoch."
            )
        members = self._kept if method == "influence" else [self._last]
        with preserved_training_state(self.pipeline.model):
            return self.pipeline.attribute(members, self.task.get_inputs(batch), top_k, target, method)

    def suspicious(self, top_k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``top_k`` reference examples most likely mislabelled at the latest checkpoint (positions in the
        reference dataset) and their scores, the surrogate's loss on each (see :func:`lightning_ntk.attribution.suspicious`)."""
        self._take_handoff()
        if self._last is None:
            raise RuntimeError("NTKAttributionCallback has no surrogate yet: it is fitted at the first scheduled checkpoint.")
        return self.pipeline.suspicious(self._last, top_k)

    # -- internals ---------------------------------------------------------------------------------
    def _logits_module(self, pl_module: L.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as err:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(f"module={self.module!r} is not a submodule of {type(pl_module).__name__}; its children are {names}.") from err

    def _gathered_features(self, trainer: L.Trainer, examples: ExampleSet, with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Features of a whole example set (and the network's logits on it, ``with_logits``): each rank
        featurizes positions ``rank::world`` (padded by repetition to equal length, as ``all_gather``
        needs) and the shards are interleaved back."""
        world, rank, n = trainer.world_size, trainer.global_rank, len(examples)
        positions = torch.arange(rank, n, world)
        per_rank = -(-n // world)
        filler = positions[-1:] if len(positions) else torch.zeros(1, dtype=torch.long)
        positions = torch.cat([positions, filler.repeat(per_rank - len(positions))])
        progress = _progress_label(trainer, examples.name)
        local = self.pipeline.features(examples.loader(positions, self.subsets.batch_size), progress=progress, with_logits=with_logits,
                                       name=f"{examples.name}_features")
        parts = local if with_logits else (local,)
        if world > 1:
            order = torch.arange(n)
            parts = tuple(trainer.strategy.all_gather(part.to(trainer.strategy.root_device, _common_dtype(trainer, part.dtype))).cpu()[order % world, order // world]
                          for part in parts)
        return parts if with_logits else parts[0]

    def _load(self, name: str, request: dict[str, Any]) -> dict[str, Any] | None:
        if self.store_config.overwrite:
            return None
        with _store_options_named():
            return self._store.load(name, request, required=ARRAYS)

    def _checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        pipeline = self.pipeline
        with preserved_training_state(pl_module):
            spec = pipeline.spec()
            request = pipeline.request(spec, self._reference, self._query)
            name = entry_name(f"epoch={epoch:04d}", request)
            # the checkpoint's arrays, as memory maps of the store, stay on rank 0 (None elsewhere): only whether they were found is broadcast
            stored, reused = _on_rank_zero(trainer, lambda: self._load(name, request) or {}, shared=bool)
            seconds = 0.0
            info = {"epoch": epoch, "step": trainer.global_step, "run": self._run}

            if not reused and trainer.world_size == 1:  # one process: the features go to the store as they are computed
                started = time.perf_counter()
                with _store_options_named(), self._store.writer(name, request, info, overwrite=self.store_config.overwrite) as writer:
                    pipeline.write_features(writer, self._reference, self._query, progress=lambda side: _progress_label(trainer, side))
                    stored = writer.publish()
                    self._wrote(epoch, name)
                seconds = time.perf_counter() - started
            elif not reused:
                started = time.perf_counter()
                with retained_heap(pl_module.device):  # one heap for both sides
                    reference = self._gathered_features(trainer, self._reference)
                    query, logits = self._gathered_features(trainer, self._query, with_logits=True)
                seconds = time.perf_counter() - started

                def save() -> dict[str, Any]:
                    features = CheckpointFeatures(reference, self._reference.labels, self._reference.indices, query, self._query.labels, self._query.indices, logits)
                    with _store_options_named():
                        saved = self._store.save(name, request, features.arrays(), info, overwrite=self.store_config.overwrite)
                        self._wrote(epoch, name)
                    return saved

                stored, _ = _on_rank_zero(trainer, save, shared=lambda saved: None)

            def evaluate(stored: dict[str, Any]) -> tuple[CheckpointRecord, list[Any]]:
                """The checkpoint's record (broadcast) and its media for the dashboards (rank 0's)."""
                with _fit_progress(trainer, self.surrogate_config.max_iter) as progress:
                    self._last = pipeline.evaluate(CheckpointFeatures.from_arrays(stored), spec, self._last, epoch=epoch, step=trainer.global_step,
                                                   featurize_seconds=seconds, store_reused=reused, progress=progress)
                kept = [c for c in self._kept if c.features.same_examples(self._last.features)]  # scores add up over the same examples
                held = {c.record.epoch for c in self._kept} | {epoch}
                self._kept = _spread(kept + [pipeline.keep_weights(self._last) if self.ensemble > 1 else self._last], self.ensemble)
                if self.store_config.keep_last == "ensemble":
                    self._release(held - {c.record.epoch for c in self._kept})
                return self._last.record, [pipeline.fidelity_scores(self._last), self._attribution_table(trainer), self._suspicious_table(trainer)]

            evaluated, record = _on_rank_zero(trainer, lambda: evaluate(stored), shared=lambda evaluated: evaluated[0])
        self._history.append(record)
        if trainer.is_global_zero:
            rank_zero_info(
                f"NTK fidelity at epoch {epoch}: Kendall-τ {record.kendall_tau:.3f}, agreement {record.agreement:.3f}, TAD "
                f"{100 * record.tad:+.2f} pp ({record.num_train} reference, {record.num_query} query examples); featurize "
                f"{record.featurize_seconds:.1f} s{' (reused from the store)' if record.store_reused else ''}, fit {record.fit_seconds:.1f} s "
                f"({record.fit_iterations} iterations{'' if record.surrogate_converged else ', not converged'}), score "
                f"{record.score_seconds:.1f} s; store {self._store.size_bytes() / 1e6:.0f} MB in {self._store.root}."
                f"{f' Warning: {record.warning}' if record.warning else ''}"
            )
        dashboards.log_scalars(trainer.loggers, record, self.prefix)
        if trainer.is_global_zero:
            scores, table, suspicious_table = evaluated[1]
            for run in dashboards.wandb_runs(trainer.loggers):
                dashboards.log_checkpoint_media(run, self._history, *scores, table=table, suspicious=suspicious_table, prefix=self.prefix)
            dashboards.log_history_plots(trainer.loggers, self._history, self.prefix)

    def _wrote(self, epoch: int, name: str) -> None:
        """Note a store entry this fit wrote (``keep_last="ensemble"`` deletes it once its checkpoint leaves the
        ensemble), and apply an integer ``keep_last`` to this run's entries."""
        if isinstance(self.store_config.keep_last, int):
            self._store.retain(self.store_config.keep_last, prefix="epoch=", info={"run": self._run})
        self._written[epoch] = name

    def _release(self, epochs: set[int]) -> None:
        """Delete the store entries this fit wrote for checkpoints that left the attribution ensemble."""
        for epoch in epochs:
            name = self._written.pop(epoch, None)
            if name is not None:
                self._store.delete(name)

    def _attribution_table(self, trainer: L.Trainer) -> Any:
        """The W&B table of the first query examples with their top-k proponents and opponents for the class
        the network predicted, averaged over the kept checkpoints (their stored query kernel rows)."""
        if not (self.top_k and self.table_examples and dashboards.wandb_runs(trainer.loggers)):
            return None
        checkpoint, reference, query = self._last, self._reference, self._query
        positions = torch.arange(min(self.table_examples, len(checkpoint.features.query_indices)))  # of the examples kept
        network_logits = checkpoint.features.query_logits[positions]
        result = attribute([c.surrogate for c in self._kept], query_kernel=[c.query_rows[positions] for c in self._kept],
                           network_logits=network_logits, top_k=min(self.top_k, len(reference)))
        ranked = {kind: self._reference_examples(getattr(result, f"{kind}_indices"), getattr(result, f"{kind}_scores")) for kind in ("proponent", "opponent")}
        predicted = [predictions(logits[positions]) for logits in (checkpoint.features.query_logits, checkpoint.surrogate_logits)]
        shown = query.positions_of(checkpoint.features.query_indices[positions])
        return dashboards.attribution_table(
            query.indices[shown], query.inputs(shown, self.task), query.labels[shown], *predicted, ranked, self._image_shape,
            self.task.text, explained=result.target, method=f"{result.method} over {len(self._kept)} checkpoint(s)",
        )

    def _suspicious_table(self, trainer: L.Trainer) -> Any:
        """The W&B table of the reference examples most likely mislabelled at this checkpoint."""
        if not (self.top_k and self.table_examples and dashboards.wandb_runs(trainer.loggers)):
            return None
        positions, losses = suspicious(self._last.surrogate, min(self.table_examples, len(self._last.features.reference_indices)))
        indices, scores, inputs, labels = self._reference_examples(positions[None], losses[None])
        return dashboards.suspicious_table(indices[0], inputs, labels, scores[0], self._image_shape, self.task.text)

    def _reference_examples(self, positions: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
        """Positions ``[M, k]`` of the latest checkpoint's reference examples as dataset indices, with their scores,
        inputs and labels."""
        indices = torch.as_tensor(self._last.features.reference_indices)[positions]
        shown = self._reference.positions_of(indices)
        return indices, scores, self._reference.inputs(shown, self.task), self._reference.labels[shown.flatten()]


@dataclasses.dataclass
class CheckpointCost:
    """Seconds of training against seconds of the callback, measured as the run goes, for the budget
    schedule. ``checkpoint``: the latest computed checkpoint's seconds; before the first, an estimate from
    featurizing a few examples (``source`` says which)."""

    started: float
    checkpoint: float
    source: str
    spent: float = 0.0
    epochs: int = 0

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.spent


def _progress_label(trainer: L.Trainer, side: str) -> str | bool:
    """The label of the featurization's progress bar for the ``side`` set, on rank 0 of a trainer that shows bars."""
    return f"NTK features ({side})" if trainer.progress_bar_callback is not None and trainer.is_global_zero else False


def _differing(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The options recorded with a saved history that differ from the current ones, in words (those it did not record are skipped)."""
    return "; ".join(f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}" for key in current if key in saved and saved[key] != current[key])


RANGES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # by range


def _common_dtype(trainer: L.Trainer, dtype: torch.dtype) -> torch.dtype:
    """The widest of the ranks' dtypes of a gathered array: a rank keeps features beyond float16's range wider
    (see :func:`~lightning_ntk.pipeline.storable`), and ``all_gather`` needs one dtype."""
    if dtype not in RANGES:
        return dtype
    widest = trainer.strategy.all_gather(torch.tensor(RANGES.index(dtype), device=trainer.strategy.root_device)).max()
    return RANGES[int(widest)]


def _spread(checkpoints: list[Checkpoint], size: int) -> list[Checkpoint]:
    """At most ``size`` of the checkpoints, spread over the run: while there are too many, the one between the
    two closest neighbours goes (never the first or the latest; with ``size`` 1, only the latest stays)."""
    checkpoints = list(checkpoints)
    while len(checkpoints) > size:
        if size == 1:
            return checkpoints[-1:]
        epochs = [c.record.epoch or 0 for c in checkpoints]
        drop = min(range(1, len(checkpoints) - 1), key=lambda i: epochs[i + 1] - epochs[i - 1])
        del checkpoints[drop]
    return checkpoints


@contextlib.contextmanager
def _fit_progress(trainer: L.Trainer, max_iter: int) -> Iterator[Callable[[int, float], None] | None]:
    """A progress bar for the surrogate's solver, below the trainer's own (none when it has none)."""
    if trainer.progress_bar_callback is None:
        yield None
        return
    bar = tqdm(total=max_iter, desc="NTK surrogate fit", leave=False, unit="it")

    def update(iteration: int, objective: float) -> None:
        bar.update(iteration - bar.n)
        bar.set_postfix(objective=f"{objective:.4g}", refresh=False)

    try:
        yield update
    finally:
        bar.close()


def _datamodule_image_shape(trainer: L.Trainer) -> list[int] | None:
    """The trainer's datamodule's ``image_shape`` attribute, when it is a shape (a list of ints)."""
    shape = getattr(trainer.datamodule, "image_shape", None)
    valid = isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    return list(shape) if valid else None


def _is_inputs_and_labels(batch: list[torch.Tensor]) -> bool:
    """Whether a list of tensors reads as a collated ``[inputs, labels]`` batch rather than a list of examples."""
    return len(batch) == 2 and batch[0].ndim >= 1 and batch[1].ndim == 1 and not batch[1].is_floating_point() and len(batch[0]) == len(batch[1])


@contextlib.contextmanager
def _store_options_named() -> Iterator[None]:
    """Add the callback's own options to the feature store's errors: the store knows only its folder."""
    try:
        yield
    except StoreMismatchError as err:
        raise StoreMismatchError(f"{err} To replace it, pass store={{'overwrite': True}} (StoreConfig(overwrite=True)).") from err
    except StoreError as err:
        raise StoreError(
            f"{err} The callback's options: store={{'dir': ...}} chooses the folder, store={{'keep_last': 1}} keeps only the "
            "newest checkpoint, store={'dtype': 'float16'} halves it, and smaller subsets={'max_train_examples': ...} or "
            "projection={'dim': ...} store less."
        ) from err


def _remove_handoff(path: Path) -> None:
    """Delete a hand-back file nobody read (a finalizer's, so it must not hold the callback)."""
    path.unlink(missing_ok=True)


def _on_rank_zero(trainer: L.Trainer, fn: Callable[[], Any], shared: Callable[[Any], Any] = lambda result: result) -> tuple[Any, Any]:
    """Run ``fn`` on rank 0 and broadcast ``shared(result)``, a small part of its result, to every rank: returns
    ``(result, shared(result))``, ``result`` being None on the other ranks. A failure on rank 0 is raised on every
    rank instead of leaving the others waiting in a collective."""
    result, common, error = None, None, None
    if trainer.is_global_zero:
        try:
            result = fn()
            common = shared(result)
        except Exception as err:  # re-raised below, after the other ranks have been told
            if trainer.world_size == 1:
                raise
            error = err
    common, message = trainer.strategy.broadcast((common, None if error is None else f"{type(error).__name__}: {error}"), src=0)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"NTKAttributionCallback failed on rank 0: {message}")
    return result, common
