"""Attribution: influence scores against brute-force refits of the surrogate and a hand-written Newton step;
representer contributions add up to the logit; block-wise top-k equals the full ranking; ensembles average."""

import pytest
import torch

import lightning_ntk as ln
from lightning_ntk.attribution import attribute, suspicious
from lightning_ntk.datamodeling import margins
from lightning_ntk.surrogate import fit_from_features, fit_from_kernel
from conftest import fit, small_callback
from lightning_ntk.demos import load_digits_tensors
from models import mlp

ALPHA = 1e-3


def setup(outputs=3, n=70, dim=128, dtype=torch.float32):
    model = mlp(classes=outputs).to(dtype)
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(n, 6, generator=g, dtype=dtype), torch.randn(9, 6, generator=g, dtype=dtype)
    y = torch.randint(0, max(outputs, 2), (n,), generator=g)
    train, test = ln.project_features(model, x_train, projection_dim=dim, projector="rademacher"), ln.project_features(model, x_test, projection_dim=dim, projector="rademacher")
    return train, test, y


def refit_margins(kernel, rows, y, keep, target, outputs, alpha):
    """The query margins of the surrogate refitted, to convergence, on the training examples in ``keep``
    only: their loss terms and their columns of the kernel (the basis functions) alone."""
    surrogate = fit_from_kernel(kernel[keep][:, keep], y[keep], alpha=alpha, num_outputs=outputs, tolerance=1e-14)
    return margins(surrogate.predict(rows[:, keep]), target)


def dense_newton_step(kernel, rows, y, surrogate, target):
    """The full dual constrained Newton step of removing each training example, written out by hand: the
    Hessian over all (W, b) coordinates, every column's multiplier. Scores [M, N]."""
    n, c = kernel.shape[0], surrogate.weight.shape[0]
    w, b = surrogate.weight.detach().double(), surrogate.bias.detach().double()
    p = torch.softmax(kernel @ w.T + b, 1)
    residual = p - torch.nn.functional.one_hot(y, c).double()
    design = torch.cat([kernel, torch.ones(n, 1, dtype=torch.float64)], 1)
    hessian = torch.zeros(c, n + 1, c, n + 1, dtype=torch.float64)
    for i in range(n):
        h_i = torch.diag(p[i]) - torch.outer(p[i], p[i])
        hessian += torch.einsum("cd,a,b->cadb", h_i, design[i], design[i]) / n
    hessian[:, :n, :, :n] += ALPHA * torch.eye(c * n, dtype=torch.float64).reshape(c, n, c, n)
    hessian[:, n, :, n] += 1.0  # the one direction without curvature (all biases shifted alike), which no gradient here has
    hessian = hessian.reshape(c * (n + 1), c * (n + 1))
    inverse = torch.linalg.inv(hessian).reshape(c, n + 1, c, n + 1)
    z = rows @ w.T + b
    margin_gradient = torch.nn.functional.one_hot(target, c).double() - torch.softmax(z.masked_fill(torch.nn.functional.one_hot(target, c).bool(), -torch.inf), 1)
    query_design = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    scores = torch.zeros(len(rows), n, dtype=torch.float64)
    for j in range(n):
        loss_gradient = torch.einsum("d,b->db", residual[j], design[j]) / n  # ∇ℓ_j / N
        column = inverse[:, j, :, j]
        multiplier = torch.linalg.solve(column, torch.einsum("cdb,db->c", inverse[:, j], loss_gradient) + w[:, j])
        step = torch.einsum("cadb,db->ca", inverse, loss_gradient) - torch.einsum("cad,d->ca", inverse[:, :, :, j], multiplier)
        scores[:, j] = -torch.einsum("mc,ma,ca->m", margin_gradient, query_design, step)
    return scores


def test_influence_is_the_constrained_newton_step_written_out_by_hand():
    """On a small problem (the kernel's eigenvectors span everything) the influence equals the full dual
    constrained Newton step, an N·C-dimensional system written out by hand."""
    train, test, y = setup(n=40, dtype=torch.float64)
    kernel, rows = ln.kernel_from_features(train), ln.kernel_from_features(test, train)
    surrogate = fit_from_kernel(kernel, y, alpha=ALPHA, tolerance=1e-14)
    target = torch.arange(9) % 3
    scores = attribute(surrogate, query_kernel=rows, target=target, return_scores=True).scores
    torch.testing.assert_close(scores, dense_newton_step(kernel, rows, y, surrogate, target), rtol=1e-6, atol=1e-8)


def test_influence_predicts_refits_without_each_example_and_without_random_tenths():
    """Labels the features can learn, balanced; α = 1e-2, where the surrogate does not interpolate and a first-
    order estimate is valid (at α = 1e-3, interpolating, the correlations here fall to 0.84 and 0.76)."""
    alpha, n = 1e-2, 40
    train, test, _ = setup(n=n, dtype=torch.float64)
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # the inputs of train
    direction = x @ torch.linspace(-1, 1, 6, dtype=torch.float64)
    y = torch.bucketize(direction, direction.quantile(torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)))
    kernel, rows = ln.kernel_from_features(train), ln.kernel_from_features(test, train)
    target = torch.arange(9) % 3
    scores = attribute(fit_from_kernel(kernel, y, alpha=alpha, tolerance=1e-14), query_kernel=rows, target=target, return_scores=True).scores
    full = refit_margins(kernel, rows, y, torch.ones(n, dtype=torch.bool), target, 3, alpha)
    removed = torch.stack([full - refit_margins(kernel, rows, y, torch.arange(n) != j, target, 3, alpha) for j in range(n)], 1)
    correlation = torch.corrcoef(torch.stack([scores.flatten(), removed.flatten()]))[0, 1]
    print("leave-one-out: correlation of predicted and refitted margin changes", float(correlation))
    assert correlation > 0.95 and (scores.sign() == removed.sign()).double().mean() > 0.85

    g = torch.Generator().manual_seed(1)
    subsets = [torch.randperm(n, generator=g)[: n // 10] for _ in range(30)]
    predicted = torch.stack([scores[:, s].sum(1) for s in subsets])
    actual = torch.stack([full - refit_margins(kernel, rows, y, ~torch.isin(torch.arange(n), s), target, 3, alpha) for s in subsets])
    correlation = torch.corrcoef(torch.stack([predicted.flatten(), actual.flatten()]))[0, 1]
    print("random tenths removed: correlation of predicted and refitted margin changes", float(correlation))
    assert correlation > 0.9


@pytest.mark.parametrize("outputs", [1, 3])
def test_influence_from_features_equals_from_kernel_and_ranks_like_the_full_scores(outputs):
    train, test, y = setup(outputs=outputs)
    by_features = attribute(fit_from_features(train, y, num_outputs=outputs), query_features=test, top_k=4, block_size=16, return_scores=True)
    kernel = ln.kernel_from_features(train)
    by_kernel = attribute(fit_from_kernel(kernel, y, num_outputs=outputs), query_kernel=ln.kernel_from_features(test, train), top_k=4, block_size=7, return_scores=True)
    assert by_features.method == by_kernel.method == "influence"
    torch.testing.assert_close(by_features.scores, by_kernel.scores, rtol=1e-3, atol=1e-3 * by_kernel.scores.abs().max())
    full_values, full_indices = by_kernel.scores.topk(4, dim=1)
    torch.testing.assert_close(by_kernel.proponent_scores, full_values.float())
    assert torch.equal(by_kernel.proponent_indices, full_indices)
    torch.testing.assert_close(by_kernel.opponent_scores, -(-by_kernel.scores).topk(4, dim=1).values.float())


def test_contributions_plus_bias_equal_the_logit():
    train, test, y = setup()
    surrogate = fit_from_features(train, y)
    result = attribute(surrogate, query_features=test, top_k=4, block_size=16, return_scores=True, method="representer")
    chosen = result.logits.gather(1, result.target[:, None])[:, 0]
    torch.testing.assert_close(result.scores.float().sum(1) + surrogate.bias.detach()[result.target], chosen, atol=1e-5, rtol=1e-5)
    # Block-wise running top-k equals ranking the full contribution matrix.
    full_values, full_indices = result.scores.topk(4, dim=1)
    torch.testing.assert_close(result.proponent_scores, full_values.float())
    assert torch.equal(result.proponent_indices, full_indices)
    torch.testing.assert_close(result.opponent_scores, -(-result.scores).topk(4, dim=1).values.float())
    kernel = ln.kernel_from_features(test, train)
    torch.testing.assert_close(result.similar_scores, kernel.topk(4, dim=1).values)
    # The precomputed-kernel path gives the same answer.
    by_kernel = attribute(surrogate, query_kernel=kernel, top_k=4, block_size=7, method="representer")
    assert torch.equal(by_kernel.proponent_indices, result.proponent_indices)


def test_single_logit_contributions_are_signed_towards_the_target():
    train, test, y = setup(outputs=1)
    surrogate = fit_from_kernel(ln.kernel_from_features(train), y, num_outputs=1)
    kernel = ln.kernel_from_features(test, train)
    target = torch.tensor([0, 1] * 4 + [0])
    result = attribute(surrogate, query_kernel=kernel, target=target, top_k=3, return_scores=True, method="representer")
    sign = 2 * target - 1
    logit = result.logits[:, 0]
    torch.testing.assert_close(result.scores.float().sum(1) + sign * surrogate.bias.detach()[0], sign * logit, atol=1e-5, rtol=1e-5)


def test_default_target_is_the_networks_prediction_and_ensembles_average():
    train, test, y = setup()
    first, second = fit_from_features(train, y), fit_from_features(train * 1.5 + 0.1, y)
    queries = [test, test * 1.5 + 0.1]
    network_logits = torch.randn(9, 3, generator=torch.Generator().manual_seed(3))
    alone = [attribute(s, query_features=q, network_logits=network_logits, return_scores=True) for s, q in zip((first, second), queries)]
    assert torch.equal(alone[0].target, network_logits.argmax(1))
    assert torch.equal(attribute(first, query_features=test, return_scores=True).target, alone[0].logits.argmax(1))
    both = attribute([first, second], query_features=queries, network_logits=network_logits, top_k=3, return_scores=True)
    torch.testing.assert_close(both.scores, (alone[0].scores + alone[1].scores) / 2)
    assert torch.equal(both.proponent_indices, both.scores.topk(3, dim=1).indices)
    with pytest.raises(ValueError, match="one query kernel \\(or features\\) per surrogate"):
        attribute([first, second], query_features=[test])


def test_suspicious_examples_are_those_the_surrogate_fits_worst():
    train, _, y = setup(n=60)
    noisy = y.clone()
    noisy[:6] = (noisy[:6] + 1) % 3
    surrogate = fit_from_kernel(ln.kernel_from_features(train), noisy, alpha=ALPHA)
    positions, losses = suspicious(surrogate, top_k=6)
    logits = surrogate.predict(ln.kernel_from_features(train))
    per_example = torch.nn.functional.cross_entropy(logits.double(), noisy, reduction="none")
    torch.testing.assert_close(losses, per_example[positions], rtol=1e-4, atol=1e-6)
    assert torch.equal(positions, per_example.topk(6).indices)


def test_a_surrogate_without_curvature_is_refused_for_influence_with_the_way_out():
    train, test, y = setup()
    fitted = fit_from_features(train, y)
    bare = type(fitted)(fitted.hparams.num_train, fitted.hparams.num_outputs, feature_shape=tuple(train.shape[1:]))
    bare.load_state_dict(fitted.state_dict())  # weights only, as from a plain state dict: no curvature
    with pytest.raises(ValueError, match="carries no curvature.*method='representer'"):
        attribute(bare, query_features=test)
    assert attribute(bare, query_features=test, method="representer").proponent_indices.shape == (9, 5)
    with pytest.raises(ValueError, match="Unknown attribution method 'shapley'"):
        attribute(fitted, query_features=test, method="shapley")


def test_batch_norm_statistics_moved_after_fit_count_as_a_changed_model(tmp_path, one_thread):
    """A forward pass in train mode after fit moves BatchNorm's running statistics, not a weight: a checkpoint
    that keeps its state is attributed with its own statistics (and the network's are put back), one that
    does not is refused, as for a changed weight."""
    kept = small_callback(top_k=0, epochs=[])  # ensemble: the checkpoint keeps the network's state
    latest = small_callback(top_k=0, epochs=[], ensemble=1, name="latest")
    _, model = fit(tmp_path, [kept, latest], max_epochs=1)
    x_train, _, x_test, _ = load_digits_tensors()
    before = kept.attribute(x_test[:4], top_k=3)
    model.train()
    with torch.no_grad():
        model(x_train[:32])
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    after = kept.attribute(x_test[:4], top_k=3)
    assert torch.equal(after.proponent_indices, before.proponent_indices)
    torch.testing.assert_close(after.proponent_scores, before.proponent_scores)
    assert all(torch.equal(v, moved[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="model changed since the surrogate was fitted.*running statistics"):
        latest.attribute(x_test[:4])


def test_the_fingerprint_covers_running_statistics_but_not_the_count_of_steps():
    """A forward pass in train mode moves BatchNorm's running statistics (eval outputs change) and its step count
    (nothing reads it in eval mode): only the first is a changed model. A DDP-trained network reloaded and run
    at lr 0 with momentum 0 keeps its statistics but counts more steps."""
    from lightning_ntk.jacobian import state_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    params = dict(model.named_parameters())
    before = state_fingerprint(model, params)
    model[1].num_batches_tracked += 1
    assert state_fingerprint(model, params) == before
    with torch.no_grad():
        model[1].running_mean += 1
    assert state_fingerprint(model, params) != before
