"""What one fidelity checkpoint costs with the defaults, against the C-backward floor for the same examples.

A CNN (105,866 parameters) on the digits upsampled to 28×28, trained for two epochs, then one
checkpoint of :class:`lightning_ntk.FidelityPipeline` with its defaults (proj-trNTK, K = 1,024,
sketch projector, multinomial surrogate), cold and warm-started from the previous checkpoint's
solution as the callback does from its second checkpoint on. The floor is a forward pass plus one
backward pass per class (weight gradients included) over the same reference and query examples:
what any exact per-class gradient method must at least spend.

    python benchmarks/checkpoint_cost.py              # ~3 minutes on a 2-core CPU
    python benchmarks/checkpoint_cost.py --repeats 4  # and 4 timings of featurize and fit against the floor, sorted
    python benchmarks/checkpoint_cost.py --quick      # smaller sets, to check that it runs

One checkpoint per row says little on a shared machine (the floor itself moves by 10–15% from run to
run); ``--repeats`` times the same featurization and fit again in the same process, each right after
its own floor, for the first set.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from lightning_ntk import FidelityPipeline
from lightning_ntk.demos import load_digits_tensors
from lightning_ntk.pipeline import example_set


def digits_28(copies: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The digits upsampled to 1×28×28; the training split repeated ``copies`` times with a random
    shift of up to 2 pixels and pixel noise, so that larger reference sets hold distinct examples."""
    x_train, y_train, x_test, y_test = load_digits_tensors(image_shape=True)
    up = lambda x: F.interpolate(x, size=28, mode="bilinear", align_corners=False)  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    parts = [up(x_train)]
    for _ in range(copies - 1):
        shifted = torch.roll(up(x_train), shifts=tuple(int(s) for s in torch.randint(-2, 3, (2,), generator=g)), dims=(2, 3))
        parts.append((shifted + 0.05 * torch.randn(shifted.shape, generator=g)).clamp(0, 1))
    return torch.cat(parts), y_train.repeat(copies), up(x_test), y_test


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 2) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def floor_seconds(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> float:
    """Forward plus one backward pass per class, with weight gradients, over ``x`` in batches."""
    params = list(model.parameters())
    started = time.perf_counter()
    for batch in x.split(batch_size):
        logits = model(batch)
        for c in range(logits.shape[1]):
            torch.autograd.grad(logits[:, c].sum(), params, retain_graph=c + 1 < logits.shape[1])
    return time.perf_counter() - started


def measure(model: nn.Module, data: tuple[torch.Tensor, ...], reference: int, query: int) -> dict:
    x_train, y_train, x_test, y_test = data
    pipeline = FidelityPipeline(model)
    sizes = dict(max_train_examples=reference, max_query_examples=query)
    floor_seconds(model, x_train[:256])  # warm-up
    cold = pipeline.run((x_train, y_train), (x_test, y_test), **sizes)
    warm = pipeline.run((x_train, y_train), (x_test, y_test), **sizes, init=cold)
    floor = floor_seconds(model, torch.cat([x_train[:reference], x_test[:query]]))
    row = {"reference": reference, "query": query, "floor": floor}
    for name, checkpoint in (("cold", cold), ("warm", warm)):
        r = checkpoint.record
        row[name] = {"featurize": r.featurize_seconds, "fit": r.fit_seconds, "score": r.score_seconds, "iterations": r.fit_iterations,
                     "converged": r.surrogate_converged, "tau": r.kendall_tau, "tad": r.tad}
    return row


def repeated_ratios(model: nn.Module, data: tuple[torch.Tensor, ...], reference: int, query: int, repeats: int) -> list[tuple[float, float]]:
    """``(featurize / floor, fit / floor)`` for ``repeats`` featurizations and fits of the same sets, each
    against a floor timed right before it, sorted."""
    x_train, y_train, x_test, y_test = data
    pipeline = FidelityPipeline(model)
    sets = example_set("reference", (x_train, y_train), reference), example_set("query", (x_test, y_test), query)
    for examples in sets:
        examples.scan(pipeline.task)
    inputs = torch.cat([x_train[sets[0].indices], x_test[sets[1].indices]])
    pipeline.featurize(*sets)  # warm-up
    ratios = []
    for _ in range(repeats):
        floor = floor_seconds(model, inputs)
        started = time.perf_counter()
        features = pipeline.featurize(*sets)
        featurized = time.perf_counter()
        pipeline.fit(features, int(features.query_logits.shape[1]))
        ratios.append(((featurized - started) / floor, (time.perf_counter() - featurized) / floor))
    return sorted(ratios)


def print_table(rows: list[dict]) -> None:
    print("| reference / query | floor (s) | checkpoint | featurize (s) | fit (s) | score (s) | iterations | featurize + fit / floor | all / floor | Kendall τ | TAD (pp) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for name in ("cold", "warm"):
            c = row[name]
            featurize_fit = c["featurize"] + c["fit"]
            print(f"| {row['reference']:,} / {row['query']:,} | {row['floor']:.2f} | {name} | {c['featurize']:.2f} | {c['fit']:.2f} | "
                  f"{c['score']:.2f} | {c['iterations']}{'' if c['converged'] else ' (not converged)'} | {featurize_fit / row['floor']:.2f}× | "
                  f"{(featurize_fit + c['score']) / row['floor']:.2f}× | {c['tau']:.3f} | {100 * c['tad']:+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sets, to check that the script runs")
    parser.add_argument("--repeats", type=int, default=0, help="also time featurize and fit this many times against the floor (first set)")
    args = parser.parse_args()
    sets = [(200, 100)] if args.quick else [(1000, 500), (5000, 500)]
    data = digits_28(copies=1 if args.quick else 5)
    model = train(cnn(), data[0][:1300], data[1][:1300], epochs=1 if args.quick else 2)
    print(f"CNN with {sum(p.numel() for p in model.parameters()):,} parameters, {torch.get_num_threads()} threads; defaults of FidelityPipeline")
    print_table([measure(model, data, reference, query) for reference, query in sets])
    if args.repeats:
        ratios = repeated_ratios(model, data, *sets[0], args.repeats)
        print(f"\n{sets[0][0]:,} / {sets[0][1]:,}, {args.repeats} repetitions, sorted: featurize / floor "
              + " ".join(f"{f:.2f}" for f, _ in ratios) + "; fit / floor " + " ".join(f"{g:.2f}" for _, g in ratios)
              + "; featurize + fit / floor " + " ".join(f"{f + g:.2f}" for f, g in ratios))


if __name__ == "__main__":
    main()
