"""The surrogate study: residual against the exact trNTK falls with K; tables summarise seeds correctly;
a small end-to-end run writes the report."""

import math

import numpy as np
import pytest
import torch
from models import mlp
from conftest import write_fake_mnist
from wandb_offline import find_runs, read_run

import lightning_ntk as ln
from lightning_ntk.studies import paper as study


def test_residual_falls_as_k_grows():
    model = mlp(d_in=6, hidden=16, classes=3).double()
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(10, 6, generator=g, dtype=torch.float64)
    kernels = [study.KernelChoice("trNTK", "trntk")] + [study.KernelChoice(f"K={k}", "proj_trntk", k, "gaussian") for k in (4096, 64, 512)]
    pairs = study.kernel_pairs(model, x_train, x_test, kernels, seed=0)
    residuals = study.kernel_residuals(pairs, kernels)
    assert list(residuals) == ["K=64", "K=512", "K=4096"]
    medians = [np.median(r) for r in residuals.values()]
    assert medians[0] > medians[1] > medians[2], medians
    exact = ln.exact_kernel(model, x_test, x_train)
    torch.testing.assert_close(pairs["trNTK"][1], exact)


def test_summary_is_mean_and_standard_error_over_seeds():
    rows = [
        {"setup": "s", "kernel": "k", "seed": i, **{c: v for c in study.FIDELITY_COLUMNS}}
        for i, v in enumerate([0.2, 0.4, 0.9])
    ]
    (entry,) = study.summarize(rows)
    mean, se = entry["kendall_tau"]
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1) / math.sqrt(3))
    table = study.markdown_table([entry])
    assert "| s | k | 3 | 0.500 ± 0.208 | 50.00 ± 20.82 |" in table


@pytest.mark.slow
def test_small_study_writes_table_plots_and_results(tmp_path, capsys, wandb_dir):
    """Digits and MNIST-format data run; CIFAR-10, absent, is skipped with the reason; the per-seed
    table and the plots reach W&B."""
    write_fake_mnist(tmp_path / "data")
    kernels = (study.KernelChoice("trNTK", "trntk"), study.KernelChoice("proj-trNTK K=64", "proj_trntk", 64), study.KernelChoice("ck", "ck"))
    report = study.run_study(
        ["digits01_mlp", "mnist01_mlp", "cifar2_cnn"], seeds=2, kernels=kernels, out_dir=tmp_path / "out", epochs=1, data_dir=tmp_path / "data",
        wandb_project="ntk-study-test",
    )
    text = report.read_text()
    assert "| digits01_mlp | trNTK | 2 |" in text and "| digits01_mlp | ck | 2 |" in text and "| mnist01_mlp | trNTK | 2 |" in text
    assert "cifar2_cnn" not in text
    printed = capsys.readouterr().out
    assert "skipped: CIFAR10 is not under" in printed and "Skipped for want of data: cifar2_cnn" in printed
    assert f"wandb sync {tmp_path / 'out' / 'wandb'}" in printed
    for name in ("fidelity_per_kernel.png", "residual_vs_k.png", "fidelity_across_epochs.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000

    [run_dir] = find_runs(tmp_path / "out" / "wandb")
    [row] = read_run(run_dir).rows("study/results")
    table = read_run(run_dir).media(row["study/results"]["path"])
    assert len(table["data"]) == 2 * 2 * len(kernels) and "kendall_tau" in table["columns"]
    summary = read_run(run_dir).media(row["study/summary"]["path"])
    assert len(summary["data"]) == 2 * len(kernels) and "kendall_tau_se" in summary["columns"]
    for name in ("fidelity_per_kernel", "residual_vs_k", "fidelity_across_epochs"):
        assert row[f"study/{name}"]["_type"] == "image-file"
