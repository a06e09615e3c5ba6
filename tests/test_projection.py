"""Projected kernels: error shrinking like 1/sqrt(K), unbiasedness and seed determinism."""

import inspect

import pytest
import torch
from models import mlp

import lightning_ntk as ln
from lightning_ntk import featurize


@pytest.fixture(scope="module")
def setup():
    model = mlp(d_in=6, hidden=24, classes=3).double()
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = ln.gradient_features(model, x)
    return model, x, grads


@pytest.mark.parametrize("projector", ["rademacher", "gaussian"])
def test_error_shrinks_like_inverse_sqrt_k(setup, projector):
    model, x, grads = setup
    exact = ln.kernel_from_features(grads)
    errors = []
    for k in (256, 1024, 4096):
        per_seed = [
            (ln.kernel_from_features(ln.RandomProjector(grads.shape[-1], k, projector, seed).project(grads)) - exact).abs().mean()
            for seed in range(3)
        ]
        errors.append(torch.stack(per_seed).mean().item())
    assert errors[0] / errors[1] >= 1.6 and errors[1] / errors[2] >= 1.6, errors


@pytest.mark.parametrize("projector", ["rademacher", "gaussian"])
def test_unnormalised_projected_kernel_is_unbiased(setup, projector):
    model, x, grads = setup
    exact = ln.kernel_from_features(grads, normalize=False)
    draws = torch.stack(
        [ln.kernel_from_features(ln.project_features(model, x, projection_dim=64, projector=projector, seed=s), normalize=False) for s in range(20)]
    )
    z = (draws.mean(0) - exact) / (draws.std(0) / 20**0.5)
    # Every entry is a separate test at 3 standard errors: allow the chance misses of ~0.3% of them.
    assert (z.abs() < 3).float().mean() >= 0.97, z
    # The entries share each draw's R, so test one summary of them as a whole too.
    totals = draws.sum((1, 2))
    assert (totals.mean() - exact.sum()).abs() < 3 * totals.std() / 20**0.5


def test_same_seed_same_features_whatever_the_batch_size(setup):
    model, x, _ = setup
    a = ln.project_features(model, x, projection_dim=300, projector="rademacher", seed=7, batch_size=16)
    b = ln.project_features(model, x, projection_dim=300, projector="rademacher", seed=7, batch_size=5)
    c = ln.project_features(model, x, projection_dim=300, projector="rademacher", seed=7, batch_size=1, memory_budget=0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    d = ln.project_features(model, x, projection_dim=300, projector="rademacher", seed=8)
    assert (a - d).abs().max() > 1e-3


def test_projector_blocks_equal_the_whole_matrix():
    proj = ln.RandomProjector(1000, 5000, "rademacher", seed=1)  # 838 columns of R per block: two blocks
    assert proj.num_blocks == 2
    u = torch.randn(3, 1000)
    whole = torch.cat([proj._generate(b) for b in range(proj.num_blocks)])
    torch.testing.assert_close(proj.project(u), u @ whole)
    assert set(torch.unique((whole * 5000**0.5).round()).tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(whole.abs(), torch.full_like(whole, 5000**-0.5))


def test_pntk_features_shape_and_kernel(setup):
    model, x, grads = setup
    f = ln.project_features(model, x, kind="pntk", projection_dim=4096, projector="gaussian")
    assert f.shape == (16, 4096)
    exact = ln.exact_kernel(model, x, kind="pntk")
    assert (ln.kernel_from_features(f) - exact).abs().mean() < 0.03
    assert ln.project_features(model, x, projection_dim=32, projector="rademacher").shape == (16, 3, 32)


def test_standalone_functions_take_their_defaults_from_the_configs():
    """A standalone user gets what the callback gets: the sketch at the config's K, seed and product
    precision, in batches of the config's size."""
    projection, subsets = ln.ProjectionConfig(), ln.SubsetConfig()
    spec = ln.Featurizer(mlp()).spec()
    assert (spec.projector, spec.projection_dim, spec.seed) == (projection.projector, projection.dim, projection.seed)
    functions = [ln.Featurizer, ln.Featurizer.__call__, ln.project_features, ln.gradient_features, ln.embedding_features,
                 ln.exact_kernel, ln.factored_kernel, ln.kernel_from_features, ln.kernel_blocks, featurize.stream_features]
    defaults = {name: {p.default for f in functions if (p := inspect.signature(f).parameters.get(name))} for name in
                ("projector", "projection_dim", "seed", "product_precision", "batch_size")}
    assert defaults == {"projector": {projection.projector}, "projection_dim": {projection.dim}, "seed": {projection.seed},
                        "product_precision": {projection.product_precision}, "batch_size": {subsets.batch_size}}
