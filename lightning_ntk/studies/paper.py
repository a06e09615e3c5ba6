"""The surrogate study of Engel et al. (ICLR 2024) on scikit-learn's digits, a synthetic text task, and on MNIST/CIFAR-10 where present.

For each setup and training seed: train the network (fidelity tracked across epochs by
:class:`~lightning_ntk.callback.NTKAttributionCallback`), then for every kernel fit the kernel-machine
surrogate on the training set and measure its fidelity on the test set. The report is a Markdown
table (mean ± standard error over seeds) with plots, written to a folder and, when a W&B run is
active, to W&B. Run it with ``python -m lightning_ntk.studies.paper --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn

from ..callback import NTKAttributionCallback
from ..dashboards import agg_figure, wandb_mode
from ..demos import Classifier, binary_cnn, binary_mlp, digits_cnn, load_digits_tensors, load_torchvision_pair
from ..demos.text import TextClassifier, size_order_tensors, size_order_tokenizer, small_bert
from ..featurize import project_features
from ..kernels import exact_kernel, kernel_from_features
from ..metrics import SurrogateFidelity
from ..registry import get_kernel
from ..surrogate import fit_from_kernel
from ..task import Task

FIDELITY_COLUMNS = ("kendall_tau", "tad", "agreement", "miss_overlap", "surrogate_acc", "network_acc")


@dataclass(frozen=True)
class KernelChoice:
    """One surrogate kernel of the study: a registered kernel name and, for projected kernels, the
    projection's dimension K and projector."""

    label: str
    kernel: str
    projection_dim: int | None = None
    projector: str = "sketch"


DEFAULT_KERNELS = (
    KernelChoice("trNTK", "trntk"),
    KernelChoice("trNTK0", "trntk0"),
    KernelChoice("pNTK", "pntk"),
    KernelChoice("proj-trNTK K=128", "proj_trntk", 128),
    KernelChoice("proj-trNTK K=512", "proj_trntk", 512),
    KernelChoice("proj-trNTK K=512 dense", "proj_trntk", 512, "rademacher"),
    KernelChoice("proj-trNTK K=2048", "proj_trntk", 2048),
    KernelChoice("proj-pNTK K=512", "proj_pntk", 512),
    KernelChoice("em", "em"),
    KernelChoice("ck", "ck"),
)


Data = tuple[Any, torch.Tensor, Any, torch.Tensor]  # inputs: tensors, or dicts of tensors (token batches)


@dataclass(frozen=True)
class Setup:
    """A network, its data (``load(seed, data_dir)`` → ``(x_train, y_train, x_test, y_test)``), its
    training recipe (``module``: the LightningModule that trains the network) and the surrogate's L2
    penalty ``alpha`` (the paper's: 1e-4 for its image models, 1e-2 for BERT)."""

    name: str
    make_network: Callable[[], nn.Module]
    load: Callable[[int, Path], Data]
    epochs: int
    lr: float
    optimizer: str = "sgd"
    batch_size: int = 64
    module: Callable[..., L.LightningModule] = Classifier
    alpha: float = 1e-4


TORCHVISION_TRAIN_LIMIT = 5000  # training examples kept of MNIST/CIFAR-10, so that exact kernels stay on a laptop

SETUPS = {
    "digits01_mlp": Setup(
        "digits 0 vs 1, single-logit MLP", lambda: binary_mlp(64), lambda seed, root: load_digits_tensors((0, 1), seed=seed),
        epochs=10, lr=0.01,
    ),
    "digits10_cnn": Setup(
        "digits 10-class, CNN", digits_cnn, lambda seed, root: load_digits_tensors(seed=seed, image_shape=True),
        epochs=6, lr=3e-3, optimizer="adam",
    ),
    "digits10_mlp": Setup(
        "digits 10-class, MLP", lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
        lambda seed, root: load_digits_tensors(seed=seed), epochs=10, lr=0.05,
    ),
    "mnist01_mlp": Setup(
        "MNIST 0 vs 1, single-logit MLP", lambda: binary_mlp(784),
        lambda seed, root: load_torchvision_pair("MNIST", root, (0, 1), TORCHVISION_TRAIN_LIMIT, seed), epochs=4, lr=0.01,
    ),
    "cifar2_cnn": Setup(
        "CIFAR-10 airplane vs automobile, single-logit CNN", lambda: binary_cnn(3, 32),
        lambda seed, root: load_torchvision_pair("CIFAR10", root, (0, 1), TORCHVISION_TRAIN_LIMIT, seed), epochs=10, lr=1e-3, optimizer="adam",
    ),
    "order_bert": Setup(
        "word-order text task, 2-layer BERT (needs the text extra)", lambda: small_bert(len(size_order_tokenizer())),
        lambda seed, root: size_order_tensors(seed=seed), epochs=12, lr=2e-3, optimizer="adamw", batch_size=32, module=TextClassifier,
        alpha=1e-2,
    ),
}
DEFAULT_SETUPS = ("digits01_mlp", "digits10_cnn", "mnist01_mlp", "cifar2_cnn")  # the paper's setups and their digits analogues


def _logits(model: nn.Module, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return Task().forward(model, x)


def _examples(x, y: torch.Tensor):
    """A dataset of ``(x, y)`` pairs, or of dicts with ``labels`` for dict inputs (token batches)."""
    if isinstance(x, dict):
        return [{**{k: v[i] for k, v in x.items()}, "labels": y[i]} for i in range(len(y))]
    return torch.utils.data.TensorDataset(x, y)


def kernel_pairs(
    network: nn.Module, x_train: torch.Tensor, x_test: torch.Tensor, kernels: Sequence[KernelChoice], seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{label: (κ(train, train), κ(test, train))}`` for every kernel. Exact kernels come from
    :func:`exact_kernel` (gradient kernels by its factored path, no per-example gradients); projected
    kernels use the study seed for their projection."""
    pairs = {}
    for choice in kernels:
        kernel = get_kernel(choice.kernel)
        if not kernel.projected:
            pairs[choice.label] = (exact_kernel(network, x_train, kind=kernel.name), exact_kernel(network, x_test, x_train, kind=kernel.name))
        else:
            train, test = (project_features(network, x, kernel.name, choice.projection_dim, choice.projector, seed) for x in (x_train, x_test))
            pairs[choice.label] = (kernel_from_features(train, normalize=kernel.normalized), kernel_from_features(test, train, normalize=kernel.normalized))
    return pairs


def surrogate_fidelity(
    k_train: torch.Tensor, k_test: torch.Tensor, y_train: torch.Tensor, y_test: torch.Tensor, network_test_logits: torch.Tensor, **fit_options
) -> dict[str, float]:
    """Fit the kernel machine on the training kernel and measure its fidelity on the test rows."""
    surrogate = fit_from_kernel(k_train, y_train, num_outputs=network_test_logits.shape[1], **fit_options)
    metric = SurrogateFidelity()
    metric.update(network_test_logits, surrogate.predict(k_test), y_test)
    return {k: float(v) for k, v in metric.compute().items()}


def kernel_residuals(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], kernels: Sequence[KernelChoice]) -> dict[str, np.ndarray]:
    """``|proj-trNTK − trNTK|`` over all test×train pairs, for each projected trNTK, in order of K."""
    if "trNTK" not in pairs:
        return {}
    exact = pairs["trNTK"][1]
    projected = sorted((c for c in kernels if c.kernel == "proj_trntk"), key=lambda c: c.projection_dim)
    return {c.label: (pairs[c.label][1] - exact).abs().flatten().numpy() for c in projected}


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return float(values.mean()), float(se)


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One row per (setup, kernel): mean and standard error across seeds of every fidelity column."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setup"], row["kernel"]), []).append(row)
    summary = []
    for (setup, kernel), group in groups.items():
        entry = {"setup": setup, "kernel": kernel, "seeds": len(group)}
        for column in FIDELITY_COLUMNS:
            entry[column] = mean_and_standard_error([r[column] for r in group])
        summary.append(entry)
    return summary


def markdown_table(summary: Sequence[dict]) -> str:
    """The summary as a Markdown table; accuracies and TAD in percentage points."""
    header = "| setup | kernel | seeds | Kendall τ | TAD (pp) | agreement | miss overlap | surrogate acc | network acc |"
    lines = [header, "|" + "---|" * 9]
    for e in summary:
        def fmt(column, scale=1.0, digits=3):
            mean, se = e[column]
            return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}" if not math.isnan(se) else f"{mean * scale:.{digits}f}"

        lines.append(
            f"| {e['setup']} | {e['kernel']} | {e['seeds']} | {fmt('kendall_tau')} | {fmt('tad', 100, 2)} | "
            f"{fmt('agreement')} | {fmt('miss_overlap')} | {fmt('surrogate_acc', 100, 2)} | {fmt('network_acc', 100, 2)} |"
        )
    return "\n".join(lines)


def train_network(setup: Setup, seed: int, data, callbacks: Sequence[L.Callback] = (), root_dir: str | Path = ".") -> Classifier:
    x_train, y_train, x_test, y_test = data
    L.seed_everything(seed, workers=True, verbose=False)
    model = setup.module(setup.make_network(), lr=setup.lr, optimizer=setup.optimizer)
    loaders = (
        torch.utils.data.DataLoader(_examples(x_train, y_train), batch_size=setup.batch_size, shuffle=True),
        torch.utils.data.DataLoader(_examples(x_test, y_test), batch_size=256),
    )
    trainer = L.Trainer(
        max_epochs=setup.epochs, accelerator="cpu", devices=1, logger=False, callbacks=list(callbacks), default_root_dir=str(root_dir),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )
    trainer.fit(model, *loaders)
    return model


def run_seed(setup_key: str, seed: int, kernels: Sequence[KernelChoice], track_epochs: bool = True, out_dir: str | Path = ".",
             epochs: int | None = None, data_dir: str | Path = "data", **fit_options):
    """Train one network and evaluate every kernel's surrogate. Returns ``(rows, residuals, history)``."""
    setup = SETUPS[setup_key]
    if epochs is not None:
        setup = dataclasses.replace(setup, epochs=epochs)
    data = setup.load(seed, Path(data_dir))
    x_train, y_train, x_test, y_test = data
    tracker = (
        NTKAttributionCallback(kernel="proj_trntk", projection={"dim": 512, "projector": "sketch"}, every_n_epochs=1, top_k=0) if track_epochs else None
    )
    model = train_network(setup, seed, data, [tracker] if tracker else [], Path(out_dir) / "runs" / f"{setup_key}_seed{seed}")
    network = model.network
    network_logits = _logits(network, x_test)
    rows = []
    started = time.perf_counter()
    pairs = kernel_pairs(network, x_train, x_test, kernels, seed)
    for choice in kernels:
        k_train, k_test = pairs[choice.label]
        t0 = time.perf_counter()
        fidelity = surrogate_fidelity(k_train, k_test, y_train, y_test, network_logits, **{"alpha": setup.alpha, **fit_options})
        rows.append({"setup": setup_key, "seed": seed, "kernel": choice.label, **fidelity, "fit_seconds": time.perf_counter() - t0})
    history = [dict(h.to_dict(), setup=setup_key, seed=seed) for h in tracker.history] if tracker else []
    residuals = kernel_residuals(pairs, kernels)
    print(f"  {setup_key} seed {seed}: {len(kernels)} kernels in {time.perf_counter() - started:.1f} s")
    return rows, residuals, history


def plot_report(summary, residuals_by_setup, history, out_dir: Path) -> list[Path]:
    """Three PNGs: fidelity per kernel, residual vs K, and fidelity across training epochs."""
    paths = []
    setups = sorted({e["setup"] for e in summary})
    fig = agg_figure(figsize=(12, 3.6 * len(setups)))
    axes = fig.subplots(len(setups), 2, squeeze=False)
    for row, setup in enumerate(setups):
        entries = [e for e in summary if e["setup"] == setup]
        labels = [e["kernel"] for e in entries]
        for col, (metric, scale, title) in enumerate((("kendall_tau", 1, "Kendall τ"), ("tad", 100, "TAD (pp)"))):
            means = [e[metric][0] * scale for e in entries]
            errors = [0 if math.isnan(e[metric][1]) else e[metric][1] * scale for e in entries]
            ax = axes[row, col]
            ax.bar(range(len(labels)), means, yerr=errors, capsize=3, color="tab:blue" if col == 0 else "tab:orange")
            ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{setup}: {title}")
            ax.axhline(0, color="black", lw=0.5)
    fig.tight_layout()
    paths.append(out_dir / "fidelity_per_kernel.png")
    fig.savefig(paths[-1], dpi=110)

    if any(residuals_by_setup.values()):
        fig = agg_figure(figsize=(5 * len(residuals_by_setup), 3.6))
        axes = fig.subplots(1, len(residuals_by_setup), squeeze=False)
        for ax, (setup, residuals) in zip(axes[0], residuals_by_setup.items()):
            labels = list(residuals)
            ax.boxplot([residuals[k] for k in labels], whis=(5, 95), showfliers=False)
            ax.set_xticks(range(1, len(labels) + 1), [k.replace("proj-trNTK ", "") for k in labels], fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel("projection")
            ax.set_ylabel("|proj-trNTK − trNTK|")
            ax.set_title(setup)
        fig.tight_layout()
        paths.append(out_dir / "residual_vs_k.png")
        fig.savefig(paths[-1], dpi=110)

    if history:
        fig = agg_figure(figsize=(6, 3.6))
        ax = fig.subplots()
        for setup in sorted({h["setup"] for h in history}):
            epochs = sorted({h["epoch"] for h in history if h["setup"] == setup})
            stats = [mean_and_standard_error([h["kendall_tau"] for h in history if h["setup"] == setup and h["epoch"] == e]) for e in epochs]
            means = np.array([s[0] for s in stats])
            errors = np.nan_to_num(np.array([s[1] for s in stats]))
            ax.errorbar(epochs, means, yerr=errors, marker="o", capsize=3, label=setup)
        ax.set_xlabel("epoch")
        ax.set_ylabel("Kendall τ (proj-trNTK surrogate)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "fidelity_across_epochs.png")
        fig.savefig(paths[-1], dpi=110)
    return paths


def write_report(rows, residuals_by_setup, history, out_dir: Path, seconds: float) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    images = plot_report(summary, residuals_by_setup, history, out_dir)
    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "history": history}, indent=1))
    lines = [
        "# Surrogate fidelity per kernel",
        "",
        f"Mean ± standard error over {max(e['seeds'] for e in summary)} training seeds; {seconds / 60:.1f} minutes in all.",
        "",
        markdown_table(summary),
        "",
        *[f"![{p.stem}]({p.name})" for p in images],
        "",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def log_to_wandb(report: Path, rows: Sequence[dict], project: str) -> None:
    """Send the per-seed rows and the summary (mean and standard error per setup and kernel) as
    tables, and the plots as images, to a W&B run kept beside the report (``<out>/wandb``)."""
    import wandb

    run = wandb.init(project=project, job_type="surrogate-study", dir=str(report.parent), mode=wandb_mode())
    columns = sorted(rows[0])
    summary_columns = ["setup", "kernel", "seeds"] + [f"{c}_{part}" for c in FIDELITY_COLUMNS for part in ("mean", "se")]
    summary = [[e["setup"], e["kernel"], e["seeds"], *(v for c in FIDELITY_COLUMNS for v in e[c])] for e in summarize(rows)]
    run.log({
        "study/results": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
        "study/summary": wandb.Table(columns=summary_columns, data=summary),
        **{f"study/{p.stem}": wandb.Image(str(p)) for p in report.parent.glob("*.png")},
    })
    run_dir, offline = Path(run.dir).parent, run.settings.mode == "offline"
    run.finish()
    if offline:
        print(f"The W&B run was saved offline. Upload it with:\n  wandb sync {run_dir}")


def run_study(setups: Sequence[str], seeds: int, kernels: Sequence[KernelChoice] = DEFAULT_KERNELS, out_dir: str | Path = "outputs/study",
              track_epochs: bool = True, wandb_project: str | None = None, epochs: int | None = None, data_dir: str | Path = "data",
              **fit_options) -> Path:
    """Run every setup for ``seeds`` training seeds and write the report; setups whose data are not in
    ``data_dir`` are skipped with the reason. ``fit_options`` go to :func:`fit_from_kernel`."""
    started = time.perf_counter()
    rows, history, residuals_by_setup, skipped = [], [], {}, []
    for setup in setups:
        print(f"{setup}: {SETUPS[setup].name}")
        pooled: dict[str, list[np.ndarray]] = {}
        try:
            for seed in range(seeds):
                seed_rows, residuals, seed_history = run_seed(setup, seed, kernels, track_epochs, out_dir, epochs, data_dir, **fit_options)
                rows += seed_rows
                history += seed_history
                for k, values in residuals.items():
                    pooled.setdefault(k, []).append(values)
        except FileNotFoundError as err:
            print(f"  skipped: {err}")
            skipped.append(setup)
            continue
        residuals_by_setup[setup] = {k: np.concatenate(v) for k, v in pooled.items()}
        report = write_report(rows, residuals_by_setup, history, Path(out_dir), time.perf_counter() - started)
    if not rows:
        raise SystemExit(f"No setup could run (skipped: {', '.join(skipped)}); see the messages above.")
    if wandb_project:
        log_to_wandb(report, rows, wandb_project)
    print(report.read_text())
    if skipped:
        print(f"Skipped for want of data: {', '.join(skipped)}.")
    print(f"Report written to {report}")
    return report


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(DEFAULT_SETUPS), choices=list(SETUPS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="outputs/study")
    parser.add_argument("--data-dir", default="data", help="where torchvision keeps MNIST/CIFAR-10 (setups without their data are skipped)")
    parser.add_argument("--kernels", nargs="+", default=[k.label for k in DEFAULT_KERNELS], choices=[k.label for k in DEFAULT_KERNELS],
                        metavar="KERNEL", help="surrogate kernels to compare (default: all): %(choices)s")
    parser.add_argument("--formulation", default="multinomial", choices=["multinomial", "ovr"], help="the surrogate's loss (ovr: the paper's)")
    parser.add_argument("--epochs", type=int, default=None, help="override every setup's training epochs")
    parser.add_argument("--no-epochs", action="store_true", help="skip tracking fidelity across training epochs")
    parser.add_argument("--wandb-project", default=None, help="also log the table and plots to this W&B project")
    args = parser.parse_args(argv)
    kernels = [k for k in DEFAULT_KERNELS if k.label in args.kernels]
    return run_study(
        args.setups, args.seeds, kernels, out_dir=args.out, track_epochs=not args.no_epochs, wandb_project=args.wandb_project,
        epochs=args.epochs, data_dir=args.data_dir, formulation=args.formulation,
    )


if __name__ == "__main__":
    main()
