"""The one prepared GPU run (about 5 minutes on an H200): check the CUDA paths against the CPU, then time them.

1. Correctness: sketch features (fold and FFT routes, classes batched on the device against one class
   at a time on the CPU), the factored exact trNTK/pNTK, the dense projection and kernels of float16
   features, in float64 with the same seeds on both devices, for the SPEC CNN, a narrow ResNet-18 and a
   token model; then, in float32 on the device, that TF32 (cuDNN's default), bf16 autocast and float16
   weights keep every standard layer on the structured path, with kernels close to the float64 one.
2. Speed, one table: the SPEC CNN (batch 256) and ResNet-18 (batch 128), K = 2,048 and 10,240, with
   cuDNN's default settings (TF32 convolutions) and with TF32 off: the C-backward floor, the outputs-only
   backward (forward and C backward passes to the layer outputs, no weight gradients), the sketch, and
   the authors' pipeline (torch.func per-class gradients + TRAK's ``CudaProjector``), with peak GPU memory.
3. The callback inside a GPU ``Trainer``: ResNet-18 on 50,000 synthetic CIFAR-sized examples, 10,000
   reference / 2,000 query examples: seconds per checkpoint (featurize, fit) against seconds per epoch.

TRAK's CUDA projector (``fast_jl``) is built here, in the background while the checks run, from TRAK's
source archives (``traker-0.3.2.tar.gz``, ``fast_jl-0.1.3-src.tar.gz``) in ``--peers``: copy the
project's shared peers folder to ``benchmarks/peers/`` (ignored by git) and carry it to the GPU machine.
Without them, or if the build fails, the authors' rows use torch.func + TRAK's ``BasicProjector``, or a
dense projection, and say which.

Usage: ``python benchmarks/gpu_check.py [--peers DIR] [--smoke]``. ``--smoke`` runs everything at tiny
sizes, on the CPU when there is no GPU, to check the script before spending GPU time. Exits with status
1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from featurize_speed import ResNet18, SmallTransformer, floor, outputs_only, spec_cnn
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import lightning_ntk as ln
from lightning_ntk.layers import LayerGradients
from lightning_ntk.demos import Classifier

CLASSES = 10


@dataclass(frozen=True)
class Sizes:
    spec_batch: int
    resnet_batch: int
    resnet_width: int
    ks: tuple[int, ...]
    repeats: int
    train: int
    reference: int
    query: int
    trainer_batch: int


FULL = Sizes(spec_batch=256, resnet_batch=128, resnet_width=64, ks=(2048, 10240), repeats=5,
             train=50_000, reference=10_000, query=2_000, trainer_batch=128)
SMOKE = Sizes(spec_batch=8, resnet_batch=4, resnet_width=8, ks=(64, 128), repeats=1,
              train=256, reference=64, query=32, trainer_batch=32)


class TokenModel(nn.Module):
    def __init__(self, vocab: int = 50, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16, padding_idx=0)
        self.norm = nn.LayerNorm(16)
        self.conv = nn.Conv1d(16, 32, 3, padding=1, groups=2)
        self.head = nn.Linear(32, classes)

    def forward(self, tokens):
        h = torch.relu(self.conv(self.norm(self.embed(tokens)).transpose(1, 2)))
        return self.head(h.mean(2))


# -- TRAK's projector, built from its sources -------------------------------------------------------


class TrakBuild:
    """Unpacks TRAK's archives, puts traker on the path and builds fast_jl in a background process."""

    def __init__(self, peers: Path | None, cuda: bool):
        self.note = "no TRAK sources (pass --peers)"
        self._process = None
        archives = [peers / "traker-0.3.2.tar.gz", peers / "fast_jl-0.1.3-src.tar.gz"] if peers else []
        if not archives or not all(a.exists() for a in archives):
            return
        self._dir = Path(tempfile.mkdtemp(prefix="trak-"))
        for archive in archives:
            with tarfile.open(archive) as tar:
                tar.extractall(self._dir, filter="data")
        sys.path.insert(0, str(self._dir / "traker-0.3.2"))
        self.note = "fast_jl not built (no GPU or no nvcc)"
        if cuda and shutil.which("nvcc"):
            env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=str(os.cpu_count() or 4))
            command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", "--no-deps",
                       "--target", str(self._dir / "site"), "."]
            self._log = open(self._dir / "build.log", "w")
            self._process = subprocess.Popen(command, cwd=self._dir / "fast_jl-0.1.3", env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def cuda_projector_ready(self) -> bool:
        """Wait for the build; whether fast_jl imports."""
        if self._process is None:
            return False
        if self._process.wait() != 0:
            self._log.close()
            self.note = "fast_jl build failed: " + (self._dir / "build.log").read_text()[-300:].replace("\n", " ")
            self._process = None
            return False
        self._process = None
        sys.path.insert(0, str(self._dir / "site"))
        try:
            import fast_jl  # noqa: F401
        except ImportError as err:
            self.note = f"fast_jl does not import: {err}"
            return False
        return True


def authors_pipeline(model: nn.Module, x: torch.Tensor, k: int, trak: TrakBuild, cuda_projector: bool):
    """The authors' pipeline (per-class per-example gradients with torch.func, then a projection of
    each class's ``[B, P]`` gradients), with TRAK's CudaProjector when built, else its BasicProjector,
    else this library's dense Rademacher projection (when its matrix fits on the device): (name, run)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    num_params = sum(p.numel() for p in params.values())

    def logit(p, example, c):
        return functional_call(model, (p, buffers), (example[None],))[0, c]

    per_class = vmap(grad(logit), in_dims=(None, 0, None))
    try:
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType

        if cuda_projector:
            name = "torch.func + TRAK CudaProjector (fast_jl)"
            projector = CudaProjector(num_params, k, 0, ProjectionType.rademacher, x.device, 32)
        else:
            name = f"torch.func + TRAK BasicProjector ({trak.note})"
            projector = BasicProjector(num_params, k, 0, ProjectionType.rademacher, x.device)
        project = lambda g: projector.project(g, model_id=0)  # noqa: E731
    except ImportError:
        if num_params * k * 4 > (8 << 30):
            return "torch.func + dense projection (the matrix does not fit: not run)", None
        name = f"torch.func + dense Rademacher projection ({trak.note})"
        dense = ln.RandomProjector(num_params, k, "rademacher", 0, memory_budget=8 << 30)
        project = dense.project

    def run():
        for c in range(CLASSES):
            grads = per_class(params, x, c)
            project(torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1))

    return name, run


# -- measuring --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Best seconds of up to ``repeats`` calls after a warm-up call (fewer once 10 s are spent; the
    warm-up alone when it takes over 5 s), and the peak GPU memory of a call in GiB (None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def elapsed() -> float:
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    first = elapsed()
    best, spent = (first, float("inf")) if first > 5 else (float("inf"), 0.0)
    for _ in range(repeats):
        if spent > 10:
            break
        seconds = elapsed()
        best, spent = min(best, seconds), spent + seconds
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return best, memory


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.cpu() - b.cpu()).norm() / b.cpu().norm().clamp_min(1e-300)).item()


# -- 1. correctness ---------------------------------------------------------------------------------


def correctness(device: torch.device, sizes: Sizes) -> list[tuple[str, float, float]]:
    """``(check, value, tolerance)`` for every check: relative differences, counts of modules."""
    results = []
    torch.manual_seed(0)
    cases = {
        "SPEC CNN": (spec_cnn().double(), torch.randn(6, 3, 32, 32, dtype=torch.float64)),
        "ResNet-18 (width 8)": (ResNet18(width=8).double(), torch.randn(4, 3, 16, 16, dtype=torch.float64)),
        "token model": (TokenModel().double(), torch.randint(0, 50, (6, 9))),
        "transformer (width 16)": (SmallTransformer(features=8, length=6, width=16, heads=2).double(), torch.randn(4, 6, 8, dtype=torch.float64)),
    }
    for name, (cpu_model, x) in cases.items():
        model, dx = copy.deepcopy(cpu_model).to(device), x.to(device)
        for route, weight in (("fold", float("inf")), ("FFT", 0.0)):
            want = LayerGradients(cpu_model, batch_classes=False).project(x, ln.SketchProjector(300, 3, fft_weight=weight))
            got = LayerGradients(model, batch_classes=True).project(dx, ln.SketchProjector(300, 3, fft_weight=weight))
            results.append((f"{name}: sketch features, {route} route, classes batched", relative(got, want), 1e-9))
        want = ln.project_features(cpu_model, x, projection_dim=300, projector="sketch", seed=3)
        got = ln.project_features(model, dx, projection_dim=300, projector="sketch", seed=3)
        results.append((f"{name}: sketch features, the featurizer's defaults", relative(got, want), 1e-9))
        for kind in ("trntk", "pntk"):
            want = ln.exact_kernel(cpu_model, x, kind=kind)
            results.append((f"{name}: factored exact {kind}", relative(ln.exact_kernel(model, dx, kind=kind), want), 1e-9))
        want = ln.project_features(cpu_model, x, projection_dim=64, projector="gaussian", seed=1)
        got = ln.project_features(model, dx, projection_dim=64, projector="gaussian", seed=1)
        results.append((f"{name}: dense Gaussian features", relative(got, want), 1e-9))
        want = ln.kernel_from_features(ln.project_features(cpu_model, x, projection_dim=512, projector="sketch"))
        half = ln.project_features(model.float(), dx.float() if dx.is_floating_point() else dx, projection_dim=512,
                                   projector="sketch", dtype=torch.float16)
        results.append((f"{name}: kernel of float16 features against float64", relative(ln.kernel_from_features(half), want), 5e-3))
    for name in ("SPEC CNN", "ResNet-18 (width 8)"):
        cpu_model, x = cases[name]
        exact = ln.exact_kernel(cpu_model, x)
        for setting in ("TF32 convolutions", "bf16 autocast", "float16 weights"):
            model, dx = copy.deepcopy(cpu_model).to(device, torch.float16 if setting == "float16 weights" else torch.float32), x.to(device)
            dx = dx.to(next(model.parameters()).dtype)
            featurizer = ln.Featurizer(model, projection_dim=4096, projector="sketch")
            torch.backends.cudnn.allow_tf32 = True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting == "bf16 autocast"):
                    features = featurizer.featurize_batch(dx)
            results.append((f"{name}, {setting}: modules on the generic path", len(featurizer.gradients.fallback_modules), 0))
            error = (ln.kernel_from_features(features) - exact.to(features.device)).abs().max().item()
            results.append((f"{name}, {setting}: largest kernel difference from float64 (K = 4,096)", error, 0.1))
    return results


# -- 2. speed ---------------------------------------------------------------------------------------


def speed(device: torch.device, sizes: Sizes, trak: TrakBuild) -> list[str]:
    lines = [
        "| cuDNN | model | batch | K | method | examples/s | share of floor | × authors | peak GPU memory | × floor's memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cuda_projector = device.type == "cuda" and trak.cuda_projector_ready()
    models = (
        ("SPEC CNN", spec_cnn, sizes.spec_batch, (3, 32, 32)),
        ("ResNet-18", lambda: ResNet18(width=sizes.resnet_width), sizes.resnet_batch, (3, 32, 32)),
        ("Transformer 2×64, 16 positions", SmallTransformer, sizes.spec_batch, (16, 32)),
    )
    for setting, tf32 in (("defaults (TF32)", True), ("TF32 off", False)):
        torch.backends.cudnn.allow_tf32 = tf32
        for name, make, batch, input_shape in models:
            torch.manual_seed(0)
            model = make().to(device).eval()
            x = torch.randn(batch, *input_shape, device=device)
            t_floor, m_floor = timed(floor(model, x), device, sizes.repeats)

            def line(k, method, t, memory, authors=None):
                gib = f"{memory:.2f} GiB" if memory is not None else "—"
                ratio = f"{memory / m_floor:.2f}×" if memory is not None else "—"
                versus = f"{authors / t:.1f}×" if authors else ""
                lines.append(f"| {setting} | {name} | {batch} | {k} | {method} | {batch / t:,.0f} | {100 * t_floor / t:.0f}% | "
                             f"{versus} | {gib} | {ratio} |")

            line("—", "floor: forward + C backward passes", t_floor, m_floor)
            line("—", "outputs only: C backward passes to layer outputs", *timed(outputs_only(model, x), device, sizes.repeats))
            for k in sizes.ks:
                featurizer = ln.Featurizer(model, projection_dim=k, projector="sketch")
                t_sketch, m_sketch = timed(lambda: featurizer.featurize_batch(x), device, sizes.repeats)
                fallback = featurizer.gradients.fallback_modules
                method, run = authors_pipeline(model, x, k, trak, cuda_projector)
                t_authors = None
                if run is not None:
                    t_authors, m_authors = timed(run, device, sizes.repeats)
                line(f"{k:,}", "sketch" + (f" ({len(fallback)} modules on the generic path)" if fallback else ""), t_sketch, m_sketch, t_authors)
                if t_authors is not None:
                    line(f"{k:,}", method, t_authors, m_authors)
                else:
                    lines.append(f"| {setting} | {name} | {batch} | {k:,} | {method} | | | | | |")
            del model, x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    torch.backends.cudnn.allow_tf32 = True
    return lines


# -- 3. the callback in a Trainer ---------------------------------------------------------------------


class EpochTimes(L.Callback):
    """Wall time of every training epoch (its steps and validation) and of what follows it up to the next
    epoch's start or the end of training (the checkpoint, when this callback comes first)."""

    def __init__(self):
        self.epochs: list[float] = []
        self.after: list[float] = []

    def _now(self, trainer) -> float:
        synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        if len(self.after) < len(self.epochs):
            self.after.append(self._now(trainer) - self._end)
        self._start = self._now(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._end = self._now(trainer)
        self.epochs.append(self._end - self._start)

    def on_train_end(self, trainer, pl_module):
        self.after.append(self._now(trainer) - self._end)


def trainer_run(device: torch.device, sizes: Sizes) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(sizes.train + sizes.query, 3, 32, 32, generator=generator)
    labels = torch.randint(0, CLASSES, (sizes.train + sizes.query,), generator=generator)
    train = TensorDataset(images[: sizes.train], labels[: sizes.train])
    val = TensorDataset(images[sizes.train :], labels[sizes.train :])
    torch.manual_seed(0)
    module = Classifier(ResNet18(width=sizes.resnet_width), lr=0.05)
    timer = EpochTimes()
    callback = ln.NTKAttributionCallback(
        kernel="proj_trntk", projection={"dim": 2048, "projector": "sketch"},
        subsets={"max_train_examples": sizes.reference, "max_query_examples": sizes.query, "batch_size": sizes.trainer_batch},
        top_k=0, at_fit_end=False, store={"dir": tempfile.mkdtemp(prefix="ntk-store-")},
    )
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=2, callbacks=[timer, callback],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="trainer-"),
    )
    trainer.fit(module, DataLoader(train, batch_size=sizes.trainer_batch, shuffle=True, num_workers=2),
                DataLoader(val, batch_size=sizes.trainer_batch, num_workers=2))
    fallback = callback.pipeline.featurizer.gradients.fallback_modules
    lines = [
        f"ResNet-18 on {sizes.train:,} synthetic 3×32×32 examples, batch {sizes.trainer_batch}, {sizes.reference:,} reference / "
        f"{sizes.query:,} query, sketch K = 2,048, modules on the generic path: {len(fallback)}",
        "",
        "| epoch | training epoch (s) | checkpoint (s) | featurize (s) | fit (s) | checkpoint / epoch |",
        "|---|---|---|---|---|---|",
    ]
    for epoch, (seconds, after, row) in enumerate(zip(timer.epochs, timer.after, callback.history)):
        lines.append(f"| {epoch} | {seconds:.1f} | {after:.1f} | {row.featurize_seconds:.1f} | {row.fit_seconds:.1f} | {after / seconds:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=Path, default=Path(__file__).parent / "peers", help="folder with TRAK's source archives")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on the CPU when there is no GPU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("No CUDA device: this script checks and times the GPU paths (use --smoke to try it on the CPU).")
    device = torch.device("cuda" if cuda else "cpu")
    sizes = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    trak = TrakBuild(args.peers if args.peers.exists() else None, cuda)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"torch {torch.__version__}, {name}, {CLASSES} classes{' (smoke sizes)' if args.smoke else ''}\n", flush=True)
    failed = False
    for check, value, tolerance in correctness(device, sizes):
        ok = value <= tolerance
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {check}: {value:.1e} (tolerance {tolerance:.0e})", flush=True)
    print(f"\n[{time.perf_counter() - started:.0f} s] Speed:\n", flush=True)
    print("\n".join(speed(device, sizes, trak)), flush=True)
    print(f"\n[{time.perf_counter() - started:.0f} s] The callback in a Trainer:\n", flush=True)
    print("\n".join(trainer_run(device, sizes)), flush=True)
    print(f"\n[{time.perf_counter() - started:.0f} s] done", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
