"""The kernel-machine surrogate on real digits: fidelity, optimality against sklearn and by hand,
streamed training, Lightning checkpoints and clear errors."""

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.linear_model import LogisticRegression
from torch import nn

import lightning_ntk as ln
from lightning_ntk.demos import load_digits_tensors
from lightning_ntk.metrics import SurrogateFidelity
from lightning_ntk.surrogate import KernelSurrogate, fit_from_features, fit_from_kernel

ALPHA = 1e-4


def train_network(net, x, y, epochs, binary=False):
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
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


def test_exact_trntk_surrogate_is_faithful_and_optimal_on_digits(digits):
    surrogate = fit_from_kernel(digits["k_train"], digits["y_train"])
    assert surrogate.converged and surrogate.fit_record["epochs"] < 100, surrogate.fit_record
    metric = SurrogateFidelity()
    metric.update(digits["net_logits"], surrogate.predict(digits["k_test"]), digits["y_test"])
    result = {k: float(v) for k, v in metric.compute().items()}
    print("digits MLP, exact trNTK:", result, surrogate.fit_record)
    assert abs(result["tad"]) <= 0.02, result
    assert result["kendall_tau"] > 0.5, result

    # Stationarity of the objective mean CE + α/2·‖W‖², with its gradient written out by hand in float64.
    k, y = digits["k_train"].double().numpy(), digits["y_train"].numpy()
    w, b = surrogate.weight.detach().double().numpy(), surrogate.bias.detach().double().numpy()
    logits = k @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(10)[y]
    grad_w = residual.T @ k / len(y) + ALPHA * w
    assert np.abs(grad_w).max() < 1e-4 * max(1.0, np.abs(ALPHA * w).max() * 100), np.abs(grad_w).max()
    assert np.abs(residual.mean(0)).max() < 1e-4
    # The recorded final objective is that objective.
    objective = -np.log(p[np.arange(len(y)), y]).mean() + 0.5 * ALPHA * (w**2).sum()
    assert surrogate.fit_record["loss"] == pytest.approx(objective, rel=1e-4)


@pytest.mark.parametrize("formulation", ["multinomial", "ovr"])
def test_surrogate_matches_sklearn_logistic_regression(digits, formulation):
    """The same objective solved by sklearn on the same precomputed kernel (its first 300 training
    points, to keep sklearn fast): same decision function, test accuracy within 1 pp."""
    n = 300
    k_train, k_test = digits["k_train"][:n, :n].double(), digits["k_test"][:, :n].double()
    y = digits["y_train"][:n].numpy()
    ours = fit_from_kernel(k_train, digits["y_train"][:n], formulation=formulation, alpha=ALPHA)
    assert ours.converged
    c = 1.0 / (ALPHA * n)  # sklearn minimises C·Σ loss + ½‖w‖², i.e. α = 1 / (C·N) on the mean loss
    if formulation == "multinomial":
        theirs = LogisticRegression(C=c, max_iter=20_000, tol=1e-10).fit(k_train.numpy(), y).decision_function(k_test.numpy())
    else:  # sklearn's SGDClassifier weighting: positives N / (classes·N_c), negatives 1
        counts = np.bincount(y, minlength=10)
        theirs = np.stack([
            LogisticRegression(C=c, class_weight={1: n / (10 * counts[cls]), 0: 1.0}, max_iter=20_000, tol=1e-10)
            .fit(k_train.numpy(), (y == cls).astype(int)).decision_function(k_test.numpy())
            for cls in range(10)
        ], 1)
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
    metric = SurrogateFidelity()
    with torch.no_grad():
        metric.update(net(x_test), logits, y_test)
    result = metric.compute()
    assert abs(float(result["tad"])) <= 0.03 and float(result["kendall_tau"]) > 0.3, result


def test_streamed_training_equals_precomputed(digits):
    """Fitting from projected features (no N×N kernel) reaches the same surrogate as fitting on their kernel."""
    featurizer = ln.Featurizer(digits["net"], projection_dim=64, seed=0)
    train, test = featurizer(digits["x_train"]), featurizer(digits["x_test"])
    precomputed = fit_from_kernel(ln.kernel_from_features(train), digits["y_train"])
    streamed = fit_from_features(train, digits["y_train"])
    assert streamed.converged and precomputed.converged
    test_rows = ln.kernel_from_features(test, train)
    a = precomputed.predict(test_rows)
    b = streamed.predict_from_features(test, block_size=200)
    assert abs(accuracy(a, digits["y_test"]) - accuracy(b, digits["y_test"])) <= 0.005
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    # Kernel rows given to a streamed surrogate are the same thing as its features.
    torch.testing.assert_close(streamed.predict(test_rows), b, atol=1e-3, rtol=1e-3)


def test_features_from_a_memmap_and_a_lightning_checkpoint(digits, tmp_path):
    """Memmapped features fit like in-memory ones; the surrogate trains under a user's Trainer with a
    logger, and a checkpoint restores it with its training features."""
    net, x = digits["net"], digits["x_train"][:200]
    featurizer = ln.Featurizer(net, projection_dim=64, seed=0)
    features = featurizer(x).numpy()
    np.save(tmp_path / "features.npy", features)
    mapped = np.load(tmp_path / "features.npy", mmap_mode="r")
    labels = digits["y_train"][:200]
    from_memory = fit_from_features(torch.as_tensor(features), labels, spec=featurizer.spec())
    from_disk = fit_from_features(mapped, labels, spec=featurizer.spec(), trainer_kwargs=dict(
        logger=CSVLogger(tmp_path, name="surrogate"), enable_checkpointing=True, default_root_dir=tmp_path,
    ))
    query = featurizer(digits["x_test"][:50])
    expected = from_memory.predict_from_features(query, spec=featurizer.spec())
    torch.testing.assert_close(from_disk.predict_from_features(query), expected)
    logged = (tmp_path / "surrogate" / "version_0" / "metrics.csv").read_text()
    assert "surrogate/train_loss" in logged
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    restored = KernelSurrogate.load_from_checkpoint(checkpoint)
    torch.testing.assert_close(restored.predict_from_features(query, spec=featurizer.spec()), expected)
    other = ln.Featurizer(net, projection_dim=64, seed=1)
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
    with pytest.raises(ValueError, match="Unknown formulation 'svm'"):
        fit_from_kernel(k, y, formulation="svm")
    bad = k.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="training kernel holds NaN"):
        fit_from_kernel(bad, y)
    bad_features = digits["grads_train"][:50].clone()
    bad_features[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="feature array holds NaN or inf"):
        fit_from_features(bad_features, y)

    surrogate = fit_from_kernel(k, y, max_epochs=2)
    assert surrogate.hparams.normalized and surrogate.fit_record["epochs"] == 2
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
    featurizer = ln.Featurizer(net, projection_dim=64, seed=0)
    surrogate = fit_from_features(featurizer(x), y, spec=featurizer.spec(), max_epochs=2)
    other = ln.Featurizer(net, projection_dim=64, seed=1)
    with pytest.raises(ValueError, match="computed differently from the training features.*seed"):
        surrogate.predict_from_features(other(x[:5]), spec=other.spec())
    with pytest.raises(ValueError, match=r"per-example shape \(10, 32\).*\(10, 64\)"):
        surrogate.predict_from_features(ln.project_features(net, x[:5], projection_dim=32))
    with pytest.raises(ValueError, match=r"per-example shape \(64,\)"):
        surrogate.predict_from_features(ln.project_features(net, x[:5], kind="pntk", projection_dim=64))
    # Kernel rows that state a different spec are refused as well.
    by_kernel = fit_from_kernel(ln.kernel_from_features(featurizer(x)), y, spec=featurizer.spec(), max_epochs=2)
    with pytest.raises(ValueError, match="projection_dim: 32 \\(training: 64\\)"):
        by_kernel.predict(torch.zeros(2, 60), spec=ln.Featurizer(net, projection_dim=32, seed=0).spec())
