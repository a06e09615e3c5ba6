"""The whole training set as reference: featurize, fit and attribution time and peak memory, on one process.

A small CNN (the digits upsampled to 1×28×28, repeated with shifts and pixel noise up to the reference size,
no download; 10 classes) trained for one epoch; proj-trNTK, K = 1,024, sketch projector, features stored in
float16. Each reference size runs in its own process, in three stages timed and measured apart:

- featurize: the reference and 500 query examples written to a feature store as they are computed
  (:meth:`FidelityPipeline.write_features` into a :meth:`FeatureStore.writer`);
- fit (+ score): :meth:`FidelityPipeline.evaluate` on the stored entry, read back as memory maps; with
  ``--memory-budget`` (default 64 MB) the ``N×N`` kernel is formed only up to 4,096 examples, above that
  the surrogate reads the stored features in blocks;
- attribute: :meth:`FidelityPipeline.attribute` of 500 new inputs (their featurization included).

Peak memory is the process's peak resident set (``VmHWM``, reset between stages through
``/proc/self/clear_refs``), which counts the pages of the memory-mapped store the stage has read; "above
start" subtracts the resident set when the stage began (the interpreter, torch, the data and the model).

    python benchmarks/scale.py                         # 5k, 10k, 20k, 50k reference examples
    python benchmarks/scale.py --sizes 5000 10000      # some of them
    python benchmarks/scale.py --quick                 # 300 examples, to check that it runs

Two ranks: the rows of a 2-process sharded run go where ``run_sharded`` is called below (not measured here).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.checkpoint_cost import cnn, digits_28, train
from lightning_ntk import FidelityPipeline
from lightning_ntk.pipeline import CheckpointFeatures, entry_name, example_set
from lightning_ntk.store import FeatureStore

QUERIES = 500


def _status(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class Stage:
    """Seconds, peak resident bytes and peak above the resident bytes at the start, of one stage."""

    def __enter__(self) -> "Stage":
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        self.start_rss, self.started = _status("VmRSS"), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.peak = _status("VmHWM")
        self.above = self.peak - self.start_rss


def measure(size: int, memory_budget: int, folder: Path) -> dict:
    """One reference size, in this process."""
    torch.set_num_threads(2)
    copies = math.ceil(size / len(digits_28(1)[0]))
    x_train, y_train, x_test, y_test = digits_28(copies)
    if len(x_train) < size:
        raise RuntimeError(f"{copies} copies of the digits hold {len(x_train)} examples, fewer than {size}")
    x_query = torch.cat([x_test, x_test.flip(3)])[: 2 * QUERIES]  # the first 500 are scored, the next 500 attributed
    y_query = torch.cat([y_test, y_test])[: 2 * QUERIES]
    model = train(cnn(), x_train[:1437], y_train[:1437], epochs=1)
    pipeline = FidelityPipeline(model, "proj_trntk", {"projector": "sketch"}, storage_dtype=torch.float16, memory_budget=memory_budget)
    reference = example_set("reference", (x_train[:size], y_train[:size]))
    query = example_set("query", (x_query[:QUERIES], y_query[:QUERIES]))
    for examples in (reference, query):
        examples.scan(pipeline.task)
    store = FeatureStore(folder)
    with torch.inference_mode(False), torch.enable_grad():
        spec = pipeline.spec()
        request = pipeline.request(spec, reference, query)
        with Stage() as featurize:
            with store.writer(entry_name("scale", request), request) as writer:
                pipeline.write_features(writer, reference, query)
                features = CheckpointFeatures.from_arrays(writer.publish())
        stored = int(features.reference_features.nbytes + features.query_features.nbytes)
        with Stage() as fit:
            checkpoint = pipeline.evaluate(features, spec)
        with Stage() as attribute:
            pipeline.attribute(checkpoint, x_query[QUERIES:], top_k=5)
    record = checkpoint.record
    return {
        "size": size, "stored": stored, "kernel_matrix": size**2 * 4 <= memory_budget,
        "featurize": vars(featurize), "fit": vars(fit), "attribute": vars(attribute),
        "fit_seconds": record.fit_seconds, "score_seconds": record.score_seconds, "iterations": record.fit_iterations,
        "converged": record.surrogate_converged, "tau": record.kendall_tau, "passes": checkpoint.surrogate.fit_record["kernel_passes"],
    }


def run_sharded(size: int) -> dict | None:
    """The 2-rank row of ``size`` (the features sharded over 2 gloo ranks): not measured by this script yet."""
    return None


def print_table(rows: list[dict]) -> None:
    mb = lambda b: f"{b / 1e6:,.0f}"  # noqa: E731
    print("| reference | processes | stored MB | featurize s | fit s (iterations, kernel passes) | score s | attribute 500 s | "
          "peak RSS MB: featurize / fit+score / attribute | above start MB: featurize / fit+score / attribute | fit peak / stored |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, t, a = r["featurize"], r["fit"], r["attribute"]
        path = "N×N kernel" if r["kernel_matrix"] else "blocks"
        print(f"| {r['size']:,} | 1 | {mb(r['stored'])} | {f['seconds']:.1f} | {r['fit_seconds']:.1f} ({r['iterations']}, {r['passes']}; {path}"
              f"{'' if r['converged'] else ', not converged'}) | {r['score_seconds']:.1f} | {a['seconds']:.1f} | "
              f"{mb(f['peak'])} / {mb(t['peak'])} / {mb(a['peak'])} | {mb(f['above'])} / {mb(t['above'])} / {mb(a['above'])} | "
              f"{t['peak'] / r['stored']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000, 50000])
    parser.add_argument("--memory-budget", type=int, default=64 << 20, help="bytes; the N×N kernel is formed only within it")
    parser.add_argument("--quick", action="store_true", help="300 reference examples, to check that it runs")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    args = parser.parse_args()
    if args.one is not None:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(measure(args.one, args.memory_budget, Path(folder))))
        return
    rows = []
    for size in [300] if args.quick else args.sizes:
        done = subprocess.run([sys.executable, __file__, "--one", str(size), "--memory-budget", str(args.memory_budget)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"measured {size:,} reference examples: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        sharded = run_sharded(size)  # 2-rank rows: fill in run_sharded
        if sharded is not None:
            rows.append(sharded)
    print(f"Reference sizes on one process, 2 CPU threads, {QUERIES} query examples, K = 1,024, C = 10, float16 store, "
          f"memory budget {args.memory_budget / 2**20:.0f} MiB.")
    print_table(rows)


if __name__ == "__main__":
    main()
