"""Do 16-bit stored features move fidelity or attributions beyond the projection's own seed-to-seed spread?

The callback stores each checkpoint's features on disk; halving them to 16 bits halves the store. For the
two setups of ``attribution_quality.py`` (an MLP and a small CNN on 1,000 training / 500 query digits,
K = 1,024), the pipeline runs with five projection seeds, each with the features kept in float32, float16
and bfloat16, and reports per storage dtype:

- Kendall-τ and the LDS of the influence attributions (the retrainings of ``attribution_quality.py``,
  read back from ``benchmarks/results/`` when that benchmark ran with the same settings), mean ± SD over
  the seeds;
- how far each moves from float32 at the same seed (mean |Δ|), against the SD over seeds;
- the top-5 proponents shared with float32 at the same seed, against those shared by two seeds in float32.

    python benchmarks/storage_precision.py            # both setups, 100 retrainings: ~5 minutes once retrainings are cached
    python benchmarks/storage_precision.py --quick    # small sizes, to check that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution_quality import SETUPS, digits_parser, quick_sizes, retraining, train  # noqa: E402

import lightning_ntk as ln  # noqa: E402
from lightning_ntk.datamodeling import linear_datamodeling_score  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shared_top(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> float:
    """The share of the top-k proponents (per query) two score matrices have in common."""
    top_a, top_b = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return float((top_a[:, :, None] == top_b[:, None, :]).any(2).float().mean())


def compare(name: str, args: argparse.Namespace) -> list[str]:
    (x, y, xq, yq), subsets, harness = retraining(name, args)
    margins = harness.margins(subsets)
    model = train(SETUPS[name], x, y, 0, args.epochs)[-1]
    taus: dict[str, list[float]] = {d: [] for d in DTYPES}
    lds: dict[str, list[float]] = {d: [] for d in DTYPES}
    scores: dict[str, list[torch.Tensor]] = {d: [] for d in DTYPES}
    for seed in range(args.seeds):
        for dtype, torch_dtype in DTYPES.items():
            checkpoint = ln.FidelityPipeline(model, projection={"dim": args.dim, "seed": seed}, storage_dtype=torch_dtype).run((x, y), (xq, yq))
            result = ln.attribute(checkpoint.surrogate, query_kernel=checkpoint.query_rows, target=yq, return_scores=True)
            taus[dtype].append(checkpoint.record.kendall_tau)
            lds[dtype].append(linear_datamodeling_score(result.scores, subsets, margins).mean)
            scores[dtype].append(result.scores)
    between_seeds = statistics.mean(shared_top(scores["float32"][i], scores["float32"][j]) for i in range(args.seeds) for j in range(i))
    rows = []
    for dtype in DTYPES:
        moved = [(statistics.mean(abs(a - b) for a, b in zip(values[dtype], values["float32"]))) for values in (taus, lds)]
        same_seed = statistics.mean(shared_top(a, b) for a, b in zip(scores[dtype], scores["float32"]))
        rows.append(f"| {name} | {dtype} | {statistics.mean(taus[dtype]):.4f} ± {statistics.stdev(taus[dtype]):.4f} | {moved[0]:.4f} | "
                    f"{statistics.mean(lds[dtype]):.4f} ± {statistics.stdev(lds[dtype]):.4f} | {moved[1]:.4f} | {same_seed:.3f} | {between_seeds:.3f} |")
    return rows


def main() -> None:
    parser = digits_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=5, help="projection seeds")
    args = parser.parse_args()
    quick_sizes(args)
    if args.quick:
        args.seeds = 2
    torch.set_num_threads(args.threads)
    print(f"\n{args.train} training / {args.queries} query digits, K = {args.dim}, {args.seeds} projection seeds, "
          f"{args.retrainings} retrainings, {args.threads} threads\n")
    print("| setup | stored as | Kendall-τ (mean ± SD over seeds) | τ moved from float32 (mean abs) | LDS (mean ± SD over seeds) | "
          "LDS moved from float32 | top-5 proponents shared with float32, same seed | shared by two float32 seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.setups:
        for row in compare(name, args):
            print(row, flush=True)


if __name__ == "__main__":
    main()
