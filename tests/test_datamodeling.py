"""The attribution-quality measures against scipy and sklearn, and the retraining harness in real runs:
a plain PyTorch loop and a LightningModule under a Trainer, cached, resumed, seeded."""

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from lightning_ntk.datamodeling import (
    Retraining, flip_labels, lightning_training, linear_datamodeling_score, margins, mislabel_auroc, noise_ceiling, random_subsets,
)
from lightning_ntk.demos import Classifier


def test_lds_is_the_mean_spearman_of_predicted_and_retrained_margins():
    rng = np.random.default_rng(0)
    scores = torch.as_tensor(rng.normal(size=(7, 30)))
    scores[0] = torch.as_tensor(rng.integers(-1, 2, 30), dtype=torch.float64)  # ties in the predicted sums
    subsets = random_subsets(30, 40, seed=3)
    assert subsets.shape == (40, 30) and (subsets.sum(1) == 15).all() and len({tuple(s.tolist()) for s in subsets}) == 40
    retrained = subsets.double() @ scores.T + torch.as_tensor(rng.normal(scale=3, size=(40, 7)))
    retrained[:, 1] = retrained[:, 1].round()  # ties in the margins
    result = linear_datamodeling_score(scores, subsets, retrained)
    predicted = (subsets.double() @ scores.T).numpy()
    expected = [scipy.stats.spearmanr(predicted[:, q], retrained[:, q].numpy()).statistic for q in range(7)]
    np.testing.assert_allclose(result.per_query.numpy(), expected, rtol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected)) and result.standard_error == pytest.approx(scipy.stats.sem(expected))
    again = retrained + torch.as_tensor(rng.normal(size=(40, 7)))
    ceiling = noise_ceiling(retrained, again)
    assert ceiling.mean == pytest.approx(np.mean([scipy.stats.spearmanr(retrained[:, q], again[:, q]).statistic for q in range(7)]), rel=1e-12)
    with pytest.raises(ValueError, match="undefined for every query"):
        linear_datamodeling_score(torch.zeros(7, 30), subsets, retrained)  # no predicted sum varies
    with pytest.raises(ValueError, match=r"want \[40, 7\]"):
        linear_datamodeling_score(scores, subsets, retrained.T)


def test_margins_and_mislabel_auroc_against_numpy_and_sklearn():
    logits, labels = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 1])
    want = [2.0 - np.logaddexp(0.0, -1.0), 0.5 - np.logaddexp(0.5, 3.0)]
    np.testing.assert_allclose(margins(logits, labels).numpy(), want)
    np.testing.assert_allclose(margins(torch.tensor([[1.5], [1.5]]), torch.tensor([1, 0])).numpy(), [1.5, -1.5])
    rng = np.random.default_rng(1)
    clean = torch.as_tensor(rng.integers(0, 4, 200))
    noisy, flipped = flip_labels(clean, 0.1, 4, seed=2)
    assert int(flipped.sum()) == 20 and (noisy[flipped] != clean[flipped]).all() and (noisy[~flipped] == clean[~flipped]).all()
    suspicion = torch.as_tensor(rng.normal(size=200)) + 1.5 * flipped
    suspicion[:10] = 0.5  # ties
    assert mislabel_auroc(suspicion, flipped) == pytest.approx(roc_auc_score(flipped.numpy(), suspicion.numpy()), abs=1e-12)


def tiny_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return x, (x[:, 0] + 0.3 * x[:, 1] > 0).long()


def plain_training(dataset, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = map(torch.stack, zip(*[dataset[i] for i in range(len(dataset))]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def test_retraining_is_cached_resumed_and_seeded(tmp_path):
    x, y = tiny_data()
    query = tiny_data(6, seed=1)
    subsets = random_subsets(40, 4, seed=0)
    calls = []

    def counted(dataset, seed):
        calls.append((len(dataset), seed))
        return plain_training(dataset, seed)

    harness = Retraining(counted, TensorDataset(x, y), query, folder=tmp_path, name="tiny")
    first = harness.margins(subsets[:2], progress=False)  # an interrupted run: two of four done
    full = harness.margins(subsets, progress=False)
    assert calls == [(20, 0), (20, 1), (20, 2), (20, 3)]  # the first two were read back, not trained again
    assert torch.equal(full[:2], first)
    expected = torch.stack([margins(plain_training(TensorDataset(x[s], y[s]), m)(query[0]).detach(), query[1]) for m, s in enumerate(subsets)])
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    other_seeds = Retraining(counted, TensorDataset(x, y), query, folder=tmp_path, name="tiny").margins(subsets, seeds=[7, 8, 9, 10], progress=False)
    assert len(calls) == 8 and not torch.equal(other_seeds, full)  # other seeds are other entries, trained anew
    with pytest.raises(ValueError, match=r"subsets must be \[M, 40\]"):
        harness.margins(subsets[:, :10])


def test_a_lightning_module_retrains_under_a_trainer(tmp_path):
    x, y = tiny_data()
    query = tiny_data(6, seed=1)
    train = lightning_training(lambda: Classifier(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)), lr=0.1), batch_size=8, max_epochs=2)
    harness = Retraining(train, TensorDataset(x, y), query, folder=tmp_path, name="lightning")
    got = harness.margins(random_subsets(40, 2, seed=0), progress=False)
    again = Retraining(train, TensorDataset(x, y), query, name="lightning").margins(random_subsets(40, 2, seed=0), progress=False)
    assert got.shape == (2, 6) and torch.isfinite(got).all()
    torch.testing.assert_close(got, again)  # seeded: the same margins without the cache
