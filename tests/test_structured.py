"""The structured path: per-layer signals, the count-sketch applied to them, and the factored exact kernel,
each against an independent computation (brute-force autograd loops, an explicit hash matrix)."""

import pytest
import torch
from models import DictModel, SmallCNN, dict_inputs, mlp
from test_exact_kernels import brute_force_gradients
from torch import nn

import lightning_ntk as ln
from lightning_ntk import projection

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


class Scale(nn.Module):
    """A module with a parameter that the structured path does not know: it falls back."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.weight[:, None]


class Sequence(nn.Module):
    """Tokens through an embedding (with padding), LayerNorm, a grouped dilated Conv1d, GroupNorm, an
    unsupported module, in-place activations, and one Linear layer called twice."""

    def __init__(self, vocab=13, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 8, 3, padding=2, dilation=2, groups=2)
        self.group_norm = nn.GroupNorm(2, 8)
        self.scale = Scale(8)
        self.head = nn.Linear(8, classes)

    def forward(self, tokens):
        h = torch.relu_(self.conv(self.norm(self.embed(tokens)).transpose(1, 2)))
        h = self.scale(self.group_norm(h)).transpose(1, 2)
        return (self.head(h) + self.head(0.5 * h)).mean(1)


def conv_net(seed=0):
    """Reflect padding, stride, 'same' padding, a layer without bias, BatchNorm with running stats,
    and a last convolution with one output position (its exact Gram keeps the factors)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, (2, 3), padding="same", bias=False), nn.Tanh(),
        nn.Conv2d(5, 6, 4), nn.Flatten(), nn.Linear(6, 3),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def tokens(n=5, seed=1):
    t = torch.randint(0, 13, (n, 7), generator=torch.Generator().manual_seed(seed))
    t[:, -2:] = 0  # padding
    return t


CASES = {
    "mlp": (lambda: mlp().double(), lambda: torch.randn(5, 6, dtype=torch.float64)),
    "cnn_batchnorm": (lambda: SmallCNN().double(), lambda: torch.randn(4, 2, 7, 7, dtype=torch.float64)),
    "conv_options": (lambda: conv_net().double(), lambda: torch.randn(4, 3, 8, 8, dtype=torch.float64)),
    "dict_embedding": (lambda: DictModel().double(), lambda: dict_inputs(5)),
    "sequence": (lambda: Sequence().double(), tokens),
}


def make(case):
    model, inputs = CASES[case][0](), CASES[case][1]()
    return model, inputs


def explicit_sketch(signals, sketch, dtype=torch.float64):
    """Apply the count-sketch the slow way: form each block's per-example gradient matrix and send every
    coordinate to its bucket with its sign, as the hash documents it."""
    b, c = signals[0].grads[0].shape[0], len(signals[0].grads)
    k = sketch.projection_dim
    out = torch.zeros(b, c, k, dtype=dtype)
    for position, sig in enumerate(signals):
        blk = sig.block
        h = sketch.block_hash(position, blk, torch.device("cpu"), dtype)
        g = sig.matrix().reshape(b, c, blk.rows, blk.cols)
        column_of = torch.argsort(h.col_index)  # where each gradient column sits after the permutation
        rows = torch.arange(blk.rows)[:, None]
        bucket = (h.offset + rows * blk.cols + column_of[None, :]) % k
        sign = h.row_sign[:, None] * h.col_sign[column_of][None, :]
        for i in range(b):
            for j in range(c):
                out[i, j].index_add_(0, bucket.flatten(), (sign * g[i, j]).flatten())
    return out


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
@pytest.mark.parametrize("case", CASES)
def test_layer_gradients_match_brute_force(case):
    model, inputs = make(case)
    model.train()  # BatchNorm must run on its running statistics, and the modes be restored
    signals = ln.LayerGradients(model)(inputs)
    assert all(m.training for m in model.modules())
    got = {}
    for sig in signals:
        got.update(sig.parameter_gradients())
    names = [n for n, p in model.named_parameters()]
    assert sorted(got) == sorted(names)
    want = brute_force_gradients(model, inputs)
    start = 0
    for name, p in model.named_parameters():
        expected = want[..., start : start + p.numel()].reshape(*want.shape[:2], *p.shape)
        start += p.numel()
        torch.testing.assert_close(got[name], expected, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
@pytest.mark.parametrize("route", ["fold", "fft"])
@pytest.mark.parametrize("case", CASES)
def test_sketch_equals_explicit_count_sketch(case, route, monkeypatch):
    monkeypatch.setattr(projection, "FFT_WEIGHT", 0.0 if route == "fft" else float("inf"))
    model, inputs = make(case)
    signals = ln.LayerGradients(model)(inputs)
    for k in (7, 64):  # fewer buckets than a layer has columns, and more
        sketch = ln.SketchProjector(k, seed=3)
        torch.testing.assert_close(sketch.project(signals), explicit_sketch(signals, sketch), rtol=1e-9, atol=1e-12)


def test_pntk_sketch_is_the_sketch_of_the_summed_gradient():
    model, x = SmallCNN().double(), torch.randn(6, 2, 7, 7, dtype=torch.float64)
    features = ln.project_features(model, x, kind="pntk", projection_dim=32, projector="sketch", seed=2)
    assert features.shape == (6, 32)
    signals = ln.LayerGradients(model)(x, summed=True)
    torch.testing.assert_close(features, explicit_sketch(signals, ln.SketchProjector(32, seed=2))[:, 0])


def test_sketch_is_unbiased():
    model, x = conv_net().double(), torch.randn(8, 3, 8, 8, dtype=torch.float64)
    exact = ln.exact_kernel(model, x, kind="trntk0", method="vmap")
    signals = ln.LayerGradients(model)(x)
    draws = torch.stack([ln.kernel_from_features(ln.SketchProjector(32, s).project(signals), normalize=False) for s in range(40)])
    z = (draws.mean(0) - exact) / (draws.std(0) / 40**0.5)
    # Every entry is a separate test at 3 standard errors: allow the chance misses of ~0.3% of them.
    assert (z.abs() < 3).float().mean() >= 0.95, z
    totals = draws.sum((1, 2))
    assert (totals.mean() - exact.sum()).abs() < 3 * totals.std() / 40**0.5


def test_sketch_error_is_that_of_a_dense_projection():
    """At equal K, the kernel error of the sketch is close to the dense Gaussian projection's."""
    model, x = SmallCNN(classes=4).double(), torch.randn(12, 2, 7, 7, dtype=torch.float64)
    grads = ln.gradient_features(model, x)
    exact = ln.kernel_from_features(grads)
    off = ~torch.eye(12, dtype=torch.bool)

    def error(features):
        return (ln.kernel_from_features(features) - exact)[off].abs().mean()

    seeds, signals = range(12), ln.LayerGradients(model)(x)
    sketch = torch.stack([error(ln.SketchProjector(128, s).project(signals)) for s in seeds])
    dense = torch.stack([error(ln.RandomProjector(grads.shape[-1], 128, "gaussian", s).project(grads)) for s in seeds])
    assert sketch.mean() <= 1.5 * dense.mean(), (sketch.mean(), dense.mean())


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
def test_same_seed_same_sketch_whatever_the_batch_size():
    model, t = Sequence().double(), tokens(9)
    a = ln.project_features(model, t, projection_dim=50, projector="sketch", seed=7, batch_size=9)
    b = ln.project_features(model, t, projection_dim=50, projector="sketch", seed=7, batch_size=4)
    c = ln.Featurizer(model, projection_dim=50, projector="sketch", seed=7, chunk_size=1)(t, batch_size=5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    assert (a - ln.project_features(model, t, projection_dim=50, projector="sketch", seed=8)).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
@pytest.mark.parametrize("case", CASES)
def test_factored_kernel_equals_the_vmap_kernel(case):
    model, inputs = make(case)
    a = inputs[:3] if isinstance(inputs, torch.Tensor) else {k: v[:3] for k, v in inputs.items()}
    for kind in ("trntk", "trntk0", "pntk"):
        want = ln.exact_kernel(model, a, inputs, kind=kind, method="vmap")
        torch.testing.assert_close(ln.exact_kernel(model, a, inputs, kind=kind, batch_size=2), want, rtol=1e-10, atol=1e-12)


def test_factored_kernel_keeps_factors_where_they_are_cheaper():
    model, x = conv_net().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    forms = {sig.block.name: sig.block.kind for sig in ln.layers.gram_factors(ln.LayerGradients(model)(x))}
    assert forms == {"0": "flat", "1": "flat", "3": "flat", "5": "outer", "7": "outer"}


def test_half_precision_storage_accumulates_in_float32():
    model, x = SmallCNN(), torch.randn(10, 2, 7, 7)
    full = ln.project_features(model, x, projection_dim=256, projector="sketch")
    for dtype in (torch.float16, torch.bfloat16):
        half = ln.project_features(model, x, projection_dim=256, projector="sketch", dtype=dtype)
        assert half.dtype == dtype
        kernel = ln.kernel_from_features(half)
        assert kernel.dtype == torch.float32
        torch.testing.assert_close(kernel, ln.kernel_from_features(full), rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)
    assert ln.project_features(model, x, projection_dim=16, projector="gaussian", dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        ln.Featurizer(model, dtype=torch.int8)


def test_fallback_warns_with_the_module_names():
    with pytest.warns(UserWarning, match=r"module\(s\) 'scale' use the generic torch.func path"):
        ln.LayerGradients(Sequence())


def test_weight_used_outside_its_module_falls_back():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.inner(x) + nn.functional.linear(x, self.inner.weight))

    model, x = Tied().double(), torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"'inner'.*differ from autograd's"):
        got = ln.exact_kernel(model, x)
    torch.testing.assert_close(got, ln.exact_kernel(model, x, method="vmap"))


def test_input_modified_in_place_after_use_is_refused():
    class Overwrites(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(x * 1.0)
            out = self.first(h)
            h.mul_(2)  # the first layer's input, changed after the layer used it
            return self.second(out + h)

    with pytest.raises(RuntimeError, match="input of layer 'first' was modified in place"):
        ln.project_features(Overwrites(), torch.randn(4, 3), projection_dim=8, projector="sketch")


def test_inference_mode_batches_and_non_finite_gradients():
    model = mlp()
    with torch.inference_mode():
        x = torch.randn(4, 6)
    torch.testing.assert_close(
        ln.project_features(model, x, projection_dim=16, projector="sketch"),
        ln.project_features(model, x.clone(), projection_dim=16, projector="sketch"),
    )
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ln.NonFiniteGradientError, match=r"parameter '(0|2|4)\.(weight|bias)'"):
        ln.project_features(model, torch.randn(3, 6), projection_dim=8, projector="sketch")


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown method"):
        ln.exact_kernel(mlp(), torch.randn(3, 6), method="fast")
    with pytest.raises(ValueError, match="method='factored' computes the kinds"):
        ln.exact_kernel(mlp(), torch.randn(3, 6), kind="entk", method="factored")
    with pytest.raises(ValueError, match="projection_dim must be a positive integer"):
        ln.project_features(mlp(), torch.randn(3, 6), projection_dim=0, projector="sketch")
