"""The library leaves the process as it found it: every setting it changes for a while (the malloc
thresholds, oneDNN's matmul precision, an attention's forward, the plotting backend) is put back, also
after an exception, and nothing it caches outlives the object that needed it."""

import gc
import threading
import weakref

import pytest
import torch
from models import SmallCNN
from torch import nn

import lightning_ntk as ln
from lightning_ntk import dashboards, featurize, kernels
from lightning_ntk.pipeline import CheckpointRecord

CPU = torch.device("cpu")


class RecordingLibc:
    """glibc's malloc settings, each call recorded, then made."""

    def __init__(self, libc):
        self.libc, self.calls = libc, []

    def mallopt(self, *args):
        self.calls.append(("mallopt", *args))
        return self.libc.mallopt(*args)

    def malloc_trim(self, *args):
        self.calls.append(("malloc_trim", *args))
        return self.libc.malloc_trim(*args)


@pytest.fixture
def recorded_libc(monkeypatch):
    if featurize._glibc() is None:
        pytest.skip("the heap is tuned under glibc only")
    libc = RecordingLibc(featurize._glibc())
    monkeypatch.setattr(featurize, "_glibc", lambda: libc)
    for name in featurize._MALLOC_SETTINGS + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(name, raising=False)
    return libc


def test_the_heap_is_retained_until_the_last_scope_of_any_thread_closes(recorded_libc):
    """A scope closing while another thread's is open leaves the thresholds alone; the last one to close
    (here by an exception) puts them back once and hands the free memory back."""
    other_open, first_closed, seen = threading.Event(), threading.Event(), []

    def other_thread():
        with featurize.retained_heap(CPU):
            other_open.set()
            first_closed.wait(60)
            seen.extend([list(recorded_libc.calls), featurize._heap_scope.open])

    thread = threading.Thread(target=other_thread)
    with featurize.retained_heap(CPU):
        thread.start()
        other_open.wait(60)
    first_closed.set()
    thread.join()
    settings = [("mallopt", featurize._M_MMAP_THRESHOLD, featurize._MMAP_CEILING), ("mallopt", featurize._M_TRIM_THRESHOLD, 2**31 - 1)]
    assert seen == [settings, 1]
    assert recorded_libc.calls == settings + [("mallopt", featurize._M_TRIM_THRESHOLD, 2 * featurize._MMAP_CEILING), ("malloc_trim", 0)]
    recorded_libc.calls.clear()
    with pytest.raises(RuntimeError, match="inside"):
        with featurize.retained_heap(CPU):
            raise RuntimeError("inside")
    assert featurize._heap_scope.open == 0 and recorded_libc.calls[-2:] == [("mallopt", featurize._M_TRIM_THRESHOLD, 2 * featurize._MMAP_CEILING), ("malloc_trim", 0)]


def test_malloc_thresholds_set_in_the_environment_are_never_changed(recorded_libc, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    features = featurize.stream_features(SmallCNN(), torch.randn(3, 2, 8, 8), lambda x: x.flatten(1))
    assert features.shape == (3, 128) and recorded_libc.calls == [] and featurize._heap_scope.open == 0


def test_matmul_precision_is_put_back_after_an_exception():
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None:
        pytest.skip("this torch has no oneDNN matmul precision")
    before = matmul.fp32_precision
    with pytest.raises(RuntimeError, match="inside"):
        with kernels._products_in("bfloat16", torch.ones(2)):
            assert matmul.fp32_precision == "bf16"
            raise RuntimeError("inside")
    assert matmul.fp32_precision == before


class FailingAttention(nn.Module):
    """An attention layer, then a forward that fails when told to."""

    def __init__(self, dim=8, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, classes)
        self.fail = False

    def forward(self, x):
        out, _ = self.attention(x, x, x)
        if self.fail:
            raise RuntimeError("the forward pass failed")
        return self.head(out.mean(1))


def test_an_attention_forward_is_its_own_again_after_a_failed_featurization():
    model, x = FailingAttention(), torch.randn(4, 5, 8)
    featurizer = ln.Featurizer(model, projection_dim=16, projector="sketch")
    before = featurizer(x)
    model.fail = True
    with pytest.raises(RuntimeError, match="the forward pass failed"):
        featurizer(x)
    assert "forward" not in vars(model.attention)
    model.fail = False
    torch.testing.assert_close(featurizer(x), before, rtol=0, atol=0)


def test_convolution_patch_indices_live_as_long_as_their_featurizer():
    featurizer = ln.Featurizer(SmallCNN(), projection_dim=16, projector="sketch")
    featurizer(torch.randn(3, 2, 8, 8))
    indices = [weakref.ref(t) for blk in featurizer.gradients.blocks for t in blk.patch_indices.values()]
    assert indices
    del featurizer
    gc.collect()
    assert all(ref() is None for ref in indices)


def test_history_plots_leave_the_plotting_backend_and_pyplot_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import CSVLogger
    from matplotlib import pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        row = CheckpointRecord(0, 10, 0.5, 0.0, 0.9, 0.8, 0.8, 0.5, 0.1, 20, 10, 1.0, 1.0, 1.0, 3, True, False, "p")
        [path] = dashboards.log_history_plots([CSVLogger(tmp_path)], [row])
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)
