"""Models that torch.func cannot run (recurrent layers, custom autograd Functions) and transformers:
every kernel and feature against a brute-force loop of torch.autograd.grad calls, in float64."""

import dataclasses
import warnings

import pytest
import torch
from conftest import brute_force_gradients, brute_force_kernel, explicit_sketch
from torch import nn

import lightning_ntk as ln
from lightning_ntk.layers import LayerGradients, LayerSignals


class Recurrent(nn.Module):
    """Token embedding, a GRU or LSTM, and a linear head on the last state."""

    def __init__(self, cell, vocab=11, dim=4, hidden=5, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = cell(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(torch.tanh(out[:, -1]))


def assert_parameter_gradients_equal(signals, model, brute_force):
    """Every parameter's per-example, per-class gradient from the signals equals the brute-force ``[N, C, P]``."""
    got = {n: g for sig in signals for n, g in sig.parameter_gradients().items()}
    names, sizes = zip(*[(n, p.numel()) for n, p in model.named_parameters()])
    assert sorted(got) == sorted(names)
    for n, want, p in zip(names, brute_force.split(sizes, dim=-1), model.parameters()):
        torch.testing.assert_close(got[n], want.reshape(*want.shape[:2], *p.shape), rtol=1e-9, atol=1e-12, msg=n)


def tokens(n=5, length=6, seed=1):
    return torch.randint(0, 11, (n, length), generator=torch.Generator().manual_seed(seed))


def brute_force_signals(model, inputs, blocks):
    """Each block's per-example, per-class gradients from the brute-force loop, in the block's layout
    (weight columns then the bias column for linear layers), as ``flat`` signals with the block's shape;
    a tied weight's whole gradient in its first use (whose hash the others share), zeros in the others."""
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    grads = dict(zip(names, brute_force_gradients(model, inputs).split(sizes, dim=-1)))
    signals, seen = [], set()
    for blk in blocks:
        parts = [grads[n] if n not in seen else torch.zeros_like(grads[n]) for n in blk.params]  # a tied weight's once
        seen.update(blk.params)
        if blk.kind == "outer":  # weight columns, then the bias column
            b, c = parts[0].shape[:2]
            with_bias = blk.params[-1].endswith("bias")
            if blk.params[0].endswith("weight"):
                inputs = blk.cols - with_bias
                weight = parts[0].reshape(b, c, *((inputs, blk.rows) if blk.transposed else (blk.rows, inputs)))
                parts[0] = weight.transpose(-1, -2) if blk.transposed else weight
            if with_bias:
                parts[-1] = parts[-1].reshape(b, c, blk.rows, 1)
            g = torch.cat(parts, -1)
        else:
            g = torch.cat(parts, -1)
        signals.append(LayerSignals(dataclasses.replace(blk, kind="flat"), None, g.reshape(*g.shape[:2], -1).transpose(0, 1)))
    return signals


RECURRENT = {"gru": nn.GRU, "lstm": nn.LSTM}


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
@pytest.mark.parametrize("cell", RECURRENT)
def test_recurrent_exact_kernels_fall_back_to_a_loop(cell):
    model, x, y = Recurrent(RECURRENT[cell]).double(), tokens(), tokens(3, seed=2)
    for method in ("factored", "vmap"):
        with pytest.warns(UserWarning, match=r"torch.func \(vmap/jacrev\) cannot run module 'rnn'"):
            got = ln.exact_kernel(model, x, y, kind="trntk", method=method, batch_size=3)
        want = brute_force_kernel(brute_force_gradients(model, x), brute_force_gradients(model, y), "trntk")
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    with pytest.warns(UserWarning, match="cannot run module 'rnn'"):
        pntk = ln.exact_kernel(model, x, kind="pntk", method="vmap")
    g = brute_force_gradients(model, x)
    torch.testing.assert_close(pntk, brute_force_kernel(g, g, "pntk"), rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Per-example gradients of module")
@pytest.mark.parametrize("cell", RECURRENT)
def test_recurrent_projected_features_fall_back_to_a_loop(cell):
    model, x = Recurrent(RECURRENT[cell]).double(), tokens()
    g = brute_force_gradients(model, x)
    with pytest.warns(UserWarning, match="cannot run module 'rnn'"):
        dense = ln.project_features(model, x, projection_dim=24, projector="rademacher", seed=4, batch_size=3)
    projector = ln.RandomProjector(g.shape[-1], 24, "rademacher", seed=4)
    torch.testing.assert_close(dense, projector.project(g), rtol=1e-9, atol=1e-12)

    featurizer = ln.Featurizer(model, projection_dim=24, projector="sketch", seed=4)
    with pytest.warns(UserWarning, match="cannot run module 'rnn'"):
        sketch = featurizer(x, batch_size=3)
    assert featurizer.gradients.fallback_modules == ["rnn"]
    want = explicit_sketch(brute_force_signals(model, x, featurizer.gradients.all_blocks), featurizer.projector)
    torch.testing.assert_close(sketch, want, rtol=1e-9, atol=1e-12)


class Cube(torch.autograd.Function):
    """A custom autograd Function without a vmap rule: torch.func refuses it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.outer(Cube.apply(self.inner(x)))


def test_custom_autograd_function_falls_back_to_a_loop():
    model, x = CubeNet().double(), torch.randn(4, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot run module '<model>'"):
        got = ln.exact_kernel(model, x, kind="trntk0", method="vmap")
    g = brute_force_gradients(model, x)
    torch.testing.assert_close(got, brute_force_kernel(g, g, "trntk0"), rtol=1e-9, atol=1e-12)


class Unrunnable(nn.Module):
    """Fails under torch.func and under autograd alike."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return torch.from_numpy(self.fc(x).numpy())  # refused under vmap, and where it requires grad


def test_what_no_path_can_compute_names_the_cause():
    model, x = Unrunnable().double(), torch.randn(3, 3, dtype=torch.float64)
    with pytest.warns(UserWarning), pytest.raises(ln.FunctionalForwardError, match=r"one example alone fails in module '<model>' \(Unrunnable\)"):
        ln.exact_kernel(model, x, kind="trntk", method="vmap")


transformers = pytest.importorskip("transformers")


class Logits(nn.Module):
    """A Hugging Face classifier returning its logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def small_bert(seed=0, vocab=20, hidden=8, classes=3):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
        max_position_embeddings=16, num_labels=classes,
    )
    return Logits(transformers.BertForSequenceClassification(config)).double()


def small_gpt2(seed=0, vocab=20, hidden=8, classes=3):
    """GPT-2's layers are Hugging Face ``Conv1D``s: linear layers with transposed weights."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=2, n_positions=16, num_labels=classes, pad_token_id=0)
    return Logits(transformers.GPT2ForSequenceClassification(config)).double()


TRANSFORMERS = {"bert": (small_bert, "model.bert.embeddings.position_embeddings"), "gpt2": (small_gpt2, "model.transformer.wpe")}


def padded_tokens(n=4, length=6, seed=1, vocab=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = (torch.arange(length)[None] < torch.randint(2, length + 1, (n,), generator=g)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_takes_the_structured_path_with_exact_kernels(name, recwarn):
    make_model, positions = TRANSFORMERS[name]
    model, x, y = make_model(), padded_tokens(), padded_tokens(3, seed=2)
    gradients = LayerGradients(model)
    signals = gradients(x)
    assert not gradients.fallback_modules and gradients._flat is None
    assert positions in {blk.name for blk in gradients.blocks}  # position ids are one row for the batch
    assert not [w for w in recwarn if "Per-example gradients" in str(w.message)]
    g_x, g_y = brute_force_gradients(model, x), brute_force_gradients(model, y)
    assert_parameter_gradients_equal(signals, model, g_x)
    for kind in ("trntk", "trntk0", "pntk"):
        want = brute_force_kernel(g_x, g_y, kind)
        torch.testing.assert_close(ln.factored_kernel(model, x, y, kind, batch_size=3), want, rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func may not run the attention mask's data-dependent checks
        vmapped = ln.exact_kernel(model, x, y, kind="trntk", method="vmap")
    torch.testing.assert_close(vmapped, brute_force_kernel(g_x, g_y, "trntk"), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_sketch_is_the_sketch_of_the_brute_force_gradients(name):
    model, x = TRANSFORMERS[name][0](), padded_tokens()
    featurizer = ln.Featurizer(model, projection_dim=64, projector="sketch", seed=5)
    features = featurizer(x, batch_size=3)
    want = explicit_sketch(brute_force_signals(model, x, featurizer.gradients.all_blocks), featurizer.projector)
    torch.testing.assert_close(features, want, rtol=1e-9, atol=1e-12)


class TiedClassifier(nn.Module):
    """Token embeddings tied to the output layer, as in language models (classes = tokens), plus a
    linear layer in between that may hold a bias."""

    def __init__(self, vocab=11, dim=4, head_bias=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=head_bias)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens)).mean(1)))


def test_tied_weights_stay_structured_and_add_up(recwarn):
    model, x, y = TiedClassifier().double(), tokens(5, 4), tokens(3, 4, seed=2)
    gradients = LayerGradients(model)
    signals = gradients(x)
    assert not gradients.fallback_modules and [blk.name for blk in gradients.blocks] == ["embed", "mix", "head"]
    assert not [w for w in recwarn if "Per-example gradients" in str(w.message)]
    g_x, g_y = brute_force_gradients(model, x), brute_force_gradients(model, y)
    tied = sum(sig.parameter_gradients()["embed.weight"] for sig in signals if sig.block.params == ("embed.weight",))
    torch.testing.assert_close(tied.flatten(2), g_x[..., : 11 * 4], rtol=1e-9, atol=1e-12)
    for kind in ("trntk", "trntk0", "pntk"):
        torch.testing.assert_close(ln.factored_kernel(model, x, y, kind), brute_force_kernel(g_x, g_y, kind), rtol=1e-9, atol=1e-12)
    featurizer = ln.Featurizer(model, projection_dim=32, projector="sketch", seed=3)
    want = explicit_sketch(brute_force_signals(model, x, featurizer.gradients.all_blocks), featurizer.projector)
    torch.testing.assert_close(featurizer(x), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(featurizer.projector.project(signals), want, rtol=1e-9, atol=1e-12)


def test_tied_weights_laid_out_differently_fall_back_together():
    model, x = TiedClassifier(head_bias=True).double(), tokens(5, 4)
    with pytest.warns(UserWarning, match=r"'embed', 'head'"):
        gradients = LayerGradients(model)
    assert [blk.name for blk in gradients.blocks] == ["mix"]
    g = brute_force_gradients(model, x)
    torch.testing.assert_close(ln.factored_kernel(model, x), brute_force_kernel(g, g, "trntk"), rtol=1e-9, atol=1e-12)


class Attention(nn.Module):
    """torch's own attention layers: a TransformerEncoderLayer (batch first, padding mask) and a
    sequence-first cross-attention to a shorter memory, then a linear head."""

    def __init__(self, vocab=11, dim=8, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, 2)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens), src_key_padding_mask=tokens == 0)
        memory = h[:, :3].transpose(0, 1)
        out, _ = self.cross(h.transpose(0, 1), memory, memory)
        return self.head(out.mean(0))


def test_multihead_attention_takes_the_structured_path(recwarn):
    x = tokens(5, 6)
    x[:2, -2:] = 0  # padding
    y = tokens(3, 6, seed=2)
    model = Attention().double()
    gradients = LayerGradients(model)
    signals = gradients(x)
    assert not gradients.fallback_modules
    assert {"encoder.self_attn", "encoder.self_attn.out_proj", "cross", "cross.out_proj"} <= {blk.name for blk in gradients.blocks}
    assert not [w for w in recwarn if "Per-example gradients" in str(w.message)]
    g_x, g_y = brute_force_gradients(model, x), brute_force_gradients(model, y)
    assert_parameter_gradients_equal(signals, model, g_x)
    for kind in ("trntk", "pntk"):
        torch.testing.assert_close(ln.factored_kernel(model, x, y, kind, batch_size=3), brute_force_kernel(g_x, g_y, kind), rtol=1e-9, atol=1e-12)
    featurizer = ln.Featurizer(model, projection_dim=64, projector="sketch", seed=5)
    want = explicit_sketch(brute_force_signals(model, x, featurizer.gradients.all_blocks), featurizer.projector)
    torch.testing.assert_close(featurizer(x, batch_size=3), want, rtol=1e-9, atol=1e-12)
    assert "forward" not in vars(model.cross)  # the attention's own forward is back
