"""Fidelity metrics against scipy on the same numbers."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from lightning_ntk.metrics import KendallTau, SurrogateFidelity, binomial_survival, fidelity_scores, kendall_tau_b


@pytest.mark.parametrize("n", [2, 3, 17, 500, 4000])
@pytest.mark.parametrize("ties", [False, True])
def test_kendall_tau_b_equals_scipy(n, ties):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 6, n).astype(float) if ties else rng.random(n)
    y = x + (rng.integers(0, 4, n) if ties else rng.random(n))
    assert kendall_tau_b(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-6)


def test_kendall_tau_b_beyond_torchmetrics_overflow():
    """At 100k points torchmetrics' τ-b overflows; this one must still equal scipy."""
    rng = np.random.default_rng(0)
    x = rng.random(100_000)
    y = np.round(x + rng.random(100_000), 2)  # plenty of ties
    assert kendall_tau_b(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-6)


def test_kendall_tau_degenerate_is_nan():
    assert math.isnan(kendall_tau_b([1.0], [2.0]))
    assert math.isnan(kendall_tau_b([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_scores_true_class_predicted_class_logits_and_saturation():
    net = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1000.0, 0.0, 0.0]])
    sur = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    n, s = fidelity_scores(net, sur, labels, "true_class")
    assert len(n) == 2  # the third network probability is exactly 1 (saturated) and dropped
    torch.testing.assert_close(n, torch.softmax(net.double(), 1)[[0, 1], [0, 2]])
    torch.testing.assert_close(s, torch.softmax(sur.double(), 1)[[0, 1], [0, 2]])
    n, s = fidelity_scores(net, sur, labels, "predicted_class")
    torch.testing.assert_close(s, torch.softmax(sur.double(), 1)[[0, 1], [0, 1]])
    n, s = fidelity_scores(net, sur, labels, "logits")
    assert n.shape == (9,)
    n, s = fidelity_scores(net[:, :1], sur[:, :1], torch.tensor([1, 0, 1]))
    torch.testing.assert_close(n, torch.sigmoid(net[:2, 0].double()))


def test_surrogate_fidelity_against_numpy_and_scipy():
    rng = np.random.default_rng(3)
    m, c = 300, 4
    labels = torch.as_tensor(rng.integers(0, c, m))
    net = torch.as_tensor(rng.normal(size=(m, c))) + 2 * torch.nn.functional.one_hot(labels, c)
    sur = net + torch.as_tensor(rng.normal(scale=0.8, size=(m, c)))
    metric = SurrogateFidelity()
    for chunk in range(0, m, 64):  # several updates, as over batches
        metric.update(net[chunk : chunk + 64], sur[chunk : chunk + 64], labels[chunk : chunk + 64])
    got = metric.compute()
    assert set(got) == {"kendall_tau", "tad", "agreement", "surrogate_acc", "network_acc", "miss_overlap", "miss_overlap_p"}
    pn, ps = net.argmax(1).numpy(), sur.argmax(1).numpy()
    y = labels.numpy()
    pnet = torch.softmax(net, 1)[torch.arange(m), labels].numpy()
    psur = torch.softmax(sur, 1)[torch.arange(m), labels].numpy()
    assert float(got["kendall_tau"]) == pytest.approx(scipy.stats.kendalltau(pnet, psur).statistic, abs=1e-6)
    assert float(got["network_acc"]) == pytest.approx((pn == y).mean())
    assert float(got["tad"]) == pytest.approx((ps == y).mean() - (pn == y).mean())
    assert float(got["agreement"]) == pytest.approx((pn == ps).mean())
    both, either = ((pn != y) & (ps != y)).sum(), ((pn != y) | (ps != y)).sum()
    assert float(got["miss_overlap"]) == pytest.approx(both / either)
    p = (pn != y).mean() * (ps != y).mean()
    assert float(got["miss_overlap_p"]) == pytest.approx(scipy.stats.binom.sf(both - 1, m, p), rel=1e-6)


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.3), (3, 10, 0.3), (40, 400, 0.05), (400, 400, 0.5), (5, 10, 0.0)])
def test_binomial_survival_equals_scipy(k, n, p):
    assert binomial_survival(k, n, p) == pytest.approx(scipy.stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)


def test_labels_outside_the_classes_are_refused():
    metric = KendallTau()
    with pytest.raises(ValueError, match=r"hold labels 0\.\.\d+, outside the 3 classes.*query set"):
        metric.update(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="same shape"):
        SurrogateFidelity().update(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="Unknown score"):
        KendallTau(score="margin")


@pytest.mark.parametrize("classes", [1, 2, 10])
def test_equal_logits_tie_whatever_the_batching(classes):
    """Elementwise kernels round a vector's tail differently (sigmoid: 27 of 1,000 float64 values one ulp off),
    so scores computed batch by batch turned tied logits into ordered pairs. Equal logits must give equal
    scores, and τ must not depend on the update sizes, the order of examples or merged states."""
    rng = np.random.default_rng(classes)
    distinct = torch.as_tensor(rng.normal(scale=3, size=(40, classes)), dtype=torch.float32)
    rows = torch.as_tensor(rng.integers(0, 40, 1000))
    net, sur = distinct[rows], (distinct + torch.as_tensor(rng.normal(size=(40, classes)), dtype=torch.float32))[rows]
    labels = torch.as_tensor(rng.integers(0, max(2, classes), 40))[rows]
    n, s = fidelity_scores(net, sur, labels)
    first = {}
    for row, a, b in zip(rows.tolist(), n.tolist(), s.tolist()):
        assert first.setdefault(row, (a, b)) == (a, b)
    whole = KendallTau()
    whole.update(net, sur, labels)
    expected = float(whole.compute())
    assert expected == pytest.approx(scipy.stats.kendalltau(n.numpy(), s.numpy()).statistic, abs=1e-12)
    for size in (1, 7, 333):
        batched = KendallTau()
        for start in range(0, 1000, size):
            batched.update(net[start : start + size], sur[start : start + size], labels[start : start + size])
        assert float(batched.compute()) == expected
    order = torch.as_tensor(rng.permutation(1000))
    halves = [KendallTau(), KendallTau()]
    for half, part in zip(halves, (order[:501], order[501:])):
        half.update(net[part], sur[part], labels[part])
    halves[0].merge_state(halves[1])
    assert float(halves[0].compute()) == expected
