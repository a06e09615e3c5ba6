"""The kernel-machine surrogate on real digits: fidelity, optimality against sklearn and by hand,
the solver's internals against autograd, warm starts, streamed training, Lightning checkpoints and
clear errors."""

import copy

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ntk as ln
from lightning_ntk.demos import load_digits_tensors
from lightning_ntk.metrics import SurrogateFidelity
from lightning_ntk.surrogate import KernelSurrogate, _CrossEntropy, _KernelOperator, _top_eigenpairs, fit_from_features, fit_from_kernel

ALPHA = 1e-4


def train_network(net, x, y, epochs, binary=False, lr=1e-2):
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            out = net(x[i : i + 64])
            target = y[i : i + 64]
            if binary:
                loss = nn.functional.binary_cross_entropy_with_logits(out[:, 0], target.float())
            else:
                loss = nn.functional.cross_entropy(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def digits():
    """A digits MLP trained for a few epochs, its exact per-class gradients and its exact trNTK."""
    x_train, y_train, x_test, y_test = load_digits_tensors()
    torch.manual_seed(0)
    net = train_network(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), x_train, y_train, epochs=15)
    grads_train, grads_test = ln.gradient_features(net, x_train), ln.gradient_features(net, x_test)
    with torch.no_grad():
        net_logits = net(x_test)
    return dict(
        net=net, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, net_logits=net_logits,
        grads_train=grads_train, grads_test=grads_test,
        k_train=ln.kernel_from_features(grads_train), k_test=ln.kernel_from_features(grads_test, grads_train),
    )


def accuracy(logits, labels):
    predictions = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return (predictions == labels).double().mean().item()


def objective(kernel, labels, weight, bias, formulation="multinomial", alpha=ALPHA):
    """The surrogate's objective written out in numpy float64: mean cross-entropy (class-balanced
    one-vs-rest for "ovr") of ``K Wᵀ + b`` plus ``α/2·‖W‖²``, the bias unpenalised."""
    k, y = np.asarray(kernel, dtype=np.float64), np.asarray(labels)
    w, b = np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    logits = k @ w.T + b
    n = len(y)
    if w.shape[0] == 1:
        z = logits[:, 0]
        losses = np.logaddexp(0, z) - y * z
        if formulation == "ovr":
            losses *= (n / (2 * np.bincount(y, minlength=2)))[y]
    elif formulation == "multinomial":
        losses = logsumexp(logits, axis=1) - logits[np.arange(n), y]
    else:
        classes = w.shape[0]
        targets = np.eye(classes)[y]
        weights = np.where(targets > 0, n / (classes * np.bincount(y, minlength=classes)), 1.0)
        losses = (weights * (np.logaddexp(0, logits) - targets * logits)).sum(1)
    return losses.mean() + 0.5 * alpha * (w**2).sum()


def parameters(surrogate):
    return surrogate.weight.detach().double().numpy(), surrogate.bias.detach().double().numpy()


def test_exact_trntk_surrogate_is_faithful_and_optimal_on_digits(digits):
    surrogate = fit_from_kernel(digits["k_train"], digits["y_train"])
    assert surrogate.converged and surrogate.fit_record["iterations"] < 30, surrogate.fit_record
    metric = SurrogateFidelity()
    metric.update(digits["net_logits"], surrogate.predict(digits["k_test"]), digits["y_test"])
    result = {k: float(v) for k, v in metric.compute().items()}
    print("digits MLP, exact trNTK:", result, surrogate.fit_record)
    assert abs(result["tad"]) <= 0.02, result
    assert result["kendall_tau"] > 0.5, result

    # Stationarity of the objective mean CE + α/2·‖W‖², with its gradient written out by hand in float64.
    k, y = digits["k_train"].double().numpy(), digits["y_train"].numpy()
    w, b = parameters(surrogate)
    logits = k @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(10)[y]
    grad_w = residual.T @ k / len(y) + ALPHA * w
    start = (0.1 - np.eye(10)[y]).T @ k / len(y)  # the gradient at W = 0, b = 0
    assert np.abs(grad_w).max() < 1e-6 * np.abs(start).max(), np.abs(grad_w).max()  # W is stored in float32
    assert np.abs(residual.mean(0)).max() < 1e-7  # the bias is not penalised
    # The recorded final objective is that objective (W stored in float32 moves it by ~1e-9).
    assert surrogate.fit_record["objective"] == pytest.approx(objective(k, y, w, b), rel=1e-7)
    assert surrogate.history[-1] == surrogate.fit_record["objective"]


@pytest.mark.parametrize("formulation", ["multinomial", "ovr"])
def test_surrogate_matches_sklearn_logistic_regression(digits, formulation):
    """The same objective solved by sklearn on the same precomputed kernel (its first 300 training
    points, to keep sklearn fast): the same optimum, decision function and test accuracy."""
    n = 300
    k_train, k_test = digits["k_train"][:n, :n].double(), digits["k_test"][:, :n].double()
    y = digits["y_train"][:n].numpy()
    ours = fit_from_kernel(k_train, digits["y_train"][:n], formulation=formulation, alpha=ALPHA)
    assert ours.converged
    c = 1.0 / (ALPHA * n)  # sklearn minimises C·Σ loss + ½‖w‖², i.e. α = 1 / (C·N) on the mean loss
    if formulation == "multinomial":
        model = LogisticRegression(C=c, max_iter=20_000, tol=1e-10).fit(k_train.numpy(), y)
        theirs, coef, intercept = model.decision_function(k_test.numpy()), model.coef_, model.intercept_
    else:  # sklearn's SGDClassifier weighting: positives N / (classes·N_c), negatives 1
        counts = np.bincount(y, minlength=10)
        models = [
            LogisticRegression(C=c, class_weight={1: n / (10 * counts[cls]), 0: 1.0}, max_iter=20_000, tol=1e-10)
            .fit(k_train.numpy(), (y == cls).astype(int))
            for cls in range(10)
        ]
        theirs = np.stack([m.decision_function(k_test.numpy()) for m in models], 1)
        coef, intercept = np.concatenate([m.coef_ for m in models]), np.concatenate([m.intercept_ for m in models])
    # Both solutions under one objective, written out by hand: ours is at least as low, within 1e-4 (relative).
    ours_value, theirs_value = objective(k_train, y, *parameters(ours), formulation), objective(k_train, y, coef, intercept, formulation)
    assert ours_value <= theirs_value * (1 + 1e-9) and theirs_value - ours_value <= 1e-4 * theirs_value, (ours_value, theirs_value)
    ours_logits = ours.predict(k_test).double().numpy()
    scale = np.abs(theirs).max()
    assert np.abs(ours_logits - theirs).max() < 0.02 * scale, (np.abs(ours_logits - theirs).max(), scale)
    y_test = digits["y_test"]
    assert abs(accuracy(torch.as_tensor(ours_logits), y_test) - accuracy(torch.as_tensor(theirs), y_test)) <= 0.01


def test_single_logit_binary_surrogate_matches_sklearn():
    x_train, y_train, x_test, y_test = load_digits_tensors(classes=(3, 8))
    torch.manual_seed(1)
    net = train_network(nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 1)), x_train, y_train, epochs=10, binary=True)
    k_train, k_test = ln.exact_kernel(net, x_train), ln.exact_kernel(net, x_test, x_train)
    surrogate = fit_from_kernel(k_train, y_train, num_outputs=1)
    logits = surrogate.predict(k_test)
    assert logits.shape == (len(x_test), 1) and surrogate.converged
    reference = LogisticRegression(C=1 / (ALPHA * len(y_train)), max_iter=20_000, tol=1e-10).fit(k_train.numpy(), y_train.numpy())
    theirs = reference.decision_function(k_test.numpy())
    assert np.abs(logits[:, 0].numpy() - theirs).max() < 0.02 * np.abs(theirs).max()
    ours_value = objective(k_train, y_train, *parameters(surrogate))
    theirs_value = objective(k_train, y_train, reference.coef_, reference.intercept_)
    assert ours_value <= theirs_value * (1 + 1e-7) and theirs_value - ours_value <= 1e-4 * theirs_value
    # The balanced single logit: each class its own weight N / (2·N_c), against the objective by hand.
    balanced = fit_from_kernel(k_train.double(), y_train, num_outputs=1, formulation="ovr")
    assert balanced.fit_record["objective"] == pytest.approx(objective(k_train, y_train, *parameters(balanced), "ovr"), rel=1e-12)
    metric = SurrogateFidelity()
    with torch.no_grad():
        metric.update(net(x_test), logits, y_test)
    result = metric.compute()
    assert abs(float(result["tad"])) <= 0.03 and float(result["kendall_tau"]) > 0.3, result


@pytest.mark.parametrize("formulation, outputs", [("multinomial", 4), ("ovr", 4), ("multinomial", 1), ("ovr", 1)])
def test_loss_derivatives_against_autograd(formulation, outputs):
    """The loss's residual, Hessian product and projected Hessian (the solver's preconditioner) against
    autograd in float64, for every formulation, on a small random problem."""
    g = torch.Generator().manual_seed(0)
    n, width = 9, 3
    labels = torch.randint(0, max(outputs, 2), (n,), generator=g)
    surrogate = KernelSurrogate(n, outputs, formulation=formulation)
    surrogate.balance_classes(labels)
    loss = _CrossEntropy(labels, outputs, formulation, surrogate.class_weights)
    logits = torch.randn(n, outputs, generator=g, dtype=torch.float64)
    step = torch.randn(n, outputs, generator=g, dtype=torch.float64)
    design = torch.randn(n, width, generator=g, dtype=torch.float64)
    _, probabilities = loss(logits)

    gradient = torch.autograd.functional.jacobian(lambda z: loss(z)[0], logits)
    torch.testing.assert_close(loss.residual(probabilities), gradient)
    hessian = torch.autograd.functional.hessian(lambda z: loss(z)[0], logits).reshape(n * outputs, n * outputs)
    torch.testing.assert_close(loss.hessian_product(probabilities, step).flatten(), hessian @ step.flatten())
    coefficients = torch.zeros(width, outputs, dtype=torch.float64)
    projected = torch.autograd.functional.hessian(lambda a: loss(logits + design @ a)[0], coefficients)
    torch.testing.assert_close(loss.subspace_hessian(probabilities, design), projected.reshape(width * outputs, width * outputs))


def test_top_eigenpairs_against_a_dense_eigendecomposition():
    """The randomized Nyström eigenpairs of a kernel of rank below the sketch are its exact top
    eigenpairs; it takes two passes over the kernel."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 12, generator=g, dtype=torch.float64)
    kernel = features @ features.T
    operator = _KernelOperator(kernel, factored=False)
    basis, eigenvalues = _top_eigenpairs(operator, rank=8)
    expected_values, expected_vectors = torch.linalg.eigh(kernel)
    torch.testing.assert_close(eigenvalues, expected_values.flip(0)[:8])
    torch.testing.assert_close((basis.T @ expected_vectors.flip(1)[:, :8]).abs(), torch.eye(8, dtype=torch.float64), atol=1e-8, rtol=0)
    assert operator.passes == 2
    # The factored operator Φ(Φᵀx) is the same kernel, and exact products accumulate in float64.
    factored = _KernelOperator(features.float(), factored=True)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(factored.exact(x, block_elements=100), features.float().double() @ (features.float().double().T @ x))


def test_warm_start_reaches_the_same_optimum_in_fewer_iterations(digits):
    """The next epoch's kernel, fitted from the previous epoch's surrogate: the same optimum as a cold
    fit, with fewer Newton steps and kernel passes; on matrices and on features."""
    x, y = digits["x_train"], digits["y_train"]
    net = train_network(copy.deepcopy(digits["net"]).train(), x, y, epochs=1, lr=1e-3)
    features = ln.gradient_features(net, x)
    kernel = ln.kernel_from_features(features)
    assert 1e-4 < float((kernel - digits["k_train"]).abs().mean()) < 1e-2  # close, not equal
    previous = fit_from_kernel(digits["k_train"], y)
    for fit, inputs in ((fit_from_kernel, kernel), (fit_from_features, features)):
        cold, warm = fit(inputs, y), fit(inputs, y, init=previous)
        assert warm.fit_record["warm_start"] and not cold.fit_record["warm_start"]
        assert warm.converged and cold.converged
        assert warm.fit_record["iterations"] < cold.fit_record["iterations"], (warm.fit_record, cold.fit_record)
        assert warm.fit_record["kernel_passes"] < cold.fit_record["kernel_passes"]
        assert warm.fit_record["objective"] == pytest.approx(cold.fit_record["objective"], rel=1e-8)
        torch.testing.assert_close(warm.predict(digits["k_test"]), cold.predict(digits["k_test"]), atol=1e-3, rtol=1e-3)
    # A previous surrogate of another shape is no starting point: the fit starts from zero.
    other = fit_from_kernel(digits["k_train"][:50, :50], y[:50])
    assert not fit_from_kernel(kernel, y, init=other).fit_record["warm_start"]


def test_a_confidently_wrong_start_is_dropped(digits):
    """A previous solution that is confidently wrong on the new kernel (its probabilities saturated, so the
    loss has almost no curvature there) is no starting point: the fit starts from zero and reaches the
    cold optimum, instead of taking Newton steps that overflow."""
    x, y = digits["x_train"], digits["y_train"]
    kernel = digits["k_train"]
    confident = fit_from_kernel(kernel, y)
    with torch.no_grad():
        confident.weight.copy_(confident.weight[torch.randperm(confident.weight.shape[0], generator=torch.Generator().manual_seed(0))] * 1e3)
    cold, dropped = fit_from_kernel(kernel, y), fit_from_kernel(kernel, y, init=confident)
    assert not dropped.fit_record["warm_start"] and dropped.converged
    assert dropped.fit_record["objective"] == pytest.approx(cold.fit_record["objective"], rel=1e-8)
    assert torch.isfinite(dropped.weight).all()


def test_float32_and_float64_inputs_reach_the_same_optimum(digits):
    k, y = digits["k_train"], digits["y_train"]
    single, double = fit_from_kernel(k.float(), y), fit_from_kernel(k.double(), y)
    assert single.weight.dtype == torch.float32 and double.weight.dtype == torch.float64
    values = [objective(k.double(), y, *parameters(s)) for s in (single, double)]
    assert values[0] == pytest.approx(values[1], rel=1e-8)
    # Along the directions of curvature α the optimum is flat: equal objectives leave the logits ~1e-4 apart.
    single_logits, double_logits = single.predict(digits["k_test"]).double(), double.predict(digits["k_test"].double())
    assert (single_logits - double_logits).abs().max() < 1e-3 * double_logits.abs().max()


def test_fit_record_history_and_progress(digits, capsys):
    k, y = digits["k_train"], digits["y_train"]
    calls = []
    surrogate = fit_from_kernel(k, y, progress=lambda iteration, value: calls.append((iteration, value)), tolerance=1e-9)
    record = surrogate.fit_record
    assert set(record) == {"objective", "iterations", "gap", "gradient_norm", "converged", "kernel_passes", "rank", "warm_start", "precision",
                           "refined_at", "stalled", "stop", "warning", "kernel_scale"}
    assert record["precision"] == "float32" and record["refined_at"] is None and not record["stalled"]
    assert record["converged"] is True and record["gap"] <= 1e-9 and record["gradient_norm"] < 1e-5
    assert 0 < record["rank"] <= 64 and record["kernel_passes"] >= 2 + 2 * record["iterations"]
    assert [i for i, _ in calls] == list(range(record["iterations"] + 1))
    assert [v for _, v in calls[:-1]] == surrogate.history[:-1]
    assert calls[-1][1] == pytest.approx(record["objective"], rel=1e-6)  # the last one recomputed in float64
    assert all(later < earlier for earlier, later in zip(surrogate.history, surrogate.history[1:]))
    assert capsys.readouterr() == ("", "")  # nothing printed
    # A looser tolerance stops earlier, and is still met; max_iter stops before it and says so.
    loose = fit_from_kernel(k, y, tolerance=1e-3)
    assert loose.converged and loose.fit_record["gap"] <= 1e-3 and loose.fit_record["iterations"] < record["iterations"]
    capped = fit_from_kernel(k, y, max_iter=2)
    assert capped.fit_record["iterations"] == 2 and not capped.converged and capped.fit_record["gap"] > 1e-9


def test_no_trainer_is_created_during_a_fit(digits, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a Trainer was created during a surrogate fit")

    monkeypatch.setattr(L.Trainer, "__init__", refuse)
    k, y = digits["k_train"][:200, :200], digits["y_train"][:200]
    assert fit_from_kernel(k, y).converged
    assert fit_from_features(digits["grads_train"][:200], y, formulation="ovr").converged


def test_streamed_training_equals_precomputed(digits):
    """Fitting from projected features (no N×N kernel) reaches the same surrogate as fitting on their kernel."""
    featurizer = ln.Featurizer(digits["net"], projection_dim=64, projector="rademacher", seed=0)
    train, test = featurizer(digits["x_train"]), featurizer(digits["x_test"])
    precomputed = fit_from_kernel(ln.kernel_from_features(train), digits["y_train"])
    streamed = fit_from_features(train, digits["y_train"])
    assert streamed.converged and precomputed.converged
    assert streamed.fit_record["objective"] == pytest.approx(precomputed.fit_record["objective"], rel=1e-6)
    test_rows = ln.kernel_from_features(test, train)
    a = precomputed.predict(test_rows)
    b = streamed.predict_from_features(test, block_size=200)
    assert abs(accuracy(a, digits["y_test"]) - accuracy(b, digits["y_test"])) <= 0.005
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    # Kernel rows given to a streamed surrogate are the same thing as its features.
    torch.testing.assert_close(streamed.predict(test_rows), b, atol=1e-3, rtol=1e-3)


def test_features_from_a_memmap_and_a_lightning_checkpoint(digits, tmp_path):
    """Memmapped features fit like in-memory ones; a user's Trainer tests and predicts with the
    surrogate, and a checkpoint restores it with its training features and fit record."""
    net, x = digits["net"], digits["x_train"][:200]
    featurizer = ln.Featurizer(net, projection_dim=64, projector="rademacher", seed=0)
    features = featurizer(x).numpy()
    np.save(tmp_path / "features.npy", features)
    mapped = np.load(tmp_path / "features.npy", mmap_mode="r")
    labels = digits["y_train"][:200]
    from_memory = fit_from_features(torch.as_tensor(features), labels, spec=featurizer.spec())
    from_disk = fit_from_features(mapped, labels, spec=featurizer.spec())
    query, query_labels = featurizer(digits["x_test"][:50]), digits["y_test"][:50]
    expected = from_memory.predict_from_features(query, spec=featurizer.spec())
    torch.testing.assert_close(from_disk.predict_from_features(query), expected)

    trainer = L.Trainer(logger=CSVLogger(tmp_path, name="surrogate"), default_root_dir=tmp_path, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(TensorDataset(query, query_labels), batch_size=16)
    [tested] = trainer.test(from_disk, loader, verbose=False)
    assert tested["surrogate/test_acc"] == pytest.approx(accuracy(expected, query_labels))
    logged = (tmp_path / "surrogate" / "version_0" / "metrics.csv").read_text()
    assert "surrogate/test_loss" in logged
    torch.testing.assert_close(torch.cat(trainer.predict(from_disk, loader)), expected)
    trainer.save_checkpoint(tmp_path / "surrogate.ckpt")
    restored = KernelSurrogate.load_from_checkpoint(tmp_path / "surrogate.ckpt")
    torch.testing.assert_close(restored.predict_from_features(query, spec=featurizer.spec()), expected)
    assert restored.fit_record == from_disk.fit_record and restored.history == from_disk.history and restored.converged
    other = ln.Featurizer(net, projection_dim=64, projector="rademacher", seed=1)
    with pytest.raises(ValueError, match=r"seed: 1 \(training: 0\)"):
        restored.predict_from_features(other(digits["x_test"][:5]), spec=other.spec())


def test_clear_errors(digits):
    k, y = digits["k_train"][:50, :50], digits["y_train"][:50]
    with pytest.raises(ValueError, match="Got 49 labels for 50 training points"):
        fit_from_kernel(k, y[:49])
    with pytest.raises(ValueError, match="must be a square"):
        fit_from_kernel(k[:, :40], y)
    with pytest.raises(ValueError, match="integer class indices"):
        fit_from_kernel(k, y.float())
    with pytest.raises(ValueError, match="Labels go up to 9.*num_outputs"):
        fit_from_kernel(k, y, num_outputs=3)
    with pytest.raises(ValueError, match="All 50 training labels are 0: .*at least two classes"):
        fit_from_kernel(k, torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match="Unknown formulation 'svm'"):
        fit_from_kernel(k, y, formulation="svm")
    with pytest.raises(ValueError, match="alpha is an L2 penalty and must be > 0.*no minimum"):
        fit_from_kernel(k, y, alpha=0)
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        fit_from_kernel(k, y, tolerance=0)
    with pytest.raises(ValueError, match="preconditioner_rank must be an integer ≥ 1"):
        fit_from_features(digits["grads_train"][:50], y, preconditioner_rank=0)
    bad = k.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="training kernel holds NaN"):
        fit_from_kernel(bad, y)
    bad_features = digits["grads_train"][:50].clone()
    bad_features[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="feature array holds NaN or inf"):
        fit_from_features(bad_features, y)

    surrogate = fit_from_kernel(k, y, max_iter=2)
    assert surrogate.hparams.normalized and surrogate.fit_record["iterations"] == 2
    with pytest.raises(ValueError, match=r"Kernel rows must be \[M, 50\]"):
        surrogate.predict(torch.rand(3, 49))
    with pytest.raises(ValueError, match="test kernel holds NaN"):
        surrogate.predict(torch.full((3, 50), float("nan")))
    unnormalised_rows = ln.kernel_from_features(digits["grads_test"][:3], digits["grads_train"][:50], normalize=False)
    with pytest.raises(ValueError, match="cosine-normalised kernel.*normalize=True"):
        surrogate.predict(unnormalised_rows)
    with pytest.raises(ValueError, match="fitted from a kernel matrix"):
        surrogate.predict_from_features(digits["grads_test"][:3])


def test_query_features_computed_differently_are_refused(digits):
    net, x, y = digits["net"], digits["x_train"][:60], digits["y_train"][:60]
    featurizer = ln.Featurizer(net, projection_dim=64, projector="rademacher", seed=0)
    surrogate = fit_from_features(featurizer(x), y, spec=featurizer.spec(), max_iter=2)
    other = ln.Featurizer(net, projection_dim=64, projector="rademacher", seed=1)
    with pytest.raises(ValueError, match="computed differently from the training features.*seed"):
        surrogate.predict_from_features(other(x[:5]), spec=other.spec())
    with pytest.raises(ValueError, match=r"per-example shape \(10, 32\).*\(10, 64\)"):
        surrogate.predict_from_features(ln.project_features(net, x[:5], projection_dim=32, projector="rademacher"))
    with pytest.raises(ValueError, match=r"per-example shape \(64,\)"):
        surrogate.predict_from_features(ln.project_features(net, x[:5], kind="pntk", projection_dim=64, projector="rademacher"))
    # Kernel rows that state a different spec are refused as well.
    by_kernel = fit_from_kernel(ln.kernel_from_features(featurizer(x)), y, spec=featurizer.spec(), max_iter=2)
    with pytest.raises(ValueError, match="projection_dim: 32 \\(training: 64\\)"):
        by_kernel.predict(torch.zeros(2, 60), spec=ln.Featurizer(net, projection_dim=32, projector="rademacher", seed=0).spec())


def test_float32_rounding_floor_is_passed_in_float64(digits):
    """A kernel whose entries are all close to 1 (a strong common component, as early in training), at a small α:
    float32 products leave the gap stuck above the tolerance (seen: 100 Newton steps at a gap of 5e-9). The
    solver notices that its steps stopped shrinking the gap, finishes in float64, and reaches the float64
    kernel's optimum, both objectives evaluated by hand in numpy."""
    alpha, y = 1e-6, digits["y_train"]
    kernel = 0.05 * digits["k_train"].double() + 0.95
    single, double = fit_from_kernel(kernel.float(), y, alpha=alpha), fit_from_kernel(kernel, y, alpha=alpha)
    assert double.converged and double.fit_record["refined_at"] is None and double.fit_record["precision"] == "float64"
    record = single.fit_record
    assert single.converged and record["refined_at"] is not None and record["precision"] == "float64", record
    assert record["iterations"] <= double.fit_record["iterations"] + 5 and not record["stalled"]
    k = kernel.float().double().numpy()  # the problem the float32 fit was given
    values = [objective(k, y.numpy(), *parameters(s), alpha=alpha) for s in (single, double)]
    assert values[0] == pytest.approx(values[1], rel=1e-9)  # stuck in float32 it stayed 1.3e-8 above


def test_tolerance_below_rounding_stops_when_steps_stop_helping(digits):
    k, y = digits["k_train"][:300, :300], digits["y_train"][:300]
    for kernel in (k.double(), k.float()):
        surrogate = fit_from_kernel(kernel, y, tolerance=1e-30)
        record = surrogate.fit_record
        assert record["stalled"] and not surrogate.converged and record["iterations"] < 25 and record["gap"] < 1e-15, record


def test_the_fit_does_not_depend_on_the_kernels_units(digits):
    """The penalty is measured against the kernel's mean diagonal: a kernel in other units (an
    unnormalised kernel of 0–255 pixels, ×1e5) is the same problem, solved in as many steps, with the
    same logits; a huge constant kernel is solved in a few steps too."""
    k, k_test, y = digits["k_train"], digits["k_test"], digits["y_train"]
    base = fit_from_kernel(k, y)
    for factor in (1e5, 1e-5):
        scaled = fit_from_kernel(k * factor, y)
        assert scaled.converged and scaled.fit_record["iterations"] <= base.fit_record["iterations"] + 1, scaled.fit_record
        assert scaled.fit_record["kernel_scale"] == pytest.approx(factor, rel=1e-3)
        torch.testing.assert_close(scaled.predict(k_test * factor), base.predict(k_test), rtol=1e-4, atol=1e-4 * base.predict(k_test).abs().max().item())
    constant = fit_from_kernel(torch.full((100, 100), 1e5), y[:100])
    assert constant.converged and constant.fit_record["iterations"] <= 5, constant.fit_record


def test_an_unnormalised_kernel_reaches_the_optimum_scipy_finds(digits):
    """An independent oracle: scipy's L-BFGS on the objective written out in float64 (mean cross-entropy
    plus α·κ̄²/2·‖W‖², κ̄ the kernel's mean diagonal) on a trNTK⁰ kernel of large units."""
    from scipy.optimize import minimize

    n, classes = 60, 10
    k = ln.kernel_from_features(digits["grads_train"][:n], normalize=False).double() * 1e3
    y = digits["y_train"][:n].numpy()
    scale = float(k.diagonal().mean())
    penalty = ALPHA * scale**2
    ours = fit_from_kernel(k, digits["y_train"][:n], num_outputs=classes)
    assert ours.converged and ours.penalty == pytest.approx(penalty)
    kn = k.numpy()

    def value_and_gradient(flat, kernel, l2):
        w, b = flat[: classes * n].reshape(classes, n), flat[classes * n :]
        logits = kernel @ w.T + b
        p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
        residual = (p - np.eye(classes)[y]) / n
        value = (logsumexp(logits, axis=1) - logits[np.arange(n), y]).mean() + 0.5 * l2 * (w**2).sum()
        return value, np.concatenate([(residual.T @ kernel + l2 * w).ravel(), residual.sum(0)])

    # scipy in the weights V = κ̄·W on K / κ̄ (the same objective; L-BFGS stalls early in the raw units)
    solution = minimize(value_and_gradient, np.zeros(classes * (n + 1)), args=(kn / scale, ALPHA), jac=True, method="L-BFGS-B",
                        options=dict(maxiter=50_000, gtol=1e-12, ftol=1e-15)).x
    solution[: classes * n] /= scale
    theirs, _ = value_and_gradient(solution, kn, penalty)
    assert ours.fit_record["objective"] <= theirs * (1 + 1e-9) and theirs - ours.fit_record["objective"] <= 1e-6 * theirs
    their_logits = kn @ solution[: classes * n].reshape(classes, n).T + solution[classes * n :]
    assert np.abs(ours.predict(k).numpy() - their_logits).max() < 1e-2 * np.abs(their_logits).max()


def test_kernels_that_are_not_symmetric_or_not_psd_are_refused(digits):
    k, y = digits["k_train"][:200, :200].double(), digits["y_train"][:200]
    with pytest.raises(ValueError, match="not symmetric.*train×train kernel"):
        fit_from_kernel(k + 0.2 * torch.rand_like(k, generator=torch.Generator().manual_seed(0)), y)
    distances = torch.cdist(digits["x_train"][:200].double(), digits["x_train"][:200].double()) ** 2
    with pytest.raises(ValueError, match="not positive semidefinite.*a distance matrix is not"):
        fit_from_kernel(-distances + distances.mean(), y)  # symmetric, a positive diagonal, and indefinite
    with pytest.raises(ValueError, match="negative diagonal entry"):
        fit_from_kernel(k - 2 * torch.eye(200, dtype=torch.float64), y)


def test_a_fit_that_stops_short_says_why_and_what_helps(digits):
    k, y = digits["k_train"], digits["y_train"]
    assert fit_from_kernel(k, y).fit_record["warning"] == ""
    short = fit_from_kernel(k, y, max_iter=2)
    assert not short.converged and short.fit_record["stop"] == "max_iter"
    assert "did not converge" in short.fit_record["warning"] and "max_iter" in short.fit_record["warning"]
    floor = fit_from_kernel(k.double(), y, tolerance=1e-30)
    assert floor.fit_record["stop"] == "stalled" and "a tolerance of" in floor.fit_record["warning"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_a_fit_and_attribution_reading_memory_mapped_features_in_blocks_equal_those_in_memory(digits, tmp_path, dtype):
    """No normalised copy of the features is made, and the result is the in-memory one: to 1e-8 in float64, to the
    solver's tolerance in float32 and float16 (whose products are summed in another order)."""
    featurizer = ln.Featurizer(digits["net"], projection_dim=32, seed=0)
    train, query = featurizer(digits["x_train"][:300]).to(dtype), featurizer(digits["x_test"][:20]).to(dtype)
    np.save(tmp_path / "train.npy", train.numpy())
    mapped = np.load(tmp_path / "train.npy", mmap_mode="c")
    labels = digits["y_train"][:300]
    in_memory = fit_from_features(train, labels, tolerance=1e-12)
    blocks = fit_from_features(mapped, labels, tolerance=1e-12, block_size=64)
    assert blocks.train_features is None and blocks.feature_rows.features is mapped
    exact = dtype == torch.float64
    close = dict(rtol=1e-8, atol=1e-8) if exact else dict(rtol=1e-4, atol=1e-4 * float(in_memory.weight.detach().abs().max()))
    assert blocks.fit_record["objective"] == pytest.approx(in_memory.fit_record["objective"], rel=1e-12 if exact else 1e-9)
    torch.testing.assert_close(blocks.weight, in_memory.weight, **close)
    torch.testing.assert_close(blocks.predict_from_features(query), in_memory.predict_from_features(query), **close)
    for method in ("influence", "representer"):
        a = ln.attribute(blocks, query_features=query, method=method, top_k=3, return_scores=True, block_size=64)
        b = ln.attribute(in_memory, query_features=query, method=method, top_k=3, return_scores=True)
        torch.testing.assert_close(a.scores, b.scores, rtol=close["rtol"], atol=close["rtol"] * float(b.scores.abs().max()))
        if exact:
            assert torch.equal(a.proponent_indices, b.proponent_indices) and torch.equal(a.opponent_indices, b.opponent_indices)
    # The query kernel rows against memory-mapped reference features are read in blocks too, and are the same.
    torch.testing.assert_close(ln.kernel_from_features(query, mapped, block_size=64), ln.kernel_from_features(query, train, block_size=10**6))
