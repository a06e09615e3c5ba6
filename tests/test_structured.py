"""The structured path: per-layer signals, the count-sketch applied to them, and the factored exact kernel,
each against an independent computation (brute-force autograd loops, an explicit hash matrix)."""

import pytest
import torch
from models import DictModel, SmallCNN, dict_inputs, mlp
from conftest import brute_force_gradients, brute_force_kernel, explicit_sketch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_ntk as ln
from lightning_ntk import featurize
from lightning_ntk.layers import LayerGradients
from lightning_ntk.pipeline import example_set

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


class TiedOutside(nn.Module):
    """A weight also used through F.linear outside its module: the module must fall back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)) + F.linear(x, self.inner.weight))


class SequenceFirstLinear(nn.Module):
    """Inputs [B, T, 3] through a Linear layer laid out [T, B, ...]: B = T hides the layout in the shapes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix, self.head = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x.transpose(0, 1))).mean(0))


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


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
@pytest.mark.parametrize("case", CASES)
def test_layer_gradients_match_brute_force(case):
    model, inputs = make(case)
    model.train()  # BatchNorm must run on its running statistics, and the modes be restored
    signals = LayerGradients(model)(inputs)
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
def test_sketch_equals_explicit_count_sketch(case, route):
    """Both routes, from the recorded signals and inside the backward pass, whole or one example per piece,
    folded chunk by chunk (the CPU's way) or in one operation (the accelerators')."""
    model, inputs = make(case)
    gradients = LayerGradients(model)
    signals = gradients(inputs)
    for k in (7, 64):  # fewer buckets than a layer has columns, and more
        for piece_bytes, chunked in ((None, None), (1, True), (None, False)):
            sketch = ln.SketchProjector(k, seed=3, fft_weight=0.0 if route == "fft" else float("inf"), piece_bytes=piece_bytes, chunked_fold=chunked)
            want = explicit_sketch(signals, sketch)
            torch.testing.assert_close(sketch.project(signals), want, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(gradients.project(inputs, sketch), want, rtol=1e-9, atol=1e-12)


def test_pntk_sketch_is_the_sketch_of_the_summed_gradient():
    model, x = SmallCNN().double(), torch.randn(6, 2, 7, 7, dtype=torch.float64)
    features = ln.project_features(model, x, kind="pntk", projection_dim=32, projector="sketch", seed=2)
    assert features.shape == (6, 32)
    signals = LayerGradients(model)(x, summed=True)
    torch.testing.assert_close(features, explicit_sketch(signals, ln.SketchProjector(32, seed=2))[:, 0])


def test_sketch_is_unbiased():
    model, x = conv_net().double(), torch.randn(8, 3, 8, 8, dtype=torch.float64)
    exact = ln.exact_kernel(model, x, kind="trntk0", method="vmap")
    signals = LayerGradients(model)(x)
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

    seeds, signals = range(12), LayerGradients(model)(x)
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
    forms = {sig.block.name: sig.block.kind for sig in ln.kernels.gram_factors(LayerGradients(model)(x))}
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
        LayerGradients(Sequence())


def test_weight_used_outside_its_module_falls_back():
    model, x = TiedOutside().double(), torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"'inner'.*uses its parameters outside its own forward"):
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
    with pytest.raises(ValueError, match="method='factored' computes the kernels trntk, trntk0 and pntk"):
        ln.exact_kernel(mlp(), torch.randn(3, 6), kind="entk", method="factored")
    with pytest.raises(ValueError, match="projection_dim must be a positive integer"):
        ln.project_features(mlp(), torch.randn(3, 6), projection_dim=0, projector="sketch")


# -- the path taken, its cost and its memory, whatever the precision ----------------------------------


class Residual(nn.Module):
    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs)
        self.conv2, self.bn2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def resnet(classes=3, seed=0):
    """A ResNet in miniature: a stem, a residual block, a downsampling one with a projection shortcut."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        Residual(8, 8, 1), Residual(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


class OperationCount(TorchDispatchMode):
    """Counts the aten operations dispatched while active (on a GPU, each is a kernel launch or more)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in bytes) that any operation creates while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def operations(fn):
    with OperationCount() as counter:
        fn()
    return counter.count


def floor(model, x):
    """One forward pass and one backward pass per class with weight gradients: what exact per-class
    methods cannot do without."""
    logits = model(x)
    for c in range(logits.shape[1]):
        torch.autograd.grad(logits[:, c].sum(), list(model.parameters()), retain_graph=True)


def test_operations_per_batch_do_not_grow_with_the_number_of_classes():
    """As on a GPU (classes batched in one backward pass, large pieces): the sketch's operations per
    batch stay the same from 10 to 100 classes (up to the few operations by which folding the last
    layer, whose size is the number of classes, into the K buckets depends on that size), and within
    twice the floor's at 10 classes. The route and K are pinned so that the last layer is sketched the
    same way at both counts."""
    x = torch.randn(4, 3, 8, 8)
    sketch_ops, floor_ops = {}, {}
    for classes in (10, 100):
        model = resnet(classes).eval()
        gradients = LayerGradients(model, batch_classes=True)
        projector = ln.SketchProjector(16, fft_weight=float("inf"), piece_bytes=1 << 28, chunked_fold=False)
        features = gradients.project(x, projector)  # the first batch also checks the model's structure
        assert features.shape == (4, classes, 16) and not gradients.fallback_modules
        sketch_ops[classes] = operations(lambda: gradients.project(x, projector))
        floor_ops[classes] = operations(lambda: floor(model, x))
    assert abs(sketch_ops[100] - sketch_ops[10]) <= 10, sketch_ops
    assert sketch_ops[10] <= 2 * floor_ops[10], (sketch_ops, floor_ops)
    assert floor_ops[100] > 5 * floor_ops[10]  # the floor's own count grows with the classes


@pytest.mark.parametrize("batch_classes", [True, False])
def test_classes_batched_or_not_give_the_same_features(batch_classes):
    model, x = resnet().double(), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    signals = LayerGradients(model)(x)
    sketch = ln.SketchProjector(40, seed=1)
    got = LayerGradients(model, batch_classes=batch_classes).project(x, sketch)
    torch.testing.assert_close(got, explicit_sketch(signals, sketch), rtol=1e-9, atol=1e-12)
    # Groups of classes when one group's output gradients would not fit the memory budget.
    grouped = LayerGradients(model, memory_budget=1, batch_classes=batch_classes).project(x, sketch)
    torch.testing.assert_close(grouped, got, rtol=1e-9, atol=1e-12)


def test_backward_without_a_batching_rule_runs_class_by_class():
    class Through(torch.autograd.Function):
        """The identity, with a backward that vmap cannot batch (an in-place copy into a plain tensor)."""

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return torch.zeros(grad.shape, dtype=grad.dtype).copy_(grad)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.first, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(Through.apply(self.first(x))))

    model, x = Model().double(), torch.randn(5, 4, dtype=torch.float64)
    sketch = ln.SketchProjector(16)
    got = LayerGradients(model, batch_classes=True).project(x, sketch)
    torch.testing.assert_close(got, LayerGradients(model, batch_classes=False).project(x, sketch))
    torch.testing.assert_close(got, explicit_sketch(LayerGradients(model)(x), sketch), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("precision", ["bf16-autocast", "float16", "bfloat16"])
def test_reduced_precision_keeps_standard_layers_on_the_structured_path(precision, recwarn):
    """The path is chosen from the model's structure: no module falls back at reduced precision, and the
    kernel stays close to the float64 one."""
    model, x = resnet(), torch.randn(6, 3, 8, 8)
    exact = ln.exact_kernel(resnet().double(), x.double())
    if precision == "bf16-autocast":
        featurizer = ln.Featurizer(model, projection_dim=4096, projector="sketch")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = featurizer.featurize_batch(x)
        assert featurizer.gradients.batch_classes is None
    else:
        dtype = getattr(torch, precision)
        featurizer = ln.Featurizer(model.to(dtype), projection_dim=4096, projector="sketch")
        features = featurizer.featurize_batch(x.to(dtype))
    assert not featurizer.gradients.fallback_modules
    assert len(featurizer.gradients.blocks) == len([m for m in model.modules() if m._parameters])
    assert not [w for w in recwarn if "Per-example gradients of module" in str(w.message)]
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    assert (ln.kernel_from_features(features) - exact).abs().max() < 0.1


def test_layer_that_sees_the_batch_in_another_dimension_falls_back():
    model, x = SequenceFirstLinear().double(), torch.randn(4, 4, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"'mix'.*does not hold the batch in the first dimension"):
        got = ln.exact_kernel(model, x)
    torch.testing.assert_close(got, ln.exact_kernel(model, x, method="vmap"))


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
@pytest.mark.parametrize("batch", [8, 32])
def test_fallback_stays_within_the_memory_budget(batch):
    """The generic path forms per-example gradients chunk by chunk: no tensor beyond the budget, whatever
    the batch size, and the same features as with the whole batch at once."""

    class Mix(nn.Module):
        """A module the structured path does not know, with most of the parameters."""

        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

        def forward(self, x):
            return x @ self.weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 48), nn.Tanh(), Mix(48), nn.Tanh(), nn.Linear(48, 3)).double()
    x = torch.randn(batch, 6, dtype=torch.float64)
    budget = 200_000  # bytes: the fallback's gradients of a whole batch need 3·48²·8·batch ≥ 442 kB
    featurizer = ln.Featurizer(model, projection_dim=64, projector="sketch", memory_budget=budget)
    assert featurizer.gradients.fallback_modules == ["2"]
    featurizer.featurize_batch(x[:2])  # the first batch checks the structure, on two examples
    with LargestTensor() as largest:
        features = featurizer.featurize_batch(x)
    assert 0 < largest.bytes <= budget
    whole = ln.Featurizer(model, projection_dim=64, projector="sketch", memory_budget=1 << 30).featurize_batch(x)
    torch.testing.assert_close(features, whole, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(features, explicit_sketch(LayerGradients(model)(x), ln.SketchProjector(64)), rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(featurize._glibc() is None, reason="the heap is tuned under glibc only")
def test_featurization_keeps_freed_memory_in_the_process():
    """While features stream, memory freed at the top of the heap stays in the process: glibc would hand
    blocks freed at the top back to the system and fault them in again at the next batch."""
    import resource

    def faults_of_refilling(megabytes: int = 20, blocks: int = 5) -> int:
        """The fewest page faults of five rounds of filling and freeing 100 MB in blocks below the mmap threshold."""
        faults = []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            tensors = [torch.ones(megabytes << 18) for _ in range(blocks)]
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            del tensors
        return min(faults)

    seen = []
    model = mlp()
    features = featurize.stream_features(model, torch.randn(6, 4), lambda x: seen.append(featurize._heap_scope.open) or x)
    assert seen == [1] and features.shape == (6, 4) and featurize._heap_scope.open == 0
    with featurize.retained_heap(torch.device("cpu")):
        assert faults_of_refilling() < 1000  # 100 MB are 25,600 pages


@pytest.mark.parametrize("projector", ["sketch", "rademacher"])
def test_features_come_with_the_logits_of_their_own_forward_pass(projector):
    """The query side's logits come with its features: the sketch takes them from the forward pass it
    runs anyway, so that a checkpoint runs one forward pass per batch and side, not two for the query."""
    model, x = SmallCNN().double(), torch.randn(10, 2, 8, 8, dtype=torch.float64)
    featurizer = ln.Featurizer(model, projection_dim=16, projector=projector)
    features, logits = featurizer(x, batch_size=4, with_logits=True)
    torch.testing.assert_close(features, featurizer(x, batch_size=4), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(x), rtol=1e-12, atol=1e-12)
    if projector == "sketch":  # every module falling back: no forward pass of the sketch's to take them from

        class Product(nn.Module):
            """A module the structured path does not know."""

            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.linspace(-1, 1, 128 * 3).view(128, 3))

            def forward(self, x):
                return x.flatten(1) @ self.weight

        only_fallback = Product().double()
        with pytest.warns(UserWarning, match="generic"):
            fallback = ln.Featurizer(only_fallback, projection_dim=16, projector="sketch")
        _, logits = fallback(x, batch_size=4, with_logits=True)
        with torch.no_grad():
            torch.testing.assert_close(logits, only_fallback(x), rtol=0, atol=0)

    pipeline = ln.FidelityPipeline(model, projection={"dim": 16, "projector": projector}, batch_size=4)
    reference, query = (example_set(name, (x, torch.arange(10) % 3)) for name in ("reference", "query"))
    for examples in (reference, query):
        examples.scan(pipeline.task)
    pipeline.featurize(reference, query)  # the first batch checks the model's structure
    forward_passes = []
    handle = model.register_forward_hook(lambda *args: forward_passes.append(1))
    checkpoint = pipeline.featurize(reference, query)
    handle.remove()
    # 3 batches a side; the dense projections' vmapped passes have no logits to give, so the query's run again
    assert len(forward_passes) == (3 + 3 if projector == "sketch" else 3 + 3 + 3)
    torch.testing.assert_close(checkpoint.query_logits, pipeline.logits(x).float())


class WideCNN(nn.Module):
    """A convolution whose per-example products are large on all three sides (32 outputs, 73 columns,
    64 positions), then a small linear head."""

    def __init__(self, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.head = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x):
        return self.head(F.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_bfloat16_products_move_features_by_their_rounding_only():
    """Products in bfloat16 (float32 sums) against the same sketch in float64: features move by about
    0.1%, and the kernel's error against the exact kernel stays that of the sketch (to 3 digits)."""
    model, x = WideCNN(), torch.randn(24, 8, 8, 8)
    signals = LayerGradients(model.double())(x.double())
    exact = ln.kernel_from_features(torch.cat([sig.matrix().flatten(2) for sig in signals], -1))  # from the formed gradients
    model.float()
    errors = {}
    for precision in ("float32", "bfloat16"):
        sketches = []
        for seed in range(4):
            projector = ln.SketchProjector(256, seed, product_precision=precision)
            features = LayerGradients(model).project(x, projector)
            want = explicit_sketch(signals, projector)
            moved = float((features.double() - want).norm() / want.norm())
            assert (moved < 1e-6) if precision == "float32" else (1e-4 < moved < 3e-3), (precision, moved)  # 8e-4 seen
            sketches.append((ln.kernel_from_features(features.double()) - exact).abs().mean())
        errors[precision] = float(torch.stack(sketches).mean())
    assert abs(errors["bfloat16"] - errors["float32"]) < 1e-3 * errors["float32"], errors  # 6e-6 seen


def test_bfloat16_products_only_where_they_pay(monkeypatch):
    """"auto": bfloat16 for float32 signals on CPUs with matrix units, for products large on all sides;
    the features' spec says so, so that stored features of the other precision are not reused."""
    from lightning_ntk import projection
    from lightning_ntk.layers import Block

    conv, thin = Block("conv", "outer", ("w",), 32, 73), Block("head", "outer", ("w",), 4, 513)
    cpu = torch.device("cpu")
    for units in (True, False):
        monkeypatch.setattr(projection, "has_bfloat16_matrix_units", lambda: units)
        auto = ln.SketchProjector(64)
        assert auto.product_dtype(conv, 64, torch.float32, cpu) == (torch.bfloat16 if units else torch.float32)
        assert auto.product_dtype(conv, 16, torch.float32, cpu) == torch.float32  # few positions
        assert auto.product_dtype(thin, 64, torch.float32, cpu) == torch.float32  # few rows
        assert auto.product_dtype(conv, 64, torch.float64, cpu) == torch.float64
        assert ln.SketchProjector(64, product_precision="float32").product_dtype(conv, 64, torch.float32, cpu) == torch.float32
        featurizer = ln.Featurizer(WideCNN(), projection_dim=64, projector="sketch")
        assert featurizer.spec().product_precision == ("bfloat16" if units else None)
    assert ln.SketchProjector(64, product_precision="bfloat16").product_dtype(thin, 1, torch.float32, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="product_precision"):
        ln.ProjectionConfig(product_precision="half")


STRUCTURE_CASES = {
    "tied_outside": (TiedOutside, lambda: torch.randn(5, 4, dtype=torch.float64), "inner"),
    "sequence_first": (SequenceFirstLinear, lambda: torch.randn(4, 4, 3, dtype=torch.float64), "mix"),
}


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
@pytest.mark.parametrize("case", STRUCTURE_CASES)
def test_inference_mode_gives_the_brute_force_kernels_and_keeps_the_structure_check(case):
    """Under torch.inference_mode (as in trainer.predict/validate), with inputs made there, every path gives
    the brute-force kernel; a featurizer first used there still sends the same modules to the fallback later."""
    make_model, make_inputs, falls_back = STRUCTURE_CASES[case]
    model, x = make_model().double(), make_inputs()
    want = brute_force_kernel(brute_force_gradients(model, x), brute_force_gradients(model, x), "trntk")
    featurizer = ln.Featurizer(model, "proj_trntk", 64, "sketch", seed=3)
    with torch.inference_mode():
        inference_x = x.clone()
        torch.testing.assert_close(ln.exact_kernel(model, inference_x), want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ln.factored_kernel(model, inference_x), want, rtol=1e-9, atol=1e-12)
        inside = featurizer(inference_x)
    assert falls_back in featurizer.gradients.fallback_modules
    fresh = ln.Featurizer(model, "proj_trntk", 64, "sketch", seed=3)
    torch.testing.assert_close(featurizer(x), fresh(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inside, fresh(x), rtol=1e-12, atol=1e-12)
    assert fresh.gradients.fallback_modules == featurizer.gradients.fallback_modules


def test_pipeline_features_under_inference_mode_then_run():
    """pipeline.features() inside inference mode, then run(): the same features and record as a fresh pipeline."""
    model = TiedOutside()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 4, generator=g), torch.randint(0, 3, (60,), generator=g)
    used = ln.FidelityPipeline(model, "proj_trntk", {"dim": 64})
    with pytest.warns(UserWarning, match="'inner'"), torch.inference_mode():
        inside = used.features(x[:8].clone())
    fresh = ln.FidelityPipeline(model, "proj_trntk", {"dim": 64})
    with pytest.warns(UserWarning, match="'inner'"):
        torch.testing.assert_close(inside, fresh.features(x[:8]))
    a, b = used.run((x[:40], y[:40]), (x[40:], y[40:])), fresh.run((x[:40], y[:40]), (x[40:], y[40:]))
    torch.testing.assert_close(a.features.reference_features, b.features.reference_features)
    assert a.record.kendall_tau == b.record.kendall_tau


def test_factored_kernel_of_a_model_with_modules_that_never_run():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.hidden, self.spare, self.spare_conv, self.head = nn.Linear(6, 5), nn.Linear(5, 5), nn.Conv1d(2, 2, 3), nn.Linear(5, 3)
            self.spare_embedding, self.spare_norm = nn.Embedding(4, 2), nn.LayerNorm(5)

        def forward(self, x):
            return self.head(torch.tanh(self.hidden(x)))

    model, x, z = Unused().double(), torch.randn(5, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    g_x, g_z = brute_force_gradients(model, x), brute_force_gradients(model, z)
    for kind in ("trntk", "trntk0", "pntk"):
        torch.testing.assert_close(ln.factored_kernel(model, x, z, kind, batch_size=2), brute_force_kernel(g_x, g_z, kind), rtol=1e-9, atol=1e-12)


class FailingBackward(torch.autograd.Function):
    """The identity, whose backward raises ``error`` (when set) on classes batched or on any pass, and
    counts the batched passes it sees."""

    error, batched_only, batched_passes = None, True, 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        batched = torch._C._functorch.is_functorch_wrapped_tensor(grad)
        FailingBackward.batched_passes += batched
        if FailingBackward.error is not None and (batched or not FailingBackward.batched_only):
            raise FailingBackward.error
        return grad


class Through(nn.Module):
    def forward(self, x):
        return FailingBackward.apply(x)


def test_only_a_backward_without_a_batching_rule_turns_class_batching_off():
    """An out-of-memory error runs that group of classes one by one, and the next batch is batched again;
    an error of the backward itself (one class at a time fails too) propagates and leaves batching on."""
    torch.manual_seed(0)
    first, head = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
    model = nn.Sequential(first, Through(), nn.Tanh(), head)
    x, sketch = torch.randn(5, 4, dtype=torch.float64), ln.SketchProjector(16)
    expected = LayerGradients(model, batch_classes=False).project(x, sketch)
    gradients = LayerGradients(model, batch_classes=True)
    FailingBackward.error, FailingBackward.batched_passes = torch.OutOfMemoryError("out of memory"), 0
    try:
        torch.testing.assert_close(gradients.project(x, sketch), expected)
        FailingBackward.error = None
        torch.testing.assert_close(gradients.project(x, sketch), expected)
        assert FailingBackward.batched_passes == 2  # the second batch batched its classes again
        FailingBackward.error, FailingBackward.batched_only = RuntimeError("the backward is broken"), False
        with pytest.raises(RuntimeError, match="the backward is broken"):
            gradients.project(x, sketch)
        FailingBackward.error = None
        torch.testing.assert_close(gradients.project(x, sketch), expected)
        assert FailingBackward.batched_passes == 4
    finally:
        FailingBackward.error, FailingBackward.batched_only = None, True
