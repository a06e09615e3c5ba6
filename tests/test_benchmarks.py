"""The benchmark scripts run end to end at small sizes, so that none of them has rotted when a quiet
machine or the GPU machine is there to time them (the GPU script gets one prepared run)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_checkpoint_cost_runs_and_prints_its_table():
    out = run_script("benchmarks/checkpoint_cost.py", "--quick", "--repeats", "2")
    assert "| 200 / 100 |" in out and "cold" in out and "warm" in out
    assert "| featurize + fit / floor | all / floor |" in out  # the target's measure, and with scoring
    assert re.search(r"2 repetitions, sorted: featurize / floor [0-9.]+ [0-9.]+; fit / floor", out), out[-1000:]


@pytest.mark.slow
def test_the_gpu_script_runs_on_the_cpu_at_smoke_sizes():
    """Every part of the prepared GPU run, the checks against float64 and the trainer run with two
    checkpoints (the second warm-started) included."""
    out = run_script("benchmarks/gpu_check.py", "--smoke")
    assert "The callback in a Trainer" in out and "| 1 |" in out, out[-2000:]


@pytest.mark.slow
def test_attribution_quality_runs_and_prints_its_tables():
    out = run_script("benchmarks/attribution_quality.py", "--quick", "--setups", "mlp")
    for row in ("noise ceiling", "library influence, final model", "library influence, 4 checkpoints of the run",
                "TRAK, the same 4 checkpoints, λ tuned", "cost: attributing the 40 queries", "surrogate's loss on the example"):
        assert row in out, out[-2000:]
    assert re.search(r"\| library influence, final model \(surrogate's Kendall-τ [0-9.]+\) \| -?[0-9.]+ ± [0-9.]+ \| [0-9.]+ \|", out), out[-2000:]


@pytest.mark.slow
def test_callback_overhead_runs_and_prints_its_table():
    out = run_script("benchmarks/callback_overhead.py", "--quick")
    assert "| model | epochs | fit without the callback (s) |" in out
    for model in ("cnn", "bert"):
        assert re.search(rf"\| {model} \([0-9,]+ parameters\) \| 3 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| 1 \(epochs 2\) \|", out), out[-2000:]


@pytest.mark.slow
def test_storage_precision_runs_and_prints_its_table():
    out = run_script("benchmarks/storage_precision.py", "--quick", "--setups", "mlp")
    for dtype in ("float32", "float16", "bfloat16"):
        assert f"| mlp | {dtype} |" in out, out[-2000:]


@pytest.mark.slow
def test_scale_runs_and_prints_its_table():
    out = run_script("benchmarks/scale.py", "--quick")
    assert re.search(r"\| 300 \| 1 \| [0-9,]+ \| [0-9.]+ \| [0-9.]+ \(\d+, \d+; (N×N kernel|blocks)", out), out[-2000:]
