"""Featurization speed, peak memory and kernel error, side by side in one process, printed as one table.

For the small CNN of the project's SPEC (3 conv + 2 linear layers, 188,810 parameters, 3×32×32 inputs,
10 classes), an MLP 784-256-256-10, a ResNet-18 for 32×32 inputs and a two-layer transformer encoder
(16 positions of width 64, 4 heads, Gaussian inputs), and K ∈ {512, 2048, 10240}:

- ``sketch``: this project's structured count-sketch (``projector="sketch"``);
- ``dense``: this project's dense Gaussian projection of per-example gradients (the reference for
  kernel quality; its projection matrix is cached when it fits 4 GiB);
- ``TRAK``: the pipeline of the paper's authors without their CUDA kernel: per-class per-sample
  gradients with ``torch.func`` and traker's ``BasicProjector`` (Rademacher). It is so slow that only
  class 0 of one batch is timed and multiplied by the number of classes (every class is an identical,
  independent call);
- ``floor``: one forward pass and C batched backward passes (one per class, no per-example gradients),
  the least that any exact per-class method must do.

Throughput is measured on batches of ``--batch`` examples (best of ``--repeats`` batches, after a
warm-up batch); peak RSS is sampled during each row; the kernel error is the mean absolute error of the
cosine-normalised kernel against the exact trNTK, off the diagonal, on a fixed set of inputs, averaged
over seeds. Networks are at their (seeded) initialisation and inputs are Gaussian: the speed does not
depend on the values, and the error is measured against the exact kernel of the same network.

- ``outputs only``: one forward pass and C backward passes to the outputs of the layers with
  parameters, without weight gradients: what the sketch's backward passes cost before any sketching.

Then the operations dispatched per batch (aten operations, each at least one kernel launch on a
GPU) by the floor and the sketch at 10 and 100 classes, the sketch both as it runs on the CPU (one
backward pass per class) and as on a GPU (classes batched in one backward pass, large pieces).

Two more measurements follow: the exact trNTK of 1,000 × 1,000 scikit-learn digits for a digits MLP,
factored against the vmap path, and kernel row-block assembly against one ``torch.matmul``.

Usage: ``python benchmarks/featurize_speed.py [--quick] [--threads N] [--batch N] [--models NAME,...]`` (``make bench``).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_ntk as ln
from lightning_ntk.demos import load_digits_tensors

CLASSES = 10
DENSE_CACHE = 4 << 30  # bytes of the dense projection matrix kept between batches


# -- models -------------------------------------------------------------------------------------------


def spec_cnn(classes: int = CLASSES) -> nn.Module:
    """3 conv + 2 linear layers on 3×32×32 inputs, 188,810 parameters (10 classes)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, classes),
    )


def mlp(classes: int = CLASSES) -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, classes))


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs: a 3×3 stem without max-pooling, four stages of two basic blocks
    (``width`` channels in the first stage, 64 in the standard network)."""

    def __init__(self, classes: int = CLASSES, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, inputs = [], width
        for outputs, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            stages += [BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)]
            inputs = outputs
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


class SmallTransformer(nn.Module):
    """Two pre-norm encoder layers (``nn.TransformerEncoderLayer``: multi-head attention, LayerNorm,
    a feed-forward of twice the width) on ``length`` positions of ``features`` Gaussian inputs, with a
    linear input projection, learned position embeddings and a linear head on the mean of the positions."""

    def __init__(self, classes: int = CLASSES, features: int = 32, length: int = 16, width: int = 64, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.positions = nn.Embedding(length, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)[None]  # one row for the batch, broadcast
        return self.head(self.encoder(self.embed(x) + self.positions(positions)).mean(1))


@dataclass
class Setup:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    error_examples: int
    baselines: bool  # whether the dense and TRAK baselines are affordable (K·P floats)


# -- measuring ----------------------------------------------------------------------------------------


class PeakRSS:
    """The largest resident set size of this process while the block runs, sampled every 2 ms."""

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def release_memory() -> None:
    """Free garbage and hand freed heap memory back to the OS, so that each row's RSS starts clean."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # set by --clock


def _elapsed(fn: Callable[[], object]) -> float:
    start = clock()
    fn()
    return clock() - start


def seconds(fn: Callable[[], object], repeats: int, warm_up: bool = True, beside: Callable[[], object] | None = None) -> tuple[float, int, float]:
    """Best wall time of ``repeats`` calls (after a warm-up call) and the peak RSS of the first ones;
    with ``beside``, also the best time of a call of it before each further call, so that a ratio of
    the two is not skewed by other work on the machine (both are timed in the same moments)."""
    release_memory()
    with PeakRSS() as rss:
        if warm_up:
            fn()
        times = [_elapsed(fn)]
    times_beside = [float("inf")]
    for _ in range(repeats - 1):
        if beside is not None:
            times_beside.append(_elapsed(beside))
        times.append(_elapsed(fn))
    return min(times), rss.peak, min(times_beside)


def floor(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters()]

    def run():
        logits = model(x)
        for c in range(logits.shape[1]):
            torch.autograd.grad(logits[:, c].sum(), params, retain_graph=c + 1 < logits.shape[1])

    return run


def outputs_only(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward pass and one backward pass per class to the outputs of the modules with parameters,
    without weight gradients: the backward passes of the sketch, before any sketching."""
    modules = [m for m in model.modules() if m._parameters]

    def run():
        outputs = []
        # attention returns (output, weights)
        handles = [m.register_forward_hook(lambda mod, args, out: outputs.append(out if isinstance(out, torch.Tensor) else out[0])) for m in modules]
        try:
            logits = model(x)
        finally:
            for h in handles:
                h.remove()
        for c in range(logits.shape[1]):
            torch.autograd.grad(logits[:, c].sum(), outputs, retain_graph=c + 1 < logits.shape[1])

    return run


class OperationCount(TorchDispatchMode):
    """Counts the aten operations dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations(fn: Callable[[], object]) -> int:
    """Operations of one call of ``fn``, after a warm-up call."""
    fn()
    with OperationCount() as counter:
        fn()
    return counter.count


def operation_rows(setup: "Setup", batch: int, k: int) -> list[dict]:
    """Operations per batch of the floor and of the sketch at 10 and 100 classes; the sketch as it runs
    on the CPU and, where this version of the library can, as on a GPU (classes batched, large pieces)."""
    rows = []
    for classes in (10, 100):
        torch.manual_seed(0)
        model = setup.make(classes).eval()
        x = torch.randn(batch, *setup.input_shape)
        row = dict(model=setup.name, classes=classes, floor=operations(floor(model, x)))
        featurizer = ln.Featurizer(model, projection_dim=k, projector="sketch")
        row["sketch"] = operations(lambda: featurizer.featurize_batch(x))
        if hasattr(featurizer.gradients, "batch_classes"):
            featurizer.gradients.batch_classes = True
            featurizer.projector.piece_bytes, featurizer.projector.chunked_fold = 1 << 28, False
            row["batched"] = operations(lambda: featurizer.featurize_batch(x))
        rows.append(row)
    return rows


def print_operations(rows: list[dict]) -> None:
    print("| model | classes | floor | sketch, one backward pass per class (CPU) | sketch, classes batched (as on a GPU) |")
    print("|---|---|---|---|---|")
    for r in rows:
        batched = f"{r['batched']:,} ({r['batched'] / r['floor']:.2f}× floor)" if "batched" in r else "—"
        print(f"| {r['model']} | {r['classes']} | {r['floor']:,} | {r['sketch']:,} ({r['sketch'] / r['floor']:.2f}× floor) | {batched} |")


def trak_one_class(model: nn.Module, x: torch.Tensor, k: int) -> Callable[[], None]:
    """Class 0 of the authors' pipeline: per-sample gradients of logit 0, then BasicProjector."""
    from trak.projectors import BasicProjector, ProjectionType

    params = {n: p.detach() for n, p in model.named_parameters()}
    projector = BasicProjector(sum(p.numel() for p in params.values()), k, 0, ProjectionType.rademacher, "cpu")

    def logit(p, example, c):
        return functional_call(model, p, (example[None],))[0, c]

    def run():
        grads = vmap(grad(logit), in_dims=(None, 0, None))(params, x, 0)
        projector.project(torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1), model_id=0)

    return run


def kernel_error(features: torch.Tensor, exact: torch.Tensor) -> float:
    off = ~torch.eye(len(exact), dtype=torch.bool)
    return (ln.kernel_from_features(features) - exact)[off].abs().mean().item()


# -- the table ------------------------------------------------------------------------------------------


def featurization_rows(setup: Setup, ks: tuple[int, ...], repeats: int, seeds: int) -> list[dict]:
    """The rows of one model: throughput and peak RSS first, then the kernel errors (which hold
    exact gradients in memory, so they come after every timed row)."""
    torch.manual_seed(0)
    model = setup.make().eval()
    x = torch.randn(setup.batch, *setup.input_shape)
    num_params = sum(p.numel() for p in model.parameters())
    base = dict(model=setup.name, P=num_params)
    run_floor = floor(model, x)
    t_floor, rss, _ = seconds(run_floor, repeats)
    rows = [dict(base, K="—", method="floor", rss=rss)]
    t, rss, t_beside = seconds(outputs_only(model, x), repeats, beside=run_floor)
    t_floor = min(t_floor, t_beside)
    rows.append(dict(base, K="—", method="outputs only", rate=setup.batch / t, rss=rss))
    for k in ks:
        sketch = ln.Featurizer(model, projection_dim=k, projector="sketch")
        t, rss, t_beside = seconds(lambda: sketch.featurize_batch(x), repeats, beside=run_floor)
        t_floor = min(t_floor, t_beside)
        rows.append(dict(base, K=k, method="sketch", rate=setup.batch / t, rss=rss))
        if setup.baselines:
            dense = ln.Featurizer(model, projection_dim=k, projector="gaussian", memory_budget=DENSE_CACHE)
            cached = num_params * k * 4 <= DENSE_CACHE  # a warm-up batch then builds the cache
            t, rss, _ = seconds(lambda: dense.featurize_batch(x), 1, warm_up=cached)
            rows.append(dict(base, K=k, method="dense", rate=setup.batch / t, rss=rss))
            del dense
            t, rss, _ = seconds(trak_one_class(model, x, k), 1, warm_up=False)
            rows.append(dict(base, K=k, method="TRAK", rate=setup.batch / (t * CLASSES), rss=rss))
    rows[0]["rate"] = setup.batch / t_floor
    release_memory()
    fixed = torch.randn(setup.error_examples, *setup.input_shape, generator=torch.Generator().manual_seed(1))
    exact = ln.exact_kernel(model, fixed)
    grads = ln.gradient_features(model, fixed) if setup.baselines else None
    for row in rows[2:]:
        k = row["K"]
        if row["method"] == "sketch":
            features = [ln.project_features(model, fixed, projection_dim=k, projector="sketch", seed=s) for s in range(seeds)]
            row["error"] = statistics.mean(kernel_error(f, exact) for f in features)
            row["error_fp16"] = kernel_error(features[0].half(), exact)
        elif row["method"] == "dense":
            dense_seeds = range(max(1, seeds * 512 // k))
            projectors = (ln.RandomProjector(grads.shape[-1], k, "gaussian", s, DENSE_CACHE) for s in dense_seeds)
            row["error"] = statistics.mean(kernel_error(p.project(grads), exact) for p in projectors)
    by_method = {(r["K"], r["method"]): r for r in rows}
    for r in rows:
        r["vs_floor"] = r["rate"] / rows[0]["rate"]
        if r["method"] == "sketch" and setup.baselines:
            dense, trak = by_method[(r["K"], "dense")], by_method[(r["K"], "TRAK")]
            r.update(vs_dense=r["rate"] / dense["rate"], vs_trak=r["rate"] / trak["rate"], error_vs_dense=r["error"] / dense["error"])
    return rows


def exact_digits(n: int) -> dict:
    """The exact trNTK of n × n digits for a 64-128-128-10 MLP: factored path against the vmap path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = load_digits_tensors()[0][:n]
    kernels = {}
    t_factored = _elapsed(lambda: kernels.update(factored=ln.exact_kernel(model, x, method="factored", batch_size=256)))
    t_vmap = _elapsed(lambda: kernels.update(vmap=ln.exact_kernel(model, x, method="vmap", batch_size=256)))
    return dict(n=n, factored=t_factored, vmap=t_vmap, diff=(kernels["factored"] - kernels["vmap"]).abs().max().item())


def block_assembly(n: int, k: int, repeats: int) -> dict:
    """Kernel row blocks (normalised, block by block) against one matmul of the same shapes."""
    a = torch.randn(n, CLASSES, k)
    b = torch.randn(n, CLASSES, k)
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    t_blocks, _, t_matmul = seconds(lambda: ln.kernel_from_features(a, b), repeats, beside=lambda: flat_a @ flat_b.T)
    return dict(n=n, k=k, blocks=t_blocks, matmul=t_matmul)


def fmt_rate(r: float) -> str:
    return f"{r:,.1f}" if r < 100 else f"{r:,.0f}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:,.0f}×" if r >= 100 else f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def print_table(rows: list[dict]) -> None:
    print("| model | K | method | examples/s | × TRAK | share of floor | × dense | peak RSS | kernel MAE | MAE / dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        error = f"{r['error']:.5f}" if "error" in r else ""
        if "error_fp16" in r:
            error += f" (fp16 {r['error_fp16']:.5f})"
        print(
            f"| {r['model']} | {r['K'] if r['K'] == '—' else format(r['K'], ',')} | {r['method']} | {fmt_rate(r['rate'])} | "
            f"{fmt_ratio(r.get('vs_trak'))} | {100 * r['vs_floor']:.0f}% | {fmt_ratio(r.get('vs_dense'))} | "
            f"{r['rss'] / 2**30:.2f} GiB | {error} | {fmt_ratio(r.get('error_vs_dense'))} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 512 and 2,048, fewer repeats, seeds and examples")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="timed batches per row (best is kept)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (with --threads 1: robust to other work on a shared machine)")
    parser.add_argument("--models", default=None, help="comma-separated model names to run (default: all): spec_cnn, mlp, resnet18, transformer")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per batch for every model (default: each model's own; the library featurizes 128 at a time)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    quick = args.quick
    ks = (512, 2048) if quick else (512, 2048, 10240)
    repeats = args.repeats or (5 if quick else 6)
    seeds = 2 if quick else 4
    setups = {
        "spec_cnn": Setup("SPEC CNN", spec_cnn, (3, 32, 32), 32, 40, True),
        "mlp": Setup("MLP 784-256-256-10", mlp, (784,), 32, 40, True),
        "resnet18": Setup("ResNet-18 (32×32)", ResNet18, (3, 32, 32), 16, 8 if quick else 16, False),
        "transformer": Setup("Transformer 2×64, 16 positions", SmallTransformer, (16, 32), 32, 40, True),
    }
    if args.batch:
        setups = {name: dataclasses.replace(setup, batch=args.batch) for name, setup in setups.items()}
    chosen = args.models.split(",") if args.models else list(setups)
    unknown = set(chosen) - set(setups)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose among {list(setups)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {args.clock} clock\n")
    rows = []
    for name in chosen:
        rows += featurization_rows(setups[name], ks, repeats, seeds)
    print_table(rows)
    print("\nOperations per batch of 8 examples (K = 2,048):\n")
    print_operations([row for name in chosen for row in operation_rows(setups[name], 8, 2048)])
    digits = exact_digits(300 if quick else 1000)
    print(
        f"\nExact trNTK, {digits['n']:,} × {digits['n']:,} digits, MLP 64-128-128-10: factored {digits['factored']:.2f} s, "
        f"vmap {digits['vmap']:.2f} s ({digits['vmap'] / digits['factored']:.0f}× faster), max |difference| {digits['diff']:.1e}"
    )
    blocks = block_assembly(1024 if quick else 2048, 512, repeats)
    print(
        f"Kernel row blocks, {blocks['n']:,} × {blocks['n']:,} from [N, {CLASSES}, {blocks['k']}] features: "
        f"{blocks['blocks']:.3f} s against {blocks['matmul']:.3f} s for one matmul "
        f"({100 * blocks['matmul'] / blocks['blocks']:.0f}% of its throughput)"
    )


if __name__ == "__main__":
    main()
