"""The kernel-machine surrogate (kGLM): ``logits(x) = W κ(x, X_train) + b``, a ``LightningModule``.

It is fitted on the training labels with cross-entropy plus an L2 penalty ``α/2·‖W‖²`` (on the mean
loss, as in sklearn's ``SGDClassifier``) by an ordinary Lightning ``Trainer``. Its inputs are kernel
rows: a precomputed ``[N, N]`` matrix, or stored ``[N, C, K]`` / ``[N, K]`` features. With features the
training logits ``κ(X, X) Wᵀ = Φ (Φᵀ Wᵀ)`` are computed without forming any kernel row, so memory is
``O(N·C·K)`` and one pass costs ``O(N·C·K·outputs)`` instead of ``O(N²·C·K)``.

The optimiser is full-batch L-BFGS: the objective is convex and smooth, and on the digits problem
(1,300 training points) it reaches the optimum in a few seconds on a CPU, where SGD at the paper's
``α = 1e-4`` stops far from it, with a much lower Kendall-τ (SPEC §1).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .featurize import FeatureSpec
from .kernels import DEFAULT_BLOCK_SIZE, as_tensor, unit_rows

FORMULATIONS = ("multinomial", "ovr")
LBFGS_HISTORY = 100  # curvature pairs kept: the objective is ill-conditioned at small α; 100 halves the evaluations of 20
NORMALISED_TOLERANCE = 1e-3  # a cosine kernel has a unit diagonal and |κ| ≤ 1, up to float32 rounding


def check_finite(values: torch.Tensor, name: str) -> None:
    if not torch.isfinite(values).all():
        raise ValueError(
            f"The {name} holds NaN or inf. Recompute it from finite features (an example whose gradient is zero "
            "has no cosine-normalised kernel: check the model's gradients, or use the unnormalised kind trntk0)."
        )


def _fitting_tensor(values: Any) -> torch.Tensor:
    """``values`` in the precision the surrogate is fitted in: float64 stays float64, the rest float32."""
    tensor = as_tensor(values)
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def flat_unit_features(features: Any, normalize: bool) -> torch.Tensor:
    """Features flattened to ``[N, C·K]``, each row scaled to unit norm when ``normalize``: then
    ``κ = Φ Φᵀ`` is the cosine-normalised kernel."""
    flat = _fitting_tensor(features).reshape(features.shape[0], -1)
    check_finite(flat, "feature array")
    if normalize:
        flat = unit_rows(flat)
    return flat


class KernelSurrogate(L.LightningModule):
    """Kernel general linear model over ``num_train`` training points with ``num_outputs`` logits.

    ``formulation="multinomial"`` (default): softmax cross-entropy. ``"ovr"``: the paper's one-vs-rest
    logistic regressions with sklearn's ``class_weight="balanced"`` weighting, i.e. the objective of
    ``SGDClassifier(loss="log_loss", class_weight="balanced")``: in the binary problem of class c,
    positives weigh ``N / (classes·N_c)`` and negatives 1 (for a single logit, each class its own weight).
    The weights come from :meth:`balance_classes`, which the ``fit_*`` functions call.
    A single-logit binary network gets a single-logit surrogate (``num_outputs=1``, binary cross-entropy).

    Batches are ``(kernel_rows [B, num_train], labels)``; a surrogate holding training features
    (``feature_shape`` given, see :func:`fit_from_features`) takes ``(training indices, labels)`` instead.
    The ``fit_*`` functions pass one batch of the whole training set, so that each epoch is one
    L-BFGS step of up to ``max_iter`` iterations on the exact objective, on one device.

    ``normalized`` records whether the training kernel was cosine-normalised (``None``: unknown):
    rows that cannot come from such a kernel (``|κ| > 1``) are then refused. ``spec`` is the
    :class:`FeatureSpec` of the training kernel's features, checked against queries that state theirs.

    After fitting, ``history`` holds the training objective at the start of each epoch, ``converged``
    whether it stopped changing (relative change ≤ ``tolerance`` over an epoch), and ``fit_record``
    the final objective, epochs run and convergence in short.
    """

    def __init__(
        self,
        num_train: int,
        num_outputs: int,
        alpha: float = 1e-4,
        formulation: str = "multinomial",
        max_iter: int = 50,
        tolerance: float = 1e-6,
        normalized: bool | None = None,
        feature_shape: tuple[int, ...] | None = None,
        spec: dict | None = None,
    ):
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"Unknown formulation {formulation!r}; choose one of {FORMULATIONS}.")
        if alpha < 0:
            raise ValueError(f"alpha is an L2 penalty and must be ≥ 0, got {alpha}.")
        if num_train <= 0 or num_outputs <= 0:
            raise ValueError(f"num_train and num_outputs must be positive, got {num_train} and {num_outputs}.")
        self.save_hyperparameters()
        self.weight = torch.nn.Parameter(torch.zeros(num_outputs, num_train))
        self.bias = torch.nn.Parameter(torch.zeros(num_outputs))
        self.register_buffer("class_weights", torch.ones(max(2, num_outputs)))
        features = None if feature_shape is None else torch.zeros(num_train, int(np.prod(feature_shape)))
        self.register_buffer("train_features", features)  # unit-norm (if normalized) flattened training features
        self.spec = FeatureSpec(**spec) if spec is not None else None
        self.history: list[float] = []
        self.converged = False

    @property
    def fit_record(self) -> dict[str, Any]:
        """The final training objective, the number of epochs run and whether it converged."""
        return {"loss": self.history[-1] if self.history else None, "epochs": len(self.history), "converged": self.converged}

    def balance_classes(self, labels: torch.Tensor) -> None:
        """Set the one-vs-rest class weights ``N / (classes·N_c)`` from all training labels."""
        counts = torch.bincount(labels, minlength=self.class_weights.numel()).double()
        self.class_weights.copy_(labels.numel() / (counts.numel() * counts.clamp_min(1)))

    # -- model -------------------------------------------------------------------------------------
    def _check_width(self, kernel_rows: torch.Tensor) -> None:
        if kernel_rows.ndim != 2 or kernel_rows.shape[1] != self.hparams.num_train:
            raise ValueError(
                f"Kernel rows must be [M, {self.hparams.num_train}] (one column per training point the surrogate "
                f"was fitted on), got {tuple(kernel_rows.shape)}."
            )

    def forward(self, kernel_rows: torch.Tensor) -> torch.Tensor:
        self._check_width(kernel_rows)
        return kernel_rows.to(self.weight.dtype) @ self.weight.T + self.bias

    def _feature_logits(self, unit_query: torch.Tensor) -> torch.Tensor:
        """``W κ(q, X)ᵀ + b`` as ``q (Φᵀ Wᵀ) + b``: no kernel row is formed."""
        return unit_query.to(self.weight.dtype) @ (self.train_features.T @ self.weight.T) + self.bias

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean (class-weighted for ``ovr``) cross-entropy plus ``α/2·‖W‖²``."""
        ovr = self.hparams.formulation == "ovr"
        if self.hparams.num_outputs == 1:
            weights = self.class_weights[labels] if ovr else None
            data = F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype), weight=weights)
        elif not ovr:
            data = F.cross_entropy(logits, labels)
        else:
            target = F.one_hot(labels, self.hparams.num_outputs).to(logits.dtype)
            weights = torch.where(target > 0, self.class_weights.to(logits.dtype), torch.ones_like(target))
            data = F.binary_cross_entropy_with_logits(logits, target, weight=weights, reduction="none").sum(1).mean()
        return data + 0.5 * self.hparams.alpha * self.weight.pow(2).sum()

    # -- Lightning ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.history, self.converged = [], False

    def on_train_epoch_start(self) -> None:
        self._first_evaluations: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        if self.train_features is not None:
            logits = self._feature_logits(self.train_features)[inputs]
        else:
            logits = self(inputs)
        loss = self.loss(logits, labels)
        # L-BFGS evaluates its batch several times per step; its first evaluation is the epoch's start.
        self._first_evaluations.setdefault(batch_idx, float(loss.detach()))
        return loss

    def on_train_epoch_end(self) -> None:
        objective = float(np.mean(list(self._first_evaluations.values())))
        if self.history:
            change = abs(self.history[-1] - objective) / max(1.0, abs(objective))
            self.converged = change <= self.hparams.tolerance
        self.history.append(objective)
        self.log("surrogate/train_loss", objective, prog_bar=True)  # once per epoch: L-BFGS evaluates many times
        if self.converged:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return torch.optim.LBFGS(
            self.parameters(), max_iter=self.hparams.max_iter, history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe",
            tolerance_grad=1e-9, tolerance_change=1e-12,
        )

    # -- inference ---------------------------------------------------------------------------------
    def check_kernel_rows(self, kernel_rows: torch.Tensor, spec: FeatureSpec | None = None) -> None:
        """Refuse rows that cannot come from the training kernel: wrong width, NaN, a normalisation or
        a feature spec other than the training kernel's."""
        self._check_width(kernel_rows)
        check_finite(kernel_rows, "test kernel")
        peak = float(kernel_rows.abs().max()) if kernel_rows.numel() else 0.0
        if self.hparams.normalized and peak > 1 + NORMALISED_TOLERANCE:
            raise ValueError(
                f"The surrogate was fitted on a cosine-normalised kernel (|κ| ≤ 1), but these rows reach {peak:.4g}: "
                "build the test kernel with the same normalisation (kernel_from_features(..., normalize=True))."
            )
        self._check_spec(spec)

    def _check_spec(self, spec: FeatureSpec | None) -> None:
        if spec is None or self.spec is None or spec == self.spec:
            return
        train, query = self.spec.to_dict(), spec.to_dict()
        differing = ", ".join(f"{k}: {query[k]!r} (training: {train[k]!r})" for k in train if train[k] != query[k])
        raise ValueError(
            f"The query was computed differently from the training features ({differing}). Featurize both sets with "
            "the same network state, kernel kind, projection_dim, projector and seed."
        )

    @torch.no_grad()
    def predict(self, kernel_rows: Any, spec: FeatureSpec | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
        """Logits ``[M, num_outputs]`` for test×train kernel rows built like the training kernel
        (a tensor or numpy array, memmaps included, read ``block_size`` rows at a time)."""
        blocks = []
        for start in range(0, max(1, kernel_rows.shape[0]), block_size):
            rows = as_tensor(kernel_rows[start : start + block_size])
            self.check_kernel_rows(rows, spec)
            blocks.append(self(rows.to(self.weight.device)).cpu())
        return torch.cat(blocks)

    def unit_query_features(self, query_features: Any, spec: FeatureSpec | None = None) -> torch.Tensor:
        """Query features flattened and normalised as the training features were, after checking that
        they were computed the same way."""
        if self.train_features is None:
            raise ValueError("This surrogate was fitted from a kernel matrix, not features: pass kernel rows to predict().")
        self._check_spec(spec)
        expected = tuple(self.hparams.feature_shape)
        if tuple(query_features.shape[1:]) != expected:
            raise ValueError(
                f"Query features have per-example shape {tuple(query_features.shape[1:])}, the training features "
                f"{expected}: compute both with the same kernel kind, number of classes and projection_dim."
            )
        return flat_unit_features(query_features, bool(self.hparams.normalized)).to(self.weight.device)

    @torch.no_grad()
    def predict_from_features(self, query_features: Any, spec: FeatureSpec | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
        """Logits for query features ``[M, C, K]`` / ``[M, K]``, normalised as in training; the kernel rows
        against the stored training features are folded into one ``[C·K, num_outputs]`` product."""
        blocks = [
            self._feature_logits(self.unit_query_features(query_features[start : start + block_size], spec)).cpu()
            for start in range(0, max(1, query_features.shape[0]), block_size)
        ]
        return torch.cat(blocks)


def _labels(train_labels: Any, num_train: int, num_outputs: int | None) -> tuple[torch.Tensor, int]:
    labels = as_tensor(train_labels).flatten()
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"Labels must be integer class indices, got {labels.dtype}.")
    labels = labels.long()
    if labels.numel() != num_train:
        raise ValueError(
            f"Got {labels.numel()} labels for {num_train} training points: pass one label per row of the training kernel/features."
        )
    if labels.min() < 0:
        raise ValueError(f"Labels must be class indices ≥ 0, got {int(labels.min())}.")
    classes = int(labels.max()) + 1
    outputs = num_outputs if num_outputs is not None else max(classes, 2)
    limit = 2 if outputs == 1 else outputs
    if classes > limit:
        raise ValueError(
            f"Labels go up to {classes - 1}, but the surrogate has {outputs} output(s) ({limit} classes): "
            "pass num_outputs equal to the network's number of logits."
        )
    return labels, outputs


def _fit(surrogate: KernelSurrogate, inputs: torch.Tensor, labels: torch.Tensor, max_epochs: int | None, trainer_kwargs: dict | None) -> KernelSurrogate:
    surrogate.balance_classes(labels)
    # float64 data is fitted in float64: float32 L-BFGS stalls about 1e-4 (relative) above the optimum at small α.
    data = inputs if surrogate.train_features is None else surrogate.train_features
    precision = "64-true" if data.dtype == torch.float64 else "32-true"
    loader = DataLoader([(inputs, labels)], batch_size=None)  # one full batch, passed as it is
    options = dict(
        max_epochs=max_epochs or 100, accelerator="auto", devices=1, precision=precision, logger=False, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(trainer_kwargs or {})
    L.Trainer(**options).fit(surrogate, loader)
    return surrogate


def fit_from_kernel(
    train_kernel: Any,
    train_labels: Any,
    *,
    num_outputs: int | None = None,
    alpha: float = 1e-4,
    formulation: str = "multinomial",
    max_epochs: int | None = None,
    trainer_kwargs: dict | None = None,
    spec: FeatureSpec | None = None,
    **options,
) -> KernelSurrogate:
    """Fit a surrogate on a precomputed ``[N, N]`` training kernel.

    ``num_outputs`` defaults to the number of classes in the labels (at least 2); pass 1 for a
    single-logit binary network. Each epoch is one full-batch L-BFGS step of up to ``max_iter``
    iterations; fitting stops once the objective changes by less than ``tolerance`` (relative) over an
    epoch, or after ``max_epochs`` (default 100). ``trainer_kwargs`` go to the ``Trainer``, ``options`` to :class:`KernelSurrogate`. Whether the
    kernel is cosine-normalised is read off its diagonal and enforced on test rows.
    """
    train_kernel = _fitting_tensor(train_kernel)
    if train_kernel.ndim != 2 or train_kernel.shape[0] != train_kernel.shape[1] or train_kernel.shape[0] == 0:
        raise ValueError(f"The training kernel must be a square [N, N] matrix, got {tuple(train_kernel.shape)}.")
    check_finite(train_kernel, "training kernel")
    labels, outputs = _labels(train_labels, train_kernel.shape[0], num_outputs)
    diagonal = train_kernel.diagonal()
    normalized = bool(
        (diagonal - 1).abs().max() <= NORMALISED_TOLERANCE and train_kernel.abs().max() <= 1 + NORMALISED_TOLERANCE
    )
    surrogate = KernelSurrogate(
        train_kernel.shape[0], outputs, alpha, formulation, normalized=normalized,
        spec=spec.to_dict() if spec is not None else None, **options,
    )
    return _fit(surrogate, train_kernel, labels, max_epochs, trainer_kwargs)


def fit_from_features(
    train_features: Any,
    train_labels: Any,
    *,
    normalize: bool = True,
    spec: FeatureSpec | None = None,
    num_outputs: int | None = None,
    alpha: float = 1e-4,
    formulation: str = "multinomial",
    max_epochs: int | None = None,
    trainer_kwargs: dict | None = None,
    **options,
) -> KernelSurrogate:
    """Fit a surrogate on the kernel of training features ``[N, C, K]`` or ``[N, K]`` (a tensor or a
    numpy array, memmaps included) without forming it: memory ``O(N·C·K)``. ``normalize`` chooses the
    cosine-normalised kernel (trNTK, pNTK) or the raw one (trNTK⁰). The surrogate keeps the
    (normalised) features; query logits then come from :meth:`KernelSurrogate.predict_from_features`,
    which refuses queries whose ``spec`` differs. Other arguments as in :func:`fit_from_kernel`.
    """
    if len(getattr(train_features, "shape", ())) not in (2, 3) or train_features.shape[0] == 0:
        raise ValueError(
            f"Training features must be a non-empty [N, K] or [N, C, K] array, got shape {getattr(train_features, 'shape', None)}."
        )
    num_train = train_features.shape[0]
    labels, outputs = _labels(train_labels, num_train, num_outputs)
    surrogate = KernelSurrogate(
        num_train, outputs, alpha, formulation, normalized=normalize,
        feature_shape=tuple(train_features.shape[1:]), spec=spec.to_dict() if spec is not None else None, **options,
    )
    surrogate.train_features = flat_unit_features(train_features, normalize)
    return _fit(surrogate, torch.arange(num_train), labels, max_epochs, trainer_kwargs)
