"""Exact kernels against a brute-force loop of torch.autograd.grad calls, one per example and class."""

import pytest
import torch
from torch import nn
from conftest import brute_force_gradients, brute_force_kernel
from models import DictModel, SmallCNN, dict_inputs, mlp

import lightning_ntk as ln


CASES = {
    "mlp": (lambda: mlp().double(), lambda: torch.randn(7, 6, dtype=torch.float64)),
    "cnn_batchnorm": (lambda: SmallCNN().double(), lambda: torch.randn(6, 2, 7, 7, dtype=torch.float64)),
    "dict_batch": (lambda: DictModel().double(), lambda: dict_inputs()),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["trntk", "trntk0", "pntk", "entk"])
def test_gradient_kernels_match_brute_force(case, kind):
    make_model, make_inputs = CASES[case]
    model, inputs = make_model(), make_inputs()
    model.train()  # the engine must switch BatchNorm to eval itself, and restore the mode
    a = inputs if not isinstance(inputs, torch.Tensor) else inputs[:4]
    b = inputs
    got = ln.exact_kernel(model, a, b, kind=kind, batch_size=3)
    assert model.training and all(m.training for m in model.modules())
    want = brute_force_kernel(brute_force_gradients(model, a), brute_force_gradients(model, b), kind)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-10)


def test_square_kernel_when_second_input_omitted():
    model, x = mlp().double(), torch.randn(5, 6, dtype=torch.float64)
    k = ln.exact_kernel(model, x)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k.diag(), torch.ones(5, dtype=torch.float64))


def test_parameter_subset_by_pattern_and_module():
    model, x = mlp().double(), torch.randn(5, 6, dtype=torch.float64)
    names = ["4.weight", "4.bias"]
    want = brute_force_kernel(*(brute_force_gradients(model, x, names),) * 2, "trntk0")
    torch.testing.assert_close(ln.exact_kernel(model, x, kind="trntk0", params="4.*"), want)
    torch.testing.assert_close(ln.exact_kernel(model, x, kind="trntk0", params=model[4]), want)
    torch.testing.assert_close(ln.exact_kernel(model, x, kind="trntk0", params=["4.weight", "4.bias"]), want)


def test_dataloader_input_equals_tensor_input():
    model, x = mlp().double(), torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    torch.testing.assert_close(ln.exact_kernel(model, loader), ln.exact_kernel(model, x))


def test_dict_batches_with_labels_from_a_dataloader():
    model, inputs = DictModel().double(), dict_inputs()
    rows = [dict({k: v[i] for k, v in inputs.items()}, label=torch.tensor(i % 2)) for i in range(7)]
    loader = torch.utils.data.DataLoader(rows, batch_size=3)
    torch.testing.assert_close(ln.exact_kernel(model, loader, kind="pntk"), ln.exact_kernel(model, inputs, kind="pntk"))


def cosine(h):
    h = h / h.norm(dim=1, keepdim=True)
    return h @ h.T


def test_em_and_ck_match_manual_hooks():
    torch.manual_seed(0)
    model, x = mlp().double(), torch.randn(6, 6, dtype=torch.float64)
    h1 = model[0](x)
    h2 = model[2](model[1](h1))
    penultimate = model[3](h2)
    torch.testing.assert_close(ln.exact_kernel(model, x, kind="ck"), cosine(penultimate))
    torch.testing.assert_close(ln.exact_kernel(model, x, kind="em"), cosine(torch.cat([h1, h2], 1)))
    torch.testing.assert_close(ln.exact_kernel(model, x, kind="em", layers=["1", "4"]), cosine(torch.cat([model[1](h1), model(x)], 1)))


def test_projected_kernel_of_identity_sized_projection_is_close():
    """Sanity link between the exact and projected paths: large K approaches the exact kernel."""
    model, x = mlp().double(), torch.randn(8, 6, dtype=torch.float64)
    exact = ln.exact_kernel(model, x)
    approx = ln.kernel_from_features(ln.project_features(model, x, projection_dim=8192, projector="gaussian"))
    assert (approx - exact).abs().mean() < 0.02


def test_kernel_blocks_cover_the_full_kernel():
    f = torch.randn(10, 3, 5, dtype=torch.float64)
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    full = ln.kernel_from_features(g, f)
    blocks = list(ln.kernel_blocks(g, f, block_size=3))
    assert [b.shape[0] for _, b in blocks] == [3, 1]
    torch.testing.assert_close(torch.cat([b for _, b in blocks]), full)
    torch.testing.assert_close(ln.kernel_from_features(g.numpy(), f.numpy(), block_size=2), full)
    unnorm = ln.kernel_from_features(g, f, normalize=False)
    torch.testing.assert_close(unnorm, g.flatten(1) @ f.flatten(1).T)


def test_kernel_products_in_bfloat16_stay_a_faithful_gram_matrix():
    """With bfloat16 inputs and float32 sums (where the CPU has the units for them), the kernel is the Gram
    matrix of the rounded features: symmetric, positive semi-definite, within 1e-3 of float32's; the
    library's matmul setting is back as it was afterwards, and float32 is float32."""
    from lightning_ntk.projection import has_bfloat16_matrix_units

    torch.manual_seed(0)
    features = torch.randn(300, 10, 64) + torch.randn(10, 64)  # correlated rows, like a network's
    before = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    exact = ln.kernel_from_features(features.double())
    fast = ln.kernel_from_features(features, product_precision="bfloat16")
    rows = ln.kernel_from_features(features[:50], features, product_precision="bfloat16")
    assert getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == before
    torch.testing.assert_close(fast, fast.T, rtol=0, atol=0)
    torch.testing.assert_close(rows, fast[:50], rtol=0, atol=1e-6)
    assert (fast.double() - exact).abs().max() < 1e-3
    assert torch.linalg.eigvalsh(fast.double()).min() > -1e-5
    plain = ln.kernel_from_features(features, product_precision="float32")
    assert (plain.double() - exact).abs().max() < 1e-5
    if has_bfloat16_matrix_units() and before is not None:
        assert (fast - plain).abs().max() > 1e-5  # the rounding shows: the products did run in bfloat16


class SequenceFirstEncoder(nn.Module):
    """Inputs [B, T, 3] run sequence-first ([T, B, E]) through an encoder layer and the head, as with
    batch_first=False; ``flat`` adds a layer that sees batch and positions merged ([B·T, E])."""

    def __init__(self, flat=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)
        self.merged = nn.Linear(8, 8) if flat else None
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.encoder(self.embed(x).transpose(0, 1))
        if self.merged is not None:
            h = self.merged(h.reshape(-1, 8)).view(h.shape)
        return self.head(h).mean(0)


def per_example_outputs(model, x, layers, inputs=False):
    """Each example alone through the model, the chosen layers' outputs (inputs) flattened and joined."""
    modules = dict(model.named_modules())
    rows = []
    for i in range(len(x)):
        seen = []
        handles = [modules[n].register_forward_hook(lambda m, a, o: seen.append(a[0] if inputs else o)) for n in layers]
        with torch.no_grad():
            model(x[i : i + 1])
        for h in handles:
            h.remove()
        rows.append(torch.cat([t.flatten() for t in seen]))
    return torch.stack(rows)


@pytest.mark.parametrize("batch", [4, 3, 1])
def test_em_and_ck_of_sequence_first_layers_match_per_example_outputs(batch):
    """Outputs laid out [T, B, E] are read per example, whether B = T (where a wrong layout still has the
    right shape) or not; the encoder's inner layers and the encoder's own output alike."""
    model = SequenceFirstEncoder().double().eval()
    x = torch.randn(batch, 4, 3, dtype=torch.float64)
    for layers in (["encoder.linear2"], ["embed", "encoder"]):
        got = ln.exact_kernel(model, x, kind="em", layers=layers, batch_size=2)
        torch.testing.assert_close(got, cosine(per_example_outputs(model, x, layers)), rtol=1e-12, atol=1e-12)
    default = ["embed", "encoder.linear1", "encoder.linear2"]  # every Linear but the head (out_proj runs inside the attention)
    torch.testing.assert_close(ln.exact_kernel(model, x, kind="em"), cosine(per_example_outputs(model, x, default)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ln.exact_kernel(model, x, kind="ck"), cosine(per_example_outputs(model, x, ["head"], inputs=True)), rtol=1e-12, atol=1e-12)


def test_em_of_a_layer_without_a_batch_dimension_is_refused():
    model, x = SequenceFirstEncoder(flat=True).double().eval(), torch.randn(4, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"output of layer 'merged' \(\(4, 8\) for one example, \(8, 8\) for two\) does not hold the batch"):
        ln.exact_kernel(model, x, kind="em", layers=["merged"])
