"""Tiny models shared by the tests."""

import torch
from torch import nn


def mlp(d_in=6, hidden=10, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class SmallCNN(nn.Module):
    """Conv + BatchNorm + linear head; BatchNorm holds non-trivial running stats."""

    def __init__(self, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4 * 3 * 3, classes)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.conv2(h))
        return self.head(h.flatten(1))


class DictModel(nn.Module):
    """Takes keyword inputs like a tokenised-text model: token ids plus a dense feature vector."""

    def __init__(self, vocab=11, dim=5, classes=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.dense = nn.Linear(3, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens, extra):
        h = self.embed(tokens).mean(1) + torch.tanh(self.dense(extra))
        return self.out(h)


def dict_inputs(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, 11, (n, 4), generator=g), "extra": torch.randn(n, 3, generator=g, dtype=torch.float64)}
