"""What the fidelity tracking shows: scalars for every Lightning logger, and W&B media for W&B runs.

Every logger gets the ``ntk/*`` scalars against the epoch. A W&B run additionally gets an epoch axis
for them, a table of test examples with their top-k proponents and opponents (images for image-like
inputs, the decoded text of token inputs, their values otherwise), a scatter of network vs surrogate
probabilities and the fidelity history as a line plot. Loggers without media get the fidelity history
as a picture too: TensorBoard as a figure, a CSV logger as a PNG beside its ``metrics.csv`` (both drawn
with matplotlib, when installed). ``wandb`` is imported only when a W&B run is there to receive them.
"""

from __future__ import annotations

import math
import netrc
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map

PREFIX = "ntk/"
HISTORY_PLOT_METRICS = ("kendall_tau", "agreement", "surrogate_acc", "network_acc")
TABLE_COLUMNS = ("kendall_tau", "tad", "agreement", "surrogate_acc", "network_acc", "miss_overlap", "featurize_seconds", "fit_seconds")


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; otherwise online with a W&B login (API key or netrc entry), else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def log_scalars(loggers: Sequence[Any], record: Any, prefix: str = PREFIX) -> None:
    """Send a checkpoint record's figures to every Lightning logger as ``<prefix><name>``, with the
    epoch, at the record's step."""
    metrics = {prefix + key: value for key, value in record.scalars().items()}
    metrics["epoch"] = float(record.epoch)
    for logger in loggers:
        logger.log_metrics(metrics, step=record.step)


def wandb_runs(loggers: Sequence[Any]) -> list[Any]:
    """The W&B runs behind the trainer's ``WandbLogger``s (call on rank 0 only)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]


def define_epoch_axis(run: Any) -> None:
    """Plot every ``ntk/*`` metric of ``run`` against the epoch rather than the global step."""
    run.define_metric("epoch")
    run.define_metric(PREFIX + "*", step_metric="epoch")


def _split(inputs: Any) -> list[Any]:
    """One entry per example of a batch of inputs (tensor, dict or tuple of tensors)."""
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    return [tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, inputs) for i in range(len(leaves[0]))]


def _as_image(example: Any, image_shape: Sequence[int] | None) -> np.ndarray | None:
    """An ``[H, W]`` or ``[H, W, 3]`` array in [0, 1] if the example is image-like, else None."""
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        return None
    x = example.detach().float().cpu()
    if image_shape is not None:
        x = x.reshape(*image_shape)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
    elif x.ndim != 2:
        return None
    low, high = float(x.min()), float(x.max())
    return ((x - low) / (high - low if high > low else 1.0)).numpy()


def _as_text(example: Any, limit: int = 80) -> str:
    if isinstance(example, dict):
        text = " ".join(f"{k}={_as_text(v, limit)}" for k, v in example.items())
    elif isinstance(example, torch.Tensor):
        values = example.flatten()[:16].tolist()
        text = "[" + ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values) + (", …]" if example.numel() > 16 else "]")
    else:
        text = str(example)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_examples(
    inputs: Any, captions: Sequence[str], image_shape: Sequence[int] | None = None, text: Callable[[Any], str | None] | None = None
) -> list[Any]:
    """W&B cells for a batch of model inputs: the captioned ``text(example)`` when it gives one (e.g.
    :meth:`Task.text <lightning_ntk.task.Task.text>`, the decoded tokens), else ``wandb.Image`` for
    image-like examples (``[H, W]``, ``[1|3, H, W]``, or any tensor with ``image_shape``), else the
    captioned values."""
    import wandb

    cells = []
    for example, caption in zip(_split(inputs), captions):
        decoded = text(example) if text is not None else None
        image = _as_image(example, image_shape) if decoded is None else None
        if image is not None:
            cells.append(wandb.Image((image * 255).astype(np.uint8), caption=caption))
        else:
            cells.append(f"{caption}: {decoded if decoded is not None else _as_text(example)}")
    return cells


def attribution_table(
    query_indices: torch.Tensor,
    query_inputs: Any,
    query_labels: torch.Tensor,
    network_predictions: torch.Tensor,
    surrogate_predictions: torch.Tensor,
    ranked: dict[str, tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]],
    image_shape: Sequence[int] | None = None,
    text: Callable[[Any], str | None] | None = None,
    explained: torch.Tensor | None = None,
    method: str = "",
) -> Any:
    """A ``wandb.Table`` with one row per query example: the example, its label, both models'
    predictions, the class the scores explain (``explained``) and how they were computed (``method``), and
    for each ranking in ``ranked`` (e.g. ``proponent``/``opponent`` → training indices ``[M, k]``, scores
    ``[M, k]``, the training inputs ``[M·k, ...]`` and labels ``[M·k]``) the top-k training examples with
    their scores. Examples are shown as :func:`render_examples` does."""
    import wandb

    m = len(query_indices)
    explained = network_predictions if explained is None else explained
    columns = ["query_index", "input", "label", "network_prediction", "surrogate_prediction", "explained_class", "method"]
    query_cells = render_examples(query_inputs, [f"#{int(i)} label {int(y)}" for i, y in zip(query_indices, query_labels)], image_shape, text)
    rows = [
        [int(query_indices[r]), query_cells[r], int(query_labels[r]), int(network_predictions[r]), int(surrogate_predictions[r]), int(explained[r]), method]
        for r in range(m)
    ]
    for name, (indices, scores, inputs, labels) in ranked.items():
        k = indices.shape[1]
        captions = [f"#{int(i)} label {int(y)} {float(s):+.3g}" for i, y, s in zip(indices.flatten(), labels, scores.flatten())]
        cells = render_examples(inputs, captions, image_shape, text)
        columns.append(f"{name}_indices")
        for j in range(k):
            columns += [f"{name}_{j + 1}", f"{name}_{j + 1}_score"]
        for r in range(m):
            rows[r].append(", ".join(str(int(i)) for i in indices[r]))
            for j in range(k):
                rows[r] += [cells[r * k + j], float(scores[r, j])]
    return wandb.Table(columns=columns, data=rows)


def suspicious_table(
    indices: torch.Tensor, inputs: Any, labels: torch.Tensor, scores: torch.Tensor,
    image_shape: Sequence[int] | None = None, text: Callable[[Any], str | None] | None = None,
) -> Any:
    """A ``wandb.Table`` of training examples that may be mislabelled: index, example, label and score
    (the surrogate's loss on it), most suspicious first."""
    import wandb

    cells = render_examples(inputs, [f"#{int(i)} label {int(y)} loss {float(s):.3g}" for i, y, s in zip(indices, labels, scores)], image_shape, text)
    rows = [[int(i), cell, int(y), float(s)] for i, cell, y, s in zip(indices, cells, labels, scores)]
    return wandb.Table(columns=["train_index", "input", "label", "surrogate_loss"], data=rows)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def log_checkpoint_media(
    run: Any,
    history: Sequence[Any],
    network_scores: torch.Tensor,
    surrogate_scores: torch.Tensor,
    table: Any | None = None,
    suspicious: Any | None = None,
    prefix: str = PREFIX,
) -> None:
    """Log one checkpoint's media to a W&B run: the attribution table, the table of possibly mislabelled
    training examples, the probability scatter and the fidelity history so far, at the epoch and step of
    the latest history row."""
    import wandb

    row = history[-1]
    scatter = wandb.Table(columns=["network", "surrogate"], data=[[float(a), float(b)] for a, b in zip(network_scores, surrogate_scores)])
    epochs = [r.epoch for r in history]
    media = {
        prefix + "probability_scatter": wandb.plot.scatter(
            scatter, "network", "surrogate", title=f"True-class probability, network vs surrogate (epoch {row.epoch})"
        ),
        prefix + "fidelity_history": wandb.plot.line_series(
            xs=epochs,
            ys=[[_finite(float(getattr(r, m))) for r in history] for m in HISTORY_PLOT_METRICS],
            keys=list(HISTORY_PLOT_METRICS),
            title="NTK surrogate fidelity across training",
            xname="epoch",
        ),
    }
    if table is not None:
        media[prefix + "attributions"] = table
    if suspicious is not None:
        media[prefix + "suspicious"] = suspicious
    run.log(dict(media, epoch=row.epoch, **{"trainer/global_step": row.step}))


def agg_figure(**options: Any) -> Any:
    """A matplotlib ``Figure`` drawn by its own Agg canvas, without pyplot: the user's plotting backend
    and pyplot's open figures stay as they are, and nothing needs closing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**options)
    FigureCanvasAgg(fig)
    return fig


def history_figure(history: Sequence[Any], title: str = "NTK surrogate fidelity across training") -> Any:
    """The fidelity history as a matplotlib figure (Kendall-τ and the accuracies against the epoch)."""
    fig = agg_figure(figsize=(6, 3.5))
    ax = fig.subplots()
    epochs = [row.epoch for row in history]
    for metric in HISTORY_PLOT_METRICS:
        ax.plot(epochs, [getattr(row, metric) for row in history], marker="o", label=metric)
    ax.set(xlabel="epoch", title=title, ylim=(min(0.0, *(row.kendall_tau for row in history if math.isfinite(row.kendall_tau))), 1.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def log_history_plots(loggers: Sequence[Any], history: Sequence[Any], prefix: str = PREFIX) -> list[str]:
    """Give loggers without W&B media the fidelity history as a picture: TensorBoard a figure at the
    latest record's step, a CSV logger a PNG in its folder (overwritten at each checkpoint). Returns
    where PNGs were written; does nothing without matplotlib."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    targets = [logger for logger in loggers if isinstance(logger, (CSVLogger, TensorBoardLogger))]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    written = []
    for logger in targets:
        fig = history_figure(history)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(prefix + "fidelity_history", fig, global_step=history[-1].step)
        else:
            os.makedirs(logger.log_dir, exist_ok=True)
            path = os.path.join(logger.log_dir, prefix.strip("/").replace("/", "_") + "_fidelity_history.png")
            fig.savefig(path, dpi=100)
            written.append(path)
    return written


def format_history(history: Sequence[Any], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The fidelity history (checkpoint records) as a plain-text table, one line per checkpoint."""
    header = ["epoch", *columns]
    lines = [header] + [[str(row.epoch)] + [f"{float(getattr(row, c)):.3f}" for c in columns] for row in history]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)
