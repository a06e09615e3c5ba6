"""Every bad input of the kernel engine gets a clear error that says how to fix it."""

import pytest
import torch
from models import mlp
from conftest import brute_force_gradients
from torch import nn

import lightning_ntk as ln


def test_output_that_is_not_logits():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0))  # returns [B*3]
    with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\]"):
        ln.project_features(model, torch.randn(5, 4), projection_dim=8, projector="rademacher")
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        ln.exact_kernel(model, torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        ln.exact_kernel(model, torch.randn(5, 4), kind="ck")


def test_output_without_logits_names_where_to_find_them():
    class ReturnsDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return {"scores": self.lin(x)}

    with pytest.raises(TypeError, match=r"dict with keys \['scores'\], with no logits at 'logits'.*Task\(output="):
        ln.exact_kernel(ReturnsDict(), torch.randn(3, 4))


@pytest.mark.parametrize("k", [0, -5, 2.5])
def test_bad_projection_dim(k):
    with pytest.raises(ValueError, match="projection_dim must be a positive integer"):
        ln.project_features(mlp(), torch.randn(3, 6), projection_dim=k, projector="rademacher")


def test_parameter_selection_matching_nothing():
    with pytest.raises(ValueError, match="matches no parameter.*Parameter names look like: 0.weight"):
        ln.exact_kernel(mlp(), torch.randn(3, 6), params="encoder.*")
    with pytest.raises(ValueError, match="not part of the model"):
        ln.exact_kernel(mlp(), torch.randn(3, 6), params=nn.Linear(2, 2))


def test_non_finite_gradient_names_the_parameter():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ln.NonFiniteGradientError, match="parameter '(0|2|4)\\.(weight|bias)'"):
        ln.project_features(model, torch.randn(3, 6), projection_dim=8, projector="rademacher")


def test_empty_data():
    with pytest.raises(ValueError, match="holds no examples"):
        ln.project_features(mlp(), torch.randn(0, 6), projection_dim=8, projector="rademacher")
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(0, 6), torch.zeros(0)), batch_size=4)
    with pytest.raises(ValueError, match="holds no examples"):
        ln.exact_kernel(mlp(), empty)


def test_forward_that_fails_under_torch_func_falls_back_to_a_loop_and_names_the_module():
    class ItemCall(nn.Module):
        def forward(self, h):
            return h * float(h.sum().item() > 0)  # .item() cannot run under vmap

    model = nn.Sequential(nn.Linear(4, 5), ItemCall(), nn.Linear(5, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"cannot run module '1' \(ItemCall\).*loop of torch.autograd.grad"):
        got = ln.gradient_features(model, x)
    torch.testing.assert_close(got, brute_force_gradients(model, x))


class ItemInTopLevelForward(nn.Module):
    """A data-dependent ``.item()`` in the model's own forward, after its submodules have run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))

    def forward(self, x):
        return self.net(x) * float(x.sum().item() > -1e9)


def test_the_fallback_warning_names_the_module_whose_forward_breaks_torch_func():
    """The top-level model, not the last submodule that ran before it (the locating hooks leave outputs alone)."""
    model, x = ItemInTopLevelForward().double(), torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"cannot run module '<model>' \(ItemInTopLevelForward\)") as caught:
        got = ln.gradient_features(model, x)
    assert not [w for w in caught if "ReLU" in str(w.message)]
    torch.testing.assert_close(got, brute_force_gradients(model, x))


def test_batch_norm_without_running_statistics_is_refused_alike_on_every_path():
    """The sketch, the dense projection and the exact kernels (vmap and factored) give one message that names
    the layer and the fix, before any forward pass."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    calls = [
        lambda: ln.project_features(model, x, projection_dim=8, projector="sketch"),
        lambda: ln.project_features(model, x, projection_dim=8, projector="rademacher"),
        lambda: ln.gradient_features(model, x),
        lambda: ln.exact_kernel(model, x, kind="trntk"),
    ]
    messages = set()
    for call in calls:
        with pytest.raises(ln.FunctionalForwardError, match=r"module '1' \(BatchNorm1d\).*track_running_stats=True") as caught:
            call()
        messages.add(str(caught.value))
    assert len(messages) == 1


def test_tuple_inputs_call_the_model_with_positional_arguments_on_every_path():
    """A tuple of tensors is one batch of positional inputs (not a list of batches): every path gives the
    features of the same inputs passed as keyword arguments, and the pipeline attributes them."""
    from models import DictModel, dict_inputs

    model, x = DictModel(), dict_inputs(8)
    x["extra"] = x["extra"].float()
    positional = (x["tokens"], x["extra"])
    for projector in ("sketch", "rademacher"):
        torch.testing.assert_close(ln.project_features(model, positional, projection_dim=16, projector=projector),
                                   ln.project_features(model, x, projection_dim=16, projector=projector))
    torch.testing.assert_close(ln.gradient_features(model, positional), ln.gradient_features(model, x))
    torch.testing.assert_close(ln.exact_kernel(model, positional), ln.exact_kernel(model, x))

    y = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(0))
    examples = [({k: v[i] for k, v in x.items()}, y[i]) for i in range(8)]
    task = ln.Task(inputs=lambda batch: (batch[0]["tokens"], batch[0]["extra"]))
    as_tuple, as_dict = ln.FidelityPipeline(model, "proj_trntk", {"dim": 16}, task=task), ln.FidelityPipeline(model, "proj_trntk", {"dim": 16})
    checkpoint = as_tuple.run(examples, examples)
    torch.testing.assert_close(checkpoint.features.query_features, as_dict.run(examples, examples).features.query_features)
    assert as_tuple.attribute(checkpoint, positional, top_k=2).proponent_indices.shape == (8, 2)


def test_unsupported_batch_type():
    with pytest.raises(TypeError, match="Task\\(inputs="):
        ln.exact_kernel(mlp(), [object(), object()])


def test_unknown_kind_and_projector():
    with pytest.raises(ValueError, match="Unknown kernel .rbf.; choose one of proj_trntk"):
        ln.exact_kernel(mlp(), torch.randn(3, 6), kind="rbf")
    with pytest.raises(ValueError, match="Unknown projector"):
        ln.project_features(mlp(), torch.randn(3, 6), projector="sparse")


def test_pipeline_takes_keyword_inputs_and_numpy_as_an_inputs_labels_pair():
    """(dict of tensors, labels) runs as the same examples given as a dataset; numpy pairs as tensor pairs;
    anything else given as a pair is refused with the accepted forms named."""
    from models import DictModel, dict_inputs

    model, x = DictModel(), dict_inputs(40)
    x["extra"] = x["extra"].float()
    y = torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(0))
    examples = [({k: v[i] for k, v in x.items()}, y[i]) for i in range(40)]
    pipeline = ln.FidelityPipeline(model, "proj_trntk", {"dim": 32})
    paired, listed = pipeline.run((x, y), (x, y)), pipeline.run(examples, examples)
    torch.testing.assert_close(paired.features.reference_features, listed.features.reference_features)
    assert paired.record.kendall_tau == listed.record.kendall_tau and paired.record.num_train == 40

    plain = ln.FidelityPipeline(mlp(), "proj_trntk", {"dim": 32})
    inputs, labels = torch.randn(30, 6), torch.randint(0, 3, (30,))
    from_numpy = plain.run((inputs.numpy(), labels.numpy()), (inputs.numpy(), labels.numpy()))
    torch.testing.assert_close(from_numpy.features.query_features, plain.run((inputs, labels), (inputs, labels)).features.query_features)
    with pytest.raises(TypeError, match=r"reference set given as a pair must be \(inputs, labels\).*got \(list, Tensor\)"):
        plain.run((inputs.tolist(), labels), (inputs, labels))
    with pytest.raises(ValueError, match=r"different numbers of examples \(\[29, 30\]\)"):
        plain.run((inputs, labels[:29]), (inputs, labels))


def test_pipeline_refuses_empty_subsets_and_batches_before_any_work():
    """max_train_examples=0 and batch_size=0 are refused by name (they failed deep inside torch.cat / at run time)."""
    with pytest.raises(ValueError, match="batch_size must be an integer ≥ 1, got 0"):
        ln.FidelityPipeline(mlp(), "proj_trntk", {"dim": 32}, batch_size=0)
    pipeline = ln.FidelityPipeline(mlp(), "proj_trntk", {"dim": 32})
    inputs, labels = torch.randn(30, 6), torch.randint(0, 3, (30,))
    with pytest.raises(ValueError, match="max_train_examples must be an integer ≥ 1 or None, got 0"):
        pipeline.run((inputs, labels), (inputs, labels), max_train_examples=0)
    with pytest.raises(ValueError, match="max_query_examples must be an integer ≥ 1 or None, got -1"):
        pipeline.run((inputs, labels), (inputs, labels), max_query_examples=-1)


def test_float16_store_keeps_features_beyond_its_range_in_bfloat16(tmp_path):
    """Unnormalised features above 65,504 overflowed to inf in a float16 store and the fit then blamed a zero
    gradient: they are kept in bfloat16 with a warning naming the array, and the checkpoint is finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    inputs, labels = 1e6 * torch.randn(30, 6, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 3
    pipeline = ln.FidelityPipeline(model, "trntk0", storage_dtype=torch.float16)
    with pytest.warns(UserWarning, match=r"reference_features reach .* beyond the range of float16 .* kept in bfloat16"):
        checkpoint = pipeline.run((inputs, labels), (inputs, labels), store=ln.FeatureStore(tmp_path))
    assert checkpoint.features.reference_features.dtype == torch.bfloat16
    assert torch.isfinite(torch.as_tensor(checkpoint.features.reference_features).float()).all()
    assert torch.isfinite(checkpoint.surrogate_logits).all()


def test_attributing_with_a_checkpoint_after_the_network_moved_on():
    """Refused, with the fix named, unless the checkpoint keeps its weights: then they are loaded for the
    attribution and the network's own weights put back bit for bit."""
    model = mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    pipeline = ln.FidelityPipeline(model, "proj_trntk", {"dim": 32})
    checkpoint = pipeline.run((x[:40], y[:40]), (x[40:], y[40:]))
    before = pipeline.attribute(checkpoint, x[40:45], top_k=3)
    kept = pipeline.keep_weights(checkpoint)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="model changed since the surrogate was fitted.*keep_weights"):
        pipeline.attribute(checkpoint, x[40:45])
    after = pipeline.attribute(kept, x[40:45], top_k=3)
    assert torch.equal(after.proponent_indices, before.proponent_indices)
    torch.testing.assert_close(after.proponent_scores, before.proponent_scores)
    assert all(torch.equal(v, moved[k]) for k, v in model.state_dict().items())


class SaysLogitsUnderVmap(nn.Module):
    """Fails under torch.func with a ValueError that mentions logits but is no fault of the logits (a bare
    parameter, which no structured layer covers, sends it to torch.func)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.fail = True

    def forward(self, x):
        if self.fail and torch._C._functorch.is_functorch_wrapped_tensor(x):
            raise ValueError("cannot scale the logits of a batched tensor")
        return x @ self.weight


def test_an_error_that_mentions_logits_is_routed_by_its_type():
    """Only a LogitsError skips the loop of autograd calls; another ValueError falls back to it."""
    model, x = SaysLogitsUnderVmap(), torch.randn(3, 4)
    with pytest.warns(UserWarning, match="loop of torch.autograd.grad"):
        got = ln.exact_kernel(model, x, method="vmap")
    model.fail = False
    torch.testing.assert_close(got, ln.exact_kernel(model, x, method="vmap"))
    with pytest.raises(ln.LogitsShapeError):
        ln.exact_kernel(nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)), x, method="vmap")
