"""Bad input to NTKAttributionCallback: one clear error that names the fix, before training where
possible, and what was logged before a failure is kept."""

import csv
import resource

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from conftest import DigitsMLP, fit, small_callback
from torch.utils.data import Dataset

from lightning_ntk import LabelError, NTKAttributionCallback, StoreError, Task
from lightning_ntk.demos import load_digits_tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two contending ones


class FlatOutput(DigitsMLP):
    def forward(self, x):
        return super().forward(x).flatten()  # [B·C] instead of [B, C]

    def training_step(self, batch, batch_idx):
        return super().forward(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        pass


def test_model_that_does_not_return_logits(tmp_path):
    with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\].*module='<its name>'"):
        fit(tmp_path, [small_callback()], model=FlatOutput())


class TwoHalves(DigitsMLP):
    """Takes each digit as two positional inputs, its left and right halves (as a text model takes ids and a mask)."""

    def forward(self, left, right):
        return super().forward(torch.cat([left, right], 1))

    def training_step(self, batch, batch_idx):
        return self.loss(self(batch[0][:, :32], batch[0][:, 32:]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def halves(batch):
    return batch[0][:, :32], batch[0][:, 32:]


def test_a_task_whose_inputs_are_a_tuple_passes_them_as_positional_arguments(tmp_path):
    callback = small_callback(top_k=0, epochs=[], task=Task(inputs=halves))
    fit(tmp_path, [callback], max_epochs=1, model=TwoHalves())
    [row] = callback.history
    assert row.num_query == 60 and -1 <= row.kendall_tau <= 1
    _, _, x, y = load_digits_tensors()
    assert callback.attribute((x[:3], y[:3])).proponent_indices.shape[0] == 3  # a batch as the loaders yield it


def test_a_forward_that_fails_on_the_batch_names_task_and_module(tmp_path):
    with pytest.raises(TypeError, match=r"forward fails on two reference examples called with one Tensor of shape \(2, 64\).*"
                                        r"task=Task\(inputs=.*module='<its name>'"):
        fit(tmp_path, [small_callback()], model=TwoHalves())


class Sentences(Dataset):
    """Raw text the model cannot take: batches of strings."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"text": f"sentence {i}", "label": i % 2}


def test_batches_the_callback_cannot_read(tmp_path):
    with pytest.raises(TypeError, match=r"Cannot read the reference set's batches \(dict\).*task=Task\(inputs="):
        fit(tmp_path, [small_callback(train_data=Sentences())])


def test_batches_without_labels(tmp_path):
    x = load_digits_tensors()[0]
    with pytest.raises(ValueError, match=r"reference set's batches carry no labels.*task=Task\(labels="):
        fit(tmp_path, [small_callback(train_data=torch.utils.data.TensorDataset(x))])


def test_query_labels_outside_the_classes(tmp_path):
    _, _, x_test, y_test = load_digits_tensors()
    with pytest.raises(ValueError, match=r"query set's examples hold labels 5\.\.14, outside the 10 classes.*query_data="):
        fit(tmp_path, [small_callback(query_data=(x_test, y_test + 5))])


def test_unwritable_store(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(StoreError, match=r"is not writable.*store=\{'dir': \.\.\.\}"):
        fit(tmp_path, [small_callback(store={"dir": str(tmp_path / "a_file" / "store")})])


def test_bad_options():
    with pytest.raises(ValueError, match="Unknown kernel 'rbf'"):
        NTKAttributionCallback(kernel="rbf")
    with pytest.raises(ValueError, match="projection_dim must be a positive integer"):
        NTKAttributionCallback(projection={"dim": 0})
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer or None"):
        NTKAttributionCallback(every_n_epochs=0)


class FillTheDiskAfterFirstEpoch(L.Callback):
    """From the second epoch on, no file may grow past 16 KiB: the store's next write hits a full disk."""

    def __init__(self):
        self.limits = resource.getrlimit(resource.RLIMIT_FSIZE)

    def on_train_epoch_end(self, trainer, pl_module):
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, self.limits[1]))

    def restore(self):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.limits)


def test_full_disk_keeps_what_was_logged(tmp_path):
    callback, disk = small_callback(top_k=0), FillTheDiskAfterFirstEpoch()
    try:
        with pytest.raises(StoreError, match=r"disk is full.*store=\{'dir': \.\.\.\}.*projection=\{'dim'"):
            fit(tmp_path, [callback, disk], logger=CSVLogger(tmp_path))
    finally:
        disk.restore()
    assert [row.epoch for row in callback.history] == [0]
    [metrics_file] = (tmp_path / "lightning_logs").glob("version_*/metrics.csv")
    logged = [row for row in csv.DictReader(metrics_file.open()) if row.get("ntk/kendall_tau")]
    assert [float(row["ntk/kendall_tau"]) for row in logged] == [pytest.approx(callback.history[0].kendall_tau)]
    assert not [p for p in (metrics_file.parent / "ntk_store").iterdir() if p.name.startswith(".")]  # no half-written entry left


class NeedsLabels(DigitsMLP):
    """A forward that wants labels as an argument (as some Hugging Face models do)."""

    def forward(self, x, labels):
        return super().forward(x)

    def training_step(self, batch, batch_idx):
        return self.loss(self(*batch), batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def test_a_model_error_that_mentions_labels_names_module_not_data(tmp_path):
    """The hint follows the error's type (LabelError: the data), not the word "labels" in its text."""
    with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'labels'.*module='<its name>'") as info:
        fit(tmp_path, [small_callback()], model=NeedsLabels())
    assert "train_data=/query_data=" not in str(info.value)


def test_refused_labels_are_a_label_error(tmp_path):
    _, _, x_test, y_test = load_digits_tensors()
    with pytest.raises(LabelError, match="query_data="):
        fit(tmp_path, [small_callback(query_data=(x_test, y_test + 5))])
