"""NTKAttributionCallback in real Lightning runs on digits: what it logs (W&B offline, CSV), that it
is checked against independent computations, that it leaves training untouched, and that it resumes."""

import csv
import math

import lightning as L
import numpy as np
import pytest
import scipy.stats
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from wandb_offline import find_runs, read_run

import lightning_ntk as ln
from conftest import DigitsMLP, fit, small_callback, stored_checkpoint
from lightning_ntk.demos import DigitsDataModule, load_digits_tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two contending ones


def true_class_probabilities(logits, labels):
    p = torch.softmax(logits.double(), 1).gather(1, labels[:, None])[:, 0]
    return p


def test_end_to_end_with_wandb_offline(tmp_path, wandb_dir):
    callback = small_callback(epochs=[0], every_n_epochs=2)  # epochs 0 and 1, then fit end (2); images: DigitsDataModule.image_shape
    wandb_logger = WandbLogger(project="ntk-test", save_dir=str(wandb_dir))
    trainer, model = fit(tmp_path, [callback], logger=[wandb_logger, CSVLogger(tmp_path)])
    history = callback.history
    assert [row.epoch for row in history] == [0, 1, 2]
    assert [row.step for row in history] == [21, 42, 63]

    # The last row, recomputed independently from the data, the final model and the stored features.
    data = DigitsDataModule()
    data.setup()
    stored = stored_checkpoint(wandb_dir, 2)  # by default the store lives in the first logger's folder
    assert torch.equal(stored["reference_indices"], stored_checkpoint(wandb_dir, 0)["reference_indices"])  # same subset every time
    x_train, y_train = (t[stored["reference_indices"]] for t in data.train_set.tensors)
    x_query, y_query = (t[stored["query_indices"]] for t in data.val_set.tensors)
    assert len(x_train) == 120 and len(x_query) == 60
    assert torch.equal(stored["reference_labels"], y_train) and torch.equal(stored["query_labels"], y_query)
    features = ln.project_features(model, x_train, "proj_trntk", projection_dim=32, projector="sketch", seed=0)
    assert stored["reference_features"].dtype == torch.float16  # the store's default for projected kernels
    torch.testing.assert_close(stored["reference_features"], features.half(), rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():
        network_logits = model(x_query)
    torch.testing.assert_close(stored["query_logits"], network_logits)
    # the callback's default projection multiplies its kernels as product_precision="auto" says
    query_rows = ln.kernel_from_features(stored["query_features"], stored["reference_features"], product_precision="auto")
    surrogate_logits = callback.surrogate.predict(query_rows)
    network_acc = (network_logits.argmax(1) == y_query).double().mean().item()
    surrogate_acc = (surrogate_logits.argmax(1) == y_query).double().mean().item()
    row = history[-1]
    assert row.network_acc == pytest.approx(network_acc) and row.surrogate_acc == pytest.approx(surrogate_acc)
    assert row.tad == pytest.approx(surrogate_acc - network_acc)
    assert row.agreement == pytest.approx((network_logits.argmax(1) == surrogate_logits.argmax(1)).double().mean().item())
    p_net, p_sur = true_class_probabilities(network_logits, y_query), true_class_probabilities(surrogate_logits, y_query)
    keep = (p_net > 0) & (p_net < 1)
    assert row.kendall_tau == pytest.approx(scipy.stats.kendalltau(p_net[keep], p_sur[keep]).statistic, abs=1e-9)
    assert row.kendall_tau > 0.1 and row.surrogate_acc > 0.5  # far above chance (0.1) even at K = 32
    assert row.featurize_seconds > 0 and row.store_reused is False

    # The offline W&B run holds one row per checkpoint, on an epoch axis, with tables and plots.
    wandb_logger.experiment.finish()
    [run_dir] = find_runs(wandb_dir)
    run = read_run(run_dir)
    for key in ("ntk/kendall_tau", "ntk/tad"):
        rows = run.rows(key)
        assert [r["epoch"] for r in rows] == [0, 1, 2]
        assert [r[key] for r in rows] == pytest.approx([getattr(h, key.split("/")[1]) for h in history])
    assert {"glob_name": "ntk/*", "step_metric": "epoch", "options": {"step_sync": True, "defined": True}} in run.metrics
    tables = run.rows("ntk/attributions")
    assert [r["epoch"] for r in tables] == [0, 1, 2]
    table = run.media(tables[-1]["ntk/attributions"]["path"])
    assert table["columns"][:5] == ["query_index", "input", "label", "network_prediction", "surrogate_prediction"]
    assert {"proponent_indices", "proponent_3", "proponent_3_score", "opponent_indices", "opponent_1_score"} <= set(table["columns"])
    assert len(table["data"]) == 4
    assert [line[1] for line in table["data"]] == ["Image"] * 4  # the digits as pictures (W&B's cell for an image), not 64 numbers
    # Its proponents are the training examples whose removal would most lower the margin of the class the network
    # predicted, averaged over the three checkpoints (the default ensemble keeps up to four), each checkpoint's
    # surrogate refitted here from its stored features.
    arrays = [stored_checkpoint(wandb_dir, epoch) for epoch in (0, 1, 2)]
    surrogates = [refit(a) for a in arrays]
    explained = network_logits[:4].argmax(1)
    scores = torch.stack([
        ln.attribute(s, query_kernel=ln.kernel_from_features(a["query_features"][:4], a["reference_features"], product_precision="auto"),
                     target=explained, return_scores=True).scores
        for s, a in zip(surrogates, arrays)
    ]).mean(0)
    columns = {name: i for i, name in enumerate(table["columns"])}
    for r, line in enumerate(table["data"]):
        assert line[columns["query_index"]] == int(stored["query_indices"][r])
        top = scores[r].topk(3)
        assert line[columns["proponent_indices"]] == ", ".join(str(int(stored["reference_indices"][j])) for j in top.indices)
        assert [line[columns[f"proponent_{k}_score"]] for k in (1, 2, 3)] == pytest.approx(top.values.tolist(), rel=1e-3)
        assert line[columns["explained_class"]] == int(explained[r]) == line[columns["network_prediction"]]
        assert line[columns["surrogate_prediction"]] == int(surrogate_logits[r].argmax())
        assert line[columns["method"]] == "influence over 3 checkpoint(s)"
    suspicious = run.media(run.rows("ntk/suspicious")[-1]["ntk/suspicious"]["path"])
    losses = torch.nn.functional.cross_entropy(surrogates[-1].predict(ln.kernel_from_features(stored["reference_features"], product_precision="auto")).double(),
                                               stored["reference_labels"], reduction="none")
    assert suspicious["columns"] == ["train_index", "input", "label", "surrogate_loss"] and len(suspicious["data"]) == 4
    assert [line[0] for line in suspicious["data"]] == stored["reference_indices"][losses.topk(4).indices].tolist()
    assert [line[3] for line in suspicious["data"]] == pytest.approx(losses.topk(4).values.tolist(), rel=1e-3)
    assert len(run.rows("ntk/probability_scatter_table")) == 3 and len(run.rows("ntk/fidelity_history_table")) == 3
    charts = run.config["_wandb"]["visualize"]
    assert charts["ntk/probability_scatter"]["panel_config"]["panelDefId"] == "wandb/scatter/v0"
    assert charts["ntk/fidelity_history"]["panel_config"]["panelDefId"] == "wandb/lineseries/v0"

    # The CSV logger got the same scalars against the epoch.
    [metrics_file] = (tmp_path / "lightning_logs").glob("version_*/metrics.csv")
    csv_rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("ntk/kendall_tau")]
    assert [int(float(r["epoch"])) for r in csv_rows] == [0, 1, 2]
    assert [float(r["ntk/kendall_tau"]) for r in csv_rows] == pytest.approx([getattr(h, "kendall_tau") for h in history])
    picture = metrics_file.parent / "ntk_fidelity_history.png"  # loggers without media get the history plot as a PNG
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 5000

    # Attribution queries after training, also from inference-mode tensors, index the training dataset: each kept
    # checkpoint's network (its kept weights) featurizes the batch, and the scores are averaged.
    x_batch, y_batch = data.val_set.tensors[0][:5], data.val_set.tensors[1][:5]
    result = callback.attribute((x_batch, y_batch), top_k=3)
    with torch.no_grad():
        explained = model(x_batch).argmax(1)
    scores = []
    for kept, s, a in zip(callback._kept, surrogates, arrays):
        snapshot = DigitsMLP()
        snapshot.load_state_dict(kept.weights)
        rows = ln.kernel_from_features(ln.project_features(snapshot, x_batch, "proj_trntk", projection_dim=32, projector="sketch", seed=0), a["reference_features"])
        scores.append(ln.attribute(s, query_kernel=rows, target=explained, return_scores=True).scores)
    expected = stored["reference_indices"][torch.stack(scores).mean(0).topk(3, dim=1).indices]
    assert torch.equal(result.target, explained) and torch.equal(result.proponent_indices, expected)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trainer.model.state_dict().values()))  # weights put back
    with torch.inference_mode():
        again = callback.attribute((x_batch.clone(), y_batch.clone()), top_k=3)
    assert torch.equal(again.proponent_indices, expected)
    torch.testing.assert_close(again.proponent_scores, result.proponent_scores)
    # The representer method ranks the latest surrogate's logit contributions W[c, j]·κ(x, x_j).
    rows = ln.kernel_from_features(ln.project_features(model, x_batch, "proj_trntk", projection_dim=32, projector="sketch", seed=0), stored["reference_features"])
    contributions = callback.surrogate.weight.detach()[explained] * rows
    representer = callback.attribute((x_batch, y_batch), top_k=3, method="representer")
    assert torch.equal(representer.proponent_indices, stored["reference_indices"][contributions.topk(3, dim=1).indices])


def refit(arrays):
    """A checkpoint's surrogate, fitted again from its stored features as the callback fits it."""
    kernel = ln.kernel_from_features(arrays["reference_features"], product_precision="auto")
    return ln.fit_from_kernel(kernel, arrays["reference_labels"])


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    _, plain = fit(tmp_path / "plain")
    callback = small_callback(every_n_epochs=1, top_k=0)
    trainer, tracked = fit(tmp_path / "tracked", [callback])
    assert len(callback.history) == 3
    for (name, a), b in zip(plain.state_dict().items(), tracked.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), tracked.parameters()):
        assert a.requires_grad == b.requires_grad
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    assert tracked.training == plain.training and [m.training for m in tracked.modules()] == [m.training for m in plain.modules()]


def test_resume_continues_the_history_and_a_rerun_reuses_the_store(tmp_path):
    first = small_callback(top_k=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [first, checkpoints], max_epochs=2, enable_checkpointing=True)
    assert [row.epoch for row in first.history] == [0, 1]

    resumed = small_callback(top_k=0)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, callbacks=[resumed], default_root_dir=tmp_path,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [row.epoch for row in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == first.history

    # The same run again finds every checkpoint's features in the store and reuses them.
    again = small_callback(top_k=0)
    fit(tmp_path, [again], max_epochs=2)
    assert [row.store_reused for row in again.history] == [True, True]
    for new, old in zip(again.history, first.history):
        assert new.featurize_seconds == 0
        assert {k: getattr(new, k) for k in ("kendall_tau", "tad", "agreement", "parameters")} == {k: getattr(old, k) for k in ("kendall_tau", "tad", "agreement", "parameters")}
    # store={"overwrite": True} computes them again.
    overwritten = small_callback(top_k=0, store={"overwrite": True})
    fit(tmp_path, [overwritten], max_epochs=1)
    assert overwritten.history[0].store_reused is False


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", np.float16), ("64-true", np.float64)])  # float16 by default, but float64 models
def test_precision_settings(tmp_path, precision, dtype):
    callback = small_callback(top_k=0, epochs=[])
    fit(tmp_path, [callback], max_epochs=1, precision=precision)
    assert [row.epoch for row in callback.history] == [0]
    assert stored_checkpoint(tmp_path, 0)["reference_features"].numpy().dtype == dtype
    assert math.isfinite(callback.history[0].kendall_tau)


def test_streamed_surrogate_when_the_kernel_exceeds_the_memory_budget(tmp_path):
    in_memory = small_callback(top_k=0, epochs=[])
    streamed = small_callback(top_k=0, epochs=[], memory_budget=120 * 120 * 4 - 1, store={"dir": str(tmp_path / "streamed")}, name="streamed")
    fit(tmp_path, [in_memory, streamed], max_epochs=1)
    # the streamed fit reads the stored features in blocks: the surrogate holds no copy of them
    assert streamed.surrogate.feature_rows is not None and streamed.surrogate.train_features is None
    assert in_memory.surrogate.feature_rows is None
    assert streamed.history[0].surrogate_acc == pytest.approx(in_memory.history[0].surrogate_acc, abs=0.05)
    assert streamed.history[0].network_acc == in_memory.history[0].network_acc


class BinaryDigitsMLP(DigitsMLP):
    """A single-logit network for digits 0 vs 1 (trained with binary cross-entropy)."""

    def __init__(self):
        super().__init__()
        self.network[-1] = nn.Linear(16, 1)


def test_single_logit_binary_network(tmp_path, wandb_dir):
    callback = small_callback(epochs=[], subsets={"max_train_examples": 60, "max_query_examples": 40})
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=WandbLogger(project="ntk-test", save_dir=str(wandb_dir)),
                        callbacks=[callback], default_root_dir=tmp_path, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    model = BinaryDigitsMLP()
    trainer.fit(model, datamodule=DigitsDataModule(classes=(0, 1)))
    [row] = callback.history
    assert callback.surrogate.weight.shape == (1, 60)
    stored = stored_checkpoint(wandb_dir, 1)
    p_net = torch.sigmoid(stored["query_logits"][:, 0].double())
    rows = ln.kernel_from_features(stored["query_features"], stored["reference_features"], product_precision="auto")  # as the callback does
    p_sur = torch.sigmoid(callback.surrogate.predict(rows)[:, 0].double())
    keep = (p_net > 0) & (p_net < 1)
    assert row.kendall_tau == pytest.approx(scipy.stats.kendalltau(p_net[keep], p_sur[keep]).statistic, abs=1e-9)
    assert row.network_acc == pytest.approx(((p_net > 0.5).long() == stored["query_labels"]).double().mean().item())
    # Proponents push towards the explained class: for class 0 that is a negative W[0, j]·κ(x, x_j).
    data = DigitsDataModule(classes=(0, 1))
    data.setup()
    x = data.val_set.tensors[0][:6]
    result = callback.attribute(x, top_k=3, method="representer")  # model inputs work as well as batches
    rows = ln.kernel_from_features(ln.project_features(model, x, "proj_trntk", projection_dim=32, projector="sketch", seed=0), stored["reference_features"])
    sign = torch.where(result.target == 1, 1.0, -1.0)[:, None]
    contributions = sign * callback.surrogate.weight.detach()[0] * rows
    assert set(result.target.tolist()) == {0, 1}
    assert torch.equal(result.proponent_indices, stored["reference_indices"][contributions.topk(3, dim=1).indices])


@pytest.mark.parametrize("progress_bar", [True, False])
def test_a_checkpoint_says_what_it_is_doing(tmp_path, capfd, caplog, progress_bar):
    """With the trainer's progress bar, a checkpoint shows bars for both sides' features and the
    surrogate's fit; without it, none. Either way it logs one line with the figures and where the
    time went."""
    callback = small_callback(epochs=[], top_k=0)
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        fit(tmp_path, [callback], max_epochs=1, enable_progress_bar=progress_bar)
    bars = capfd.readouterr().err
    for bar in ("NTK features (reference)", "NTK features (query)", "NTK surrogate fit"):
        assert (bar in bars) == progress_bar, bar
    [record] = callback.history
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NTK fidelity")]
    assert f"Kendall-τ {record.kendall_tau:.3f}" in line and "(120 reference, 60 query examples)" in line
    assert f"featurize {record.featurize_seconds:.1f} s" in line and f"({record.fit_iterations} iterations)" in line
    assert f"agreement {record.agreement:.3f}" in line and " MB in " in line and "ntk_store" in line  # and the store's size


@pytest.mark.parametrize("options, trainer_options, epochs, says", [
    # a checkpoint costs tens of these 2-step epochs: within a quarter of training only the fit end's fits
    ({"budget": 0.25}, {"max_epochs": 4, "limit_train_batches": 2}, [3], ["one every", "keeps the callback under 25% of training", "too short"]),
    # an ample budget affords every epoch (the last one's is the fit end's)
    ({"budget": 1000}, {"max_epochs": 3}, [0, 1, 2], ["keeps the callback under 100000% of training"]),
    # an explicit schedule is obeyed exactly, with what it costs
    ({"every_n_epochs": 2}, {"max_epochs": 4, "limit_train_batches": 2}, [1, 3], ["this schedule (2 checkpoint(s) in 4 epochs) makes the callback ≈",
                                                                               "budget=0.25 without an explicit schedule would take one every"]),
])
def test_the_default_schedule_keeps_checkpoints_within_a_share_of_training_time(tmp_path, caplog, options, trainer_options, epochs, says):
    """The callback times an epoch and estimates a checkpoint before the first one, says so in one line, and
    spaces checkpoints so that its time stays within ``budget`` of training, the fit's end always included."""
    callback = small_callback(top_k=0, **options)
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        fit(tmp_path, [callback], **trainer_options)
    assert [row.epoch for row in callback.history] == epochs
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NTK checkpoints:")]
    assert "estimated from featurizing 32 of its 180 examples" in line, line
    for words in says:
        assert words in line, line


def test_the_store_keeps_only_the_checkpoints_the_attribution_ensemble_holds(tmp_path):
    """By default (keep_last="ensemble") the entries of checkpoints that left the ensemble are deleted as the run
    goes, so the store stays bounded however long the run; entries of an earlier run in the same folder stay."""
    earlier = small_callback(top_k=0, ensemble=1)
    fit(tmp_path, [earlier], max_epochs=1, seed=1)
    callback = small_callback(top_k=0, ensemble=3)
    fit(tmp_path, [callback], max_epochs=6)
    kept = [c.record.epoch for c in callback._kept]
    assert len(callback.history) == 6 and len(kept) == 3 and kept[0] == 0 and kept[-1] == 5
    names = sorted(p.name for p in (tmp_path / "ntk_store").iterdir())
    own = [name for name in names if not name.startswith(f"epoch=0000-{earlier.history[0].parameters}")]
    assert [int(name[6:10]) for name in own] == kept and len(names) == 4
    x, y = load_digits_tensors()[2:]
    assert callback.attribute((x[:5], y[:5]), top_k=2).proponent_indices.shape == (5, 2)  # from the kept checkpoints' entries
