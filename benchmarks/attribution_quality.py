"""Do the attributions predict what retraining does? LDS and mislabel detection, side by side with TRAK.

For each setup (an MLP and a small CNN on scikit-learn's 8×8 digits: 1,000 training digits, 500 query
digits), ``--retrainings`` models are trained on random halves of the training set (and as many again
with other seeds, for the noise ceiling), and every attribution method scores the queries against the
training set from the network trained on all of it. The linear datamodeling score (LDS, see
:mod:`lightning_ntk.datamodeling`) says how well each method's scores predict the retrained models'
margins. Methods, with their seconds (featurizing, fitting and scoring; training excluded everywhere):

- this library, through :class:`lightning_ntk.FidelityPipeline` at its defaults (proj-trNTK, K = 1,024):
  ``influence`` (the default of ``attribute``), ``representer`` (the surrogate's logit contributions),
  and ``influence`` averaged over four checkpoints of the training run (at 25/50/75/100% of it); and
  ``influence`` with the surrogate's penalty α raised from its default 1e-4 to 3e-4 and 1e-3, with the
  surrogate's fidelity (Kendall-τ) beside it, since α trades one against the other;
- TRAK (``traker`` 0.3.2 on the CPU, ``BasicProjector``, the same K) on the final model, on five models
  trained with other seeds, and on the same four checkpoints, each with its ridge ``λ`` tuned over a grid on
  the very LDS it is judged by (at its default ``λ = 0`` it scores near 0 here: ``XᵀX`` is singular);
- "same label as the query" (+1/−1) and random scores.

Mislabel detection: 10% of the training labels flipped, three seeds; training examples ranked by the
surrogate's loss on them, by this library's self-influence, by TRAK's self-influence (λ = 100, the best
λ of the MLP's LDS) and by the network's own loss; AUROC and the share of flipped labels among the top 10%.

    python benchmarks/attribution_quality.py                  # both setups, 100 retrainings each: ~20 minutes on 2 cores
    python benchmarks/attribution_quality.py --quick          # small sizes, to check that it runs

Retrainings are kept under ``benchmarks/results/`` and reused by the next run with the same settings.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trak_baseline import trak_scores  # noqa: E402

import lightning_ntk as ln  # noqa: E402
from lightning_ntk.datamodeling import (  # noqa: E402
    Retraining, flip_labels, linear_datamodeling_score, mislabel_auroc, noise_ceiling, random_subsets,
)

RESULTS = Path(__file__).resolve().parent / "results"
# TRAK's ridge on XᵀX: at K = 1,024 and 1,000 training examples XᵀX is singular, and at its default λ = 0 TRAK
# scores near LDS 0. It is tuned here on the LDS it is judged by, which favours TRAK.
TRAK_LAMBDAS = (1.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)


def digits(num_train: int, num_query: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:num_train], y[:num_train], x[num_train : num_train + num_query], y[num_train : num_train + num_query]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


SETUPS: dict[str, Callable[[int], nn.Module]] = {"mlp": mlp, "cnn": cnn}


def train(make: Callable[[int], nn.Module], x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, snapshots: tuple[int, ...] = ()) -> list[nn.Module]:
    """Adam (lr 3e-3, batches of 64) for ``epochs`` epochs from ``make(seed)``; the model after each epoch
    listed in ``snapshots`` (1-based), then the final one."""
    model = make(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    kept = []
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(x), generator=order).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        if epoch in snapshots:
            kept.append(copy.deepcopy(model).eval())
    return kept + [model.eval()]


@dataclass
class Row:
    method: str
    lds: str
    seconds: float | None


def timed(run: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def library_scores(models: list[nn.Module], train_set: tuple, query_set: tuple, method: str, dim: int, alpha: float = 1e-4) -> tuple[tuple, float]:
    """The pipeline at its defaults (but the surrogate's ``alpha``) on each model (a checkpoint each), then
    attribute with all of them; the queries' true class is explained, as the LDS measures its margin. Returns
    the scores and the last checkpoint's Kendall-τ, and the seconds."""

    def run():
        checkpoints = [ln.FidelityPipeline(model, projection={"dim": dim}, surrogate={"alpha": alpha}).run(train_set, query_set) for model in models]
        scores = ln.attribute([c.surrogate for c in checkpoints], query_kernel=[c.query_rows for c in checkpoints],
                              target=query_set[1], method=method, return_scores=True).scores
        return scores, checkpoints[-1].record.kendall_tau

    return timed(run)


def retraining(name: str, args: argparse.Namespace) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, Retraining]:
    """The digits of a setup, the random halves and the retraining harness (cached under ``benchmarks/results/``)."""
    make = SETUPS[name]
    x, y, xq, yq = digits(args.train, args.queries)
    subsets = random_subsets(len(x), args.retrainings, seed=1)
    harness = Retraining(lambda data, seed: train(make, *map(torch.stack, zip(*[data[i] for i in range(len(data))])), seed, args.epochs)[-1],
                         torch.utils.data.TensorDataset(x, y), (xq, yq), folder=RESULTS / "retrainings", name=f"{name}-e{args.epochs}-n{args.train}")
    return (x, y, xq, yq), subsets, harness


def digits_parser(description: str) -> argparse.ArgumentParser:
    """The options both attribution benchmarks share: setups, sizes, retrainings, K, threads, ``--quick``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--retrainings", type=int, default=100, help="models trained on random halves (and as many for the noise ceiling)")
    parser.add_argument("--train", type=int, default=1000, help="training digits")
    parser.add_argument("--queries", type=int, default=500, help="query digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--dim", type=int, default=1024, help="projection dimension K of both the library and TRAK")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    return parser


def quick_sizes(args: argparse.Namespace) -> None:
    """``--quick``: small sizes, to check that it runs."""
    if args.quick:
        args.retrainings, args.train, args.queries, args.epochs, args.dim = 8, 200, 40, 4, 128


def lds_table(name: str, args: argparse.Namespace) -> list[Row]:
    make = SETUPS[name]
    (x, y, xq, yq), subsets, retraining_harness = retraining(name, args)
    margins = retraining_harness.margins(subsets)
    ceiling = noise_ceiling(margins, retraining_harness.margins(subsets, seeds=range(10_000, 10_000 + len(subsets))))
    quarters = tuple(round(args.epochs * q) for q in (0.25, 0.5, 0.75))
    run = train(make, x, y, 0, args.epochs, quarters)  # the checkpoints of one run: 25%, 50%, 75%, 100%
    others = [train(make, x, y, seed, args.epochs)[-1] for seed in range(1, 5)]
    final, five = run[-1], [run[-1]] + others

    rows = [Row("noise ceiling (two retrainings on the same halves)", str(ceiling), None)]
    rows.append(Row("random scores", str(linear_datamodeling_score(torch.randn(len(xq), len(x), generator=torch.Generator().manual_seed(0)), subsets, margins)), None))
    rows.append(Row('"same label as the query" (+1/−1)', str(linear_datamodeling_score((yq[:, None] == y[None]).double() * 2 - 1, subsets, margins)), None))
    for label, models, method, alpha in (("library representer contributions, final model", [final], "representer", 1e-4),
                                         ("library influence, final model", [final], "influence", 1e-4),
                                         ("library influence, 4 checkpoints of the run", run, "influence", 1e-4),
                                         *((f"library influence, final model, surrogate α = {a:g}", [final], "influence", a) for a in (3e-4, 1e-3))):
        (scores, tau), seconds = library_scores(models, (x, y), (xq, yq), method, args.dim, alpha)
        rows.append(Row(f"{label} (surrogate's Kendall-τ {tau:.3f})", str(linear_datamodeling_score(scores, subsets, margins)), seconds))
    result = trak_scores([final], (x, y), (xq, yq), proj_dim=args.dim, batch_size=500)
    rows.append(Row("TRAK, final model, λ = 0 (its default)", str(linear_datamodeling_score(result.scores, subsets, margins)), result.seconds))
    for label, models in (("TRAK, final model", [final]), ("TRAK, 5 models (other seeds)", five), ("TRAK, the same 4 checkpoints", run)):
        lds, result, best = max(
            ((linear_datamodeling_score(r.scores, subsets, margins), r, lam)
             for lam in TRAK_LAMBDAS for r in [trak_scores(models, (x, y), (xq, yq), proj_dim=args.dim, batch_size=500, lambda_reg=lam)]),
            key=lambda item: item[0].mean,
        )
        rows.append(Row(f"{label}, λ tuned on this LDS (λ = {best:g})", str(lds), result.seconds))
    pipeline = ln.FidelityPipeline(final, projection={"dim": args.dim})
    checkpoint = pipeline.run((x, y), (xq, yq))
    _, attributing = timed(lambda: ln.attribute(checkpoint.surrogate, query_kernel=checkpoint.query_rows, network_logits=checkpoint.features.query_logits))
    _, featurizing = timed(lambda: pipeline.features(x))
    rows.append(Row(f"cost: attributing the {len(xq)} queries (final model) / featurizing the {len(x)} reference examples once",
                    f"{attributing:.2f} s / {featurizing:.2f} s", None))
    return rows


def mislabel_table(name: str, args: argparse.Namespace) -> list[tuple[str, list[float], list[float]]]:
    """AUROC and top-10% share of each ranking, per seed."""
    make = SETUPS[name]
    x, y, _, _ = digits(args.train, 0)
    results: dict[str, tuple[list[float], list[float]]] = {}
    for seed in range(3):
        noisy, flipped = flip_labels(y, 0.1, 10, seed=seed)
        model = train(make, x, noisy, seed, args.epochs)[-1]
        checkpoint = ln.FidelityPipeline(model, projection={"dim": args.dim}).run((x, noisy), (x[:50], noisy[:50]))
        surrogate = checkpoint.surrogate
        train_rows = ln.kernel_from_features(checkpoint.features.reference_features)
        self_influence = ln.attribute(surrogate, query_kernel=train_rows, target=noisy, return_scores=True).scores.diagonal()
        with torch.no_grad():
            network_loss = nn.functional.cross_entropy(model(x), noisy, reduction="none")
        trak = trak_scores([model], (x, noisy), (x[:1], noisy[:1]), proj_dim=args.dim, batch_size=500, lambda_reg=100.0).self_influence
        rankings = {"surrogate's loss on the example": surrogate.curvature.losses, "library self-influence": self_influence,
                    "TRAK self-influence": trak, "network's loss on the example": network_loss}
        for label, suspicion in rankings.items():
            top = suspicion.topk(len(x) // 10).indices
            auroc, share = results.setdefault(label, ([], []))
            auroc.append(mislabel_auroc(suspicion, flipped))
            share.append(float(flipped[top].float().sum() / flipped.sum()))
    return [(label, *values) for label, values in results.items()]


def mean_se(values: list[float]) -> str:
    mean = sum(values) / len(values)
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) if len(values) > 1 else math.nan
    return f"{mean:.3f} ± {se:.3f}"


def main() -> None:
    args = digits_parser(__doc__).parse_args()
    quick_sizes(args)
    torch.set_num_threads(args.threads)
    for name in args.setups:
        print(f"\n### {name}: {args.train} training / {args.queries} query digits, {args.retrainings} retrainings on halves, K = {args.dim}\n")
        print("| attribution | LDS (± SE over queries) | seconds |\n|---|---|---|")
        for row in lds_table(name, args):
            print(f"| {row.method} | {row.lds} | {'' if row.seconds is None else f'{row.seconds:.2f}'} |")
        print(f"\n{name}, 10% of the training labels flipped, 3 seeds:\n")
        print("| ranking | AUROC | share of the flipped labels in the top 10% |\n|---|---|---|")
        for label, auroc, share in mislabel_table(name, args):
            print(f"| {label} | {mean_se(auroc)} | {mean_se(share)} |")


if __name__ == "__main__":
    main()
