"""Attribution: contributions add up to the logit; block-wise top-k equals the full ranking."""

import torch

import lightning_ntk as ln
from lightning_ntk.attribution import attribute
from lightning_ntk.surrogate import fit_from_features, fit_from_kernel
from models import mlp


def setup(outputs=3):
    model = mlp(classes=outputs)
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(70, 6, generator=g), torch.randn(9, 6, generator=g)
    y = torch.randint(0, max(outputs, 2), (70,), generator=g)
    train, test = ln.project_features(model, x_train, projection_dim=128), ln.project_features(model, x_test, projection_dim=128)
    return train, test, y


def test_contributions_plus_bias_equal_the_logit():
    train, test, y = setup()
    surrogate = fit_from_features(train, y)
    result = attribute(surrogate, query_features=test, top_k=4, block_size=16, return_contributions=True)
    chosen = result.logits.gather(1, result.target[:, None])[:, 0]
    torch.testing.assert_close(result.contributions.sum(1) + surrogate.bias.detach()[result.target], chosen, atol=1e-5, rtol=1e-5)
    # Block-wise running top-k equals ranking the full contribution matrix.
    full_values, full_indices = result.contributions.topk(4, dim=1)
    torch.testing.assert_close(result.proponent_scores, full_values)
    assert torch.equal(result.proponent_indices, full_indices)
    torch.testing.assert_close(result.opponent_scores, -(-result.contributions).topk(4, dim=1).values)
    kernel = ln.kernel_from_features(test, train)
    torch.testing.assert_close(result.similar_scores, kernel.topk(4, dim=1).values)
    # The precomputed-kernel path gives the same answer.
    by_kernel = attribute(surrogate, query_kernel=kernel, top_k=4, block_size=7)
    assert torch.equal(by_kernel.proponent_indices, result.proponent_indices)


def test_single_logit_contributions_are_signed_towards_the_target():
    train, test, y = setup(outputs=1)
    surrogate = fit_from_kernel(ln.kernel_from_features(train), y, num_outputs=1)
    kernel = ln.kernel_from_features(test, train)
    target = torch.tensor([0, 1] * 4 + [0])
    result = attribute(surrogate, query_kernel=kernel, target=target, top_k=3, return_contributions=True)
    sign = 2 * target - 1
    logit = result.logits[:, 0]
    torch.testing.assert_close(result.contributions.sum(1) + sign * surrogate.bias.detach()[0], sign * logit, atol=1e-5, rtol=1e-5)
