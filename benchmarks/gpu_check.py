"""Check the CUDA paths against the CPU, then time them: run on a machine with an NVIDIA GPU.

1. Correctness (float64, the same seeds on both devices): sketch features (fold and FFT routes), the
   factored exact trNTK, the dense projection, and kernels of half-precision features, each on the GPU
   against the CPU, for the SPEC CNN and a token model (embedding, LayerNorm, grouped Conv1d, Linear).
2. Speed (float32): sketch featurization against the C-backward floor on the GPU, for the SPEC CNN and
   ResNet-18, K ∈ {2048, 10240}, with peak GPU memory.

Usage: ``python benchmarks/gpu_check.py [--quick]``. Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from featurize_speed import CLASSES, ResNet18, floor, spec_cnn
from torch import nn

import lightning_ntk as ln
from lightning_ntk import projection

FFT_WEIGHT = projection.FFT_WEIGHT


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


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.cpu() - b.cpu()).norm() / b.cpu().norm().clamp_min(1e-300)).item()


def correctness(device: str = "cuda") -> list[tuple[str, float, float]]:
    """``(check, relative difference device vs CPU, tolerance)`` for every check."""
    results = []
    torch.manual_seed(0)
    cases = {
        "SPEC CNN": (spec_cnn().double(), torch.randn(6, 3, 32, 32, dtype=torch.float64)),
        "token model": (TokenModel().double(), torch.randint(0, 50, (6, 9))),
    }
    for name, (cpu_model, x) in cases.items():
        model, dx = copy.deepcopy(cpu_model).to(device), x.to(device)
        for route, weight in (("fold", float("inf")), ("FFT", 0.0)):
            projection.FFT_WEIGHT = weight
            want = ln.project_features(cpu_model, x, projection_dim=300, projector="sketch", seed=3)
            got = ln.project_features(model, dx, projection_dim=300, projector="sketch", seed=3)
            results.append((f"{name}: sketch features, {route} route", relative(got, want), 1e-9))
        projection.FFT_WEIGHT = FFT_WEIGHT
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
    return results


def seconds(fn) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def speed(quick: bool) -> list[str]:
    lines = ["| model | batch | K | floor ex/s | sketch ex/s | share of floor | peak GPU memory |", "|---|---|---|---|---|---|---|"]
    for name, make, batch in (("SPEC CNN", spec_cnn, 256), ("ResNet-18 (32×32)", ResNet18, 64)):
        torch.manual_seed(0)
        model = make().cuda().eval()
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        t_floor = seconds(floor(model, x))
        for k in (2048,) if quick else (2048, 10240):
            featurizer = ln.Featurizer(model, projection_dim=k, projector="sketch")
            torch.cuda.reset_peak_memory_stats()
            t = seconds(lambda: featurizer.featurize_batch(x))
            memory = torch.cuda.max_memory_allocated() / 2**30
            lines.append(f"| {name} | {batch} | {k:,} | {batch / t_floor:,.0f} | {batch / t:,.0f} | {100 * t_floor / t:.0f}% | {memory:.2f} GiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 2,048 only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("No CUDA device: this script checks and times the GPU paths.")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {CLASSES} classes\n")
    failed = False
    for check, difference, tolerance in correctness():
        ok = difference <= tolerance
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {check}: relative difference {difference:.1e} (tolerance {tolerance:.0e})")
    print()
    print("\n".join(speed(args.quick)))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
