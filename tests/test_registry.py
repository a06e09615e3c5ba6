"""One kernel vocabulary: every registered name means the same kernel in the callback, the pipeline and
the standalone API; results of the public API never hold on to the network's autograd graph."""

import pytest
import torch
from conftest import DigitsMLP, fit, small_callback, stored_checkpoint
from models import mlp

import lightning_ntk as ln
from lightning_ntk.demos import load_digits_tensors
from lightning_ntk.registry import KERNELS, get_kernel, projected

pytestmark = pytest.mark.usefixtures("one_thread")
SCALAR = [name for name, kernel in KERNELS.items() if kernel.scalar]


def test_names_say_what_the_kernel_is():
    assert get_kernel("Proj-TrNTK") is KERNELS["proj_trntk"]
    assert projected("trntk").name == "proj_trntk" and projected("trntk0").name == "proj_trntk0" and projected("pntk").name == "proj_pntk"
    assert [k.name for k in KERNELS.values() if not k.normalized] == ["proj_trntk0", "trntk0", "entk"]
    with pytest.raises(ValueError, match="Unknown kernel 'rbf'; choose one of proj_trntk, "):
        get_kernel("rbf")
    with pytest.raises(ValueError, match="has no random projection"):
        projected("em")
    with pytest.raises(ValueError, match="'proj_trntk' is a projected kernel"):
        ln.exact_kernel(mlp(), torch.randn(3, 6), kind="proj_trntk")
    with pytest.raises(ValueError, match="C×C block per pair"):
        ln.NTKAttributionCallback(kernel="entk")


@pytest.mark.parametrize("name", SCALAR)
def test_the_callback_computes_the_kernel_its_name_says(tmp_path, name):
    """The kernel behind the callback's surrogate equals the standalone API's kernel of the same name,
    on the trained weights and the same reference examples."""
    callback = small_callback(kernel=name, epochs=[], subsets={"max_train_examples": 40, "max_query_examples": 20}, top_k=0)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    stored = stored_checkpoint(tmp_path, 0)
    x_train = load_digits_tensors()[0][stored["reference_indices"]]
    kernel = get_kernel(name)
    assert stored["reference_features"].dtype == (torch.float16 if kernel.projected else torch.float32)  # store dtype "auto"
    got = ln.kernel_from_features(stored["reference_features"], normalize=kernel.normalized)
    if kernel.projected:
        features = ln.project_features(model, x_train, name, 32, "sketch", seed=0).to(stored["reference_features"].dtype)  # float16 in the store
        want = ln.kernel_from_features(features, normalize=kernel.normalized)
    else:
        want = ln.exact_kernel(model, x_train, kind=name)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert callback.history[0].num_train == 40 and 0 <= callback.history[0].surrogate_acc <= 1


@pytest.mark.parametrize(
    "compute",
    [
        lambda m, x: ln.exact_kernel(m, x, params="2", method="vmap"),
        lambda m, x: ln.exact_kernel(m, x, kind="entk"),
        lambda m, x: ln.gradient_features(m, x, params="4"),
        lambda m, x: ln.project_features(m, x, "proj_trntk", 16, "rademacher", params="4.weight"),
        lambda m, x: ln.project_features(m, x, "proj_trntk", 16, "sketch"),
        lambda m, x: ln.embedding_features(m, x, "ck"),
    ],
    ids=["exact-vmap-params", "entk", "gradients-params", "dense-params", "sketch", "ck"],
)
def test_results_are_detached_from_the_network(compute):
    model = mlp()
    x = torch.randn(5, 6)
    out = compute(model, x)
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    if out.ndim == 2 and out.shape[0] == out.shape[1]:  # a kernel: a surrogate fits on it without touching the network
        ln.fit_from_kernel(out, torch.tensor([0, 1, 2, 0, 1]))
        assert all(p.grad is None for p in model.parameters())


def test_half_precision_storage_reaches_the_store(tmp_path):
    callback = small_callback(epochs=[], top_k=0, store={"dtype": "float16"})
    fit(tmp_path, [callback], max_epochs=1, model=DigitsMLP())
    [folder] = (tmp_path / "ntk_store").glob("epoch=0000-*")
    assert '"dtype": "float16"' in (folder / "manifest.json").read_text()
    assert callback.history[0].surrogate_acc > 0.5
