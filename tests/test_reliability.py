"""Faults and bad input around the callback: each either gets a clear error before training or a warning,
and nothing logged or trained is lost (see docs/reliability.md)."""

import gc
import inspect
import logging
import multiprocessing
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DigitsMLP, fit, small_callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import lightning_ntk as ln
from lightning_ntk import NTKAttributionCallback
from lightning_ntk.demos import DigitsDataModule, load_digits_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(surrogate={"formulation": "multinomal"}), "Unknown formulation 'multinomal'"),
        (dict(surrogate={"alpah": 1e-3}), r"Unknown SurrogateConfig option\(s\) \['alpah'\]"),
        (dict(surrogate={"alpha": -1.0}), "alpha is an L2 penalty and must be > 0"),
        (dict(projection={"projector": "sketchy"}), "Unknown projector 'sketchy'"),
        (dict(every_n_epochs=True), "every_n_epochs must be a positive integer or None"),
        (dict(epochs=[-1]), r"epochs must be 0-based epoch numbers"),
        (dict(subsets={"batch_size": 0}), "batch_size must be an integer ≥ 1"),
        (dict(store={"dtype": "float8"}), "Unknown storage dtype 'float8'"),
        (dict(top_k=-1), "top_k must be an integer ≥ 0"),
        (dict(surrogate={"alpha": float("inf")}), "alpha is an L2 penalty and must be > 0 and finite, got inf"),
        (dict(surrogate={"tolerance": "x"}), "tolerance must be > 0 and finite.*got 'x'"),
        (dict(surrogate={"warm_start": "no"}), "warm_start must be True or False, got 'no'"),
        (dict(projection={"seed": "a"}), "seed must be an integer ≥ 0, got 'a'"),
        (dict(subsets={"seed": 1.5}), "seed must be an integer ≥ 0, got 1.5"),
        (dict(subsets={"max_train_examples": 0}), "max_train_examples must be an integer ≥ 1 or None, got 0"),
        (dict(store={"dir": 5}), "dir must be a folder path.*got 5"),
        (dict(store={"overwrite": "yes"}), "overwrite must be True or False, got 'yes'"),
        (dict(store={"dtype": ["float16"]}), r"Unknown storage dtype \['float16'\]"),
    ],
)
def test_bad_options_fail_in_the_constructor(options, message):
    with pytest.raises(ValueError, match=message):
        NTKAttributionCallback(**options)


class BatchStatistics(DigitsMLP):
    """A network whose BatchNorm keeps no running statistics: it needs a batch even in eval mode, so no
    per-example gradient exists, by any path."""

    def __init__(self):
        super().__init__()
        self.network[1] = nn.BatchNorm1d(16, track_running_stats=False)


@pytest.mark.parametrize(
    "options, model, error, message",
    [
        (dict(kernel="em", layers=["network.9"]), None, ValueError, r"Unknown layer names \['network.9'\]"),
        (dict(image_shape=[7, 7]), None, ValueError, r"image_shape=\[7, 7\] holds 49 values, but an example's input holds 64"),
        (dict(kernel="trntk"), BatchStatistics(), ln.FunctionalForwardError, r"module 'network\.1' \(BatchNorm1d\).*track_running_stats=True"),
        (dict(), BatchStatistics(), ln.FunctionalForwardError, r"^Per-example gradients do not exist.*module 'network\.1' \(BatchNorm1d\).*track_running_stats=True"),
        (dict(train_data=TensorDataset(torch.rand(60, 64), torch.full((60,), 3))), None, ValueError,
         r"All 60 training labels are 3: a classifier needs examples of at least two classes.*\(train_data=/query_data=\)$"),
    ],
    ids=["em-layers", "image-shape", "batch-statistics", "batch-statistics-sketch", "one-class-reference"],
)
def test_what_would_fail_at_the_first_checkpoint_fails_before_training(tmp_path, options, model, error, message):
    steps = []

    class CountSteps(L.Callback):
        def on_train_batch_end(self, *args):
            steps.append(1)

    with pytest.raises(error, match=message):
        fit(tmp_path, [small_callback(every_n_epochs=3, **options), CountSteps()], model=model)
    assert not steps  # not one training step was spent


def test_string_labels_get_a_clear_error(tmp_path):
    class Named(Dataset):
        def __init__(self):
            self.x = load_digits_tensors()[0][:20]

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return self.x[i], "even" if i % 2 == 0 else "odd"

    with pytest.raises(ValueError, match=r"labels must be class indices \(integers\), got (list|tuple).*task=Task\(labels="):
        fit(tmp_path, [small_callback(train_data=Named())])


def test_a_list_of_examples_is_not_read_as_inputs_and_labels(tmp_path):
    callback = small_callback(epochs=[], top_k=0)
    fit(tmp_path, [callback], max_epochs=1)
    x = load_digits_tensors()[2][:2]
    with pytest.raises(TypeError, match=r"list of 2 tensors.*torch.stack"):
        callback.attribute([x[0], x[1]])
    assert callback.attribute(torch.stack([x[0], x[1]])).proponent_indices.shape[0] == 2


def test_reusing_a_callback_in_a_second_fit_starts_a_new_history(tmp_path):
    callback = small_callback(top_k=0)
    fit(tmp_path / "a", [callback], max_epochs=2)
    fit(tmp_path / "b", [callback], max_epochs=2)
    assert [row.epoch for row in callback.history] == [0, 1]


def checkpointed(tmp_path, *callbacks):
    """A two-epoch fit with ``callbacks`` that saves a Lightning checkpoint; its path."""
    fit(tmp_path, [*callbacks, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=2, enable_checkpointing=True)
    return str(tmp_path / "ckpt" / "last.ckpt")


def test_resume_keeps_the_history_with_a_moved_store_and_refuses_other_subsets(tmp_path):
    first = small_callback(top_k=0, store={"dir": str(tmp_path / "store_a")})
    last = checkpointed(tmp_path, first)

    moved = small_callback(top_k=0, store={"dir": str(tmp_path / "store_b")})
    fit(tmp_path, [moved], max_epochs=3, ckpt_path=last)
    assert [row.epoch for row in moved.history] == [0, 1, 2]
    assert moved.history[:2] == first.history

    other = small_callback(top_k=0, subsets={"max_train_examples": 100})
    with pytest.raises(ValueError, match=r"resumed checkpoint's fidelity history was computed with other options \(subsets"):
        fit(tmp_path, [other], max_epochs=3, ckpt_path=last)


def test_resume_with_other_surrogate_options_or_other_examples_is_refused(tmp_path):
    """Everything that decides what a history row means is checked, the query and reference sets by their content."""
    last = checkpointed(tmp_path, small_callback(top_k=0))
    x_train, y_train, x_test, y_test = load_digits_tensors()
    refused = [
        (dict(surrogate={"alpha": 1e-2}), r"surrogate: checkpoint \{'alpha': 0\.0001, 'formulation': 'multinomial'\}, now \{'alpha': 0\.01"),
        (dict(surrogate={"formulation": "ovr"}), r"surrogate: .*now \{'alpha': 0\.0001, 'formulation': 'ovr'\}"),
        (dict(query_data=(x_test[-60:], y_test[-60:])), r"query: checkpoint \{'size': 60, 'fingerprint': '\w+'\}, now \{'size': 60, "),
        (dict(train_data=(x_train[:120], y_train[:120])), r"reference: checkpoint \{'size': 120, 'fingerprint': '\w+'\}, now \{'size': 120, "),
    ]
    for options, message in refused:
        with pytest.raises(ValueError, match=rf"computed with other options \({message}.*Resume with the same options and data, or start a new fit"):
            fit(tmp_path, [small_callback(top_k=0, **options)], max_epochs=3, ckpt_path=last)


def test_resume_with_another_kernel_or_name_is_refused_and_one_without_a_history_warns(tmp_path):
    """The callback's state is keyed by kernel and name: a resume that would not find it says so instead of dropping it."""
    last = checkpointed(tmp_path, small_callback(top_k=0))
    found = r"holds a fidelity history under another key: NTKAttributionCallback\{'kernel': 'proj_trntk', 'name': None\} "
    with pytest.raises(ValueError, match=found + r"\(kernel: checkpoint 'proj_trntk', now 'proj_trntk0'\).*Resume with the same kernel, name and options"):
        fit(tmp_path, [small_callback(top_k=0, kernel="proj_trntk0")], max_epochs=3, ckpt_path=last)
    with pytest.raises(ValueError, match=found + r"\(other name\); this callback's key is NTKAttributionCallback\{'kernel': 'proj_trntk', 'name': 'b'\}"):
        fit(tmp_path, [small_callback(top_k=0, name="b")], max_epochs=3, ckpt_path=last)

    without = checkpointed(tmp_path / "plain")
    added = small_callback(top_k=0)
    with pytest.warns(UserWarning, match=r"resumes at epoch 2 from a checkpoint that holds no fidelity history.*starts at epoch 2"):
        fit(tmp_path, [added], max_epochs=3, ckpt_path=without)
    assert [row.epoch for row in added.history] == [2]


def test_a_checkpoint_of_an_earlier_version_continues_its_history_with_a_warning(tmp_path):
    """A saved state without the options recorded since (surrogate, layers, the examples' digests, the run) keeps its rows, and says what it could not check."""
    first = small_callback(top_k=0)
    last = checkpointed(tmp_path, first)
    checkpoint = torch.load(last, weights_only=False)
    state = checkpoint["callbacks"][first.state_key]
    del state["run"]
    state["options"] = {key: state["options"][key] for key in ("kernel", "projection", "subsets", "module", "params")}
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    resumed = small_callback(top_k=0)
    with pytest.warns(UserWarning, match=r"earlier version of lightning-ntk that did not record layers, surrogate, reference, query; the history continues"):
        fit(tmp_path, [resumed], max_epochs=3, ckpt_path=str(tmp_path / "earlier.ckpt"))
    assert [row.epoch for row in resumed.history] == [0, 1, 2] and resumed.history[:2] == first.history


def test_runs_with_other_options_share_a_store_and_keep_last_keeps_each_runs_own(tmp_path):
    """Another K, projector, kernel or storage dtype writes beside the first run's entries; a second seed's run
    with keep_last deletes only its own older entries."""
    store = {"dir": str(tmp_path / "store"), "keep_last": 1}
    first = small_callback(top_k=0, store=store)
    fit(tmp_path, [first], max_epochs=2)
    for options in (dict(projection={"dim": 48}), dict(projection={"projector": "rademacher"}), dict(kernel="proj_pntk"),
                    dict(store={**store, "dtype": "float32"})):
        other = small_callback(top_k=0, **{"store": store, **options})
        fit(tmp_path, [other], max_epochs=1)
        assert [row.store_reused for row in other.history] == [False]
    second_seed = small_callback(top_k=0, store=store)
    fit(tmp_path, [second_seed], max_epochs=2, seed=1)
    names = [p.name for p in (tmp_path / "store").iterdir()]
    assert len(names) == 6 and sum(name.startswith("epoch=0001-") for name in names) == 2  # each run kept its newest
    assert sum(name.startswith(f"epoch=0001-{first.history[-1].parameters}-") for name in names) == 1
    rerun = small_callback(top_k=0, store=store)
    fit(tmp_path, [rerun], max_epochs=2)
    assert [row.store_reused for row in rerun.history] == [False, True]  # the first run's newest entry is still there


FORK = multiprocessing.get_context("fork")


def run_sharing_a_store(root, dim, both_trained, results):
    """One run of the test below, in its own process; reports its history's epochs or its error."""
    class WaitForTheOther(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # before the NTK callback's checkpoint
            both_trained.wait(120)

    try:
        callback = small_callback(top_k=0, projection={"dim": dim}, store={"dir": str(root / "store"), "keep_last": 1})
        fit(root / str(dim), [WaitForTheOther(), callback], max_epochs=2)
        results.put((dim, [row.epoch for row in callback.history]))
    except BaseException as err:  # noqa: BLE001 (reported to the test process)
        results.put((dim, repr(err)))


def test_two_runs_with_other_options_at_once_both_complete(tmp_path):
    both_trained, results = FORK.Barrier(2), FORK.Queue()
    processes = [FORK.Process(target=run_sharing_a_store, args=(tmp_path, dim, both_trained, results)) for dim in (32, 48)]
    for process in processes:
        process.start()
    returned = dict(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(60)
    assert returned == {32: [0, 1], 48: [0, 1]}
    assert len(list((tmp_path / "store").iterdir())) == 2  # each run's newest entry


class RandomShift(Dataset):
    """Digits with a fresh random shift at every read, as a random augmentation would give."""

    def __init__(self):
        self.x, self.y = load_digits_tensors()[:2]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.5 * torch.randn(64), self.y[i]


def test_random_augmentation_is_drawn_once(tmp_path):
    """With the weights frozen (lr 0), every checkpoint sees the same inputs, so the figures repeat exactly."""
    callback = small_callback(top_k=0, train_data=RandomShift())
    model = DigitsMLP(lr=0.0)
    model.network[1].momentum = 0.0  # BatchNorm statistics frozen too
    fit(tmp_path, [callback], max_epochs=3, model=model)
    taus = [row.kendall_tau for row in callback.history]
    assert len(taus) == 3 and taus[0] == taus[1] == taus[2]


class InfLogit(DigitsMLP):
    """A network whose logits overflow on the first example of every evaluation batch."""

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            return out
        overflow = torch.zeros_like(out)
        overflow[0] = float("inf")
        return out + overflow


def test_non_finite_logits_warn_and_mark_the_row(tmp_path):
    callback = small_callback(top_k=0, epochs=[])
    with pytest.warns(UserWarning, match=r"network's logits or gradients hold NaN or inf on 1 of 60 query examples \(positions \[0\]"):
        fit(tmp_path, [callback], max_epochs=1, model=InfLogit())
    [row] = callback.history
    assert "NaN or inf" in row.warning and row.num_query == 59


class NonFiniteOnMarked(DigitsMLP):
    """Digits whose first pixel is marked -100 overflow (exp) and those marked -200 divide 0 by 0: logits and
    gradients NaN or inf on those examples alone."""

    @classmethod
    def seeded(cls):
        torch.manual_seed(0)
        return cls()

    def forward(self, x):
        marker = x[:, :1]
        alive = torch.clamp(marker + 150, min=0, max=1)  # 0 on the examples marked -200
        return super().forward(x) * torch.exp(torch.clamp(-marker - 50, min=0, max=60) * 10) * alive / alive


def test_non_finite_examples_are_left_out_of_the_checkpoint_and_training_goes_on(tmp_path, wandb_dir):
    """5 of 50 query examples (0/0) and 3 of 80 reference ones (an exp overflow): the checkpoints leave them out,
    warn with their positions, say so in the record, log their W&B tables, attribute the examples kept, and
    their figures equal those of a run without them."""
    from lightning.pytorch.loggers import WandbLogger

    x_train, y_train, x_test, y_test = load_digits_tensors()
    x_train, y_train, x_test, y_test = x_train[:80].clone(), y_train[:80], x_test[:50].clone(), y_test[:50]
    bad_reference, bad_query = [3, 40, 79], [0, 7, 8, 21, 49]
    x_train[bad_reference, 0], x_test[bad_query, 0] = -100.0, -200.0
    marked = small_callback(train_data=(x_train, y_train), query_data=(x_test, y_test))
    with pytest.warns(UserWarning, match=r"on 3 of 80 reference examples \(positions \[3, 40, 79\].*and 5 of 50 query examples "
                                         r"\(positions \[0, 7, 8, 21, 49\].*left out of this checkpoint"):
        trainer, _ = fit(tmp_path / "marked", [marked], max_epochs=2, model=NonFiniteOnMarked.seeded(),
                         logger=WandbLogger(project="ntk-test", save_dir=str(wandb_dir)))
    assert trainer.state.finished and [row.epoch for row in marked.history] == [0, 1]
    assert all("left out" in row.warning and (row.num_train, row.num_query) == (77, 45) for row in marked.history)
    explained = marked.attribute(x_test[1:3], top_k=3)
    assert not set(explained.proponent_indices.flatten().tolist()) & set(bad_reference)
    with pytest.raises(ln.NonFiniteGradientError, match=r"inputs at positions \[0\] hold NaN or inf"):
        marked.attribute(x_test[:2])

    good_reference, good_query = [i for i in range(80) if i not in bad_reference], [i for i in range(50) if i not in bad_query]
    clean = small_callback(top_k=0, train_data=(x_train[good_reference], y_train[good_reference]), query_data=(x_test[good_query], y_test[good_query]))
    fit(tmp_path / "clean", [clean], max_epochs=2, model=NonFiniteOnMarked.seeded())
    assert [row.kendall_tau for row in marked.history] == pytest.approx([row.kendall_tau for row in clean.history], abs=1e-5)
    assert "NaN" not in clean.history[-1].warning


def test_an_unfaithful_surrogate_warns_and_marks_the_row():
    """An untrained network predicts nearly one class, while a surrogate fitted on the labels predicts the labels:
    its agreement is far below what faithful surrogates reach, and the record says so."""
    x_train, y_train, x_test, y_test = load_digits_tensors()
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with pytest.warns(UserWarning, match=r"the surrogate is not faithful to the network \(agreement 0\.\d+, Kendall-τ") as caught:
        checkpoint = ln.FidelityPipeline(network, projection={"dim": 64}).run((x_train[:200], y_train[:200]), (x_test[:100], y_test[:100]))
    record = checkpoint.record
    assert record.agreement < ln.pipeline.FAITHFUL_AGREEMENT and "not faithful" in record.warning
    assert f"agreement {record.agreement:.3f}" in str(caught[0].message) and "large positive TAD" in record.warning


def test_one_query_example_warns_that_tau_is_undefined(tmp_path):
    _, _, x_test, y_test = load_digits_tensors()
    callback = small_callback(top_k=0, epochs=[], query_data=(x_test[:1], y_test[:1]))
    with pytest.warns(UserWarning, match=r"Kendall-τ is undefined on 1 query example\(s\) of 1 class"):
        trainer, _ = fit(tmp_path, [callback], max_epochs=1)
    assert trainer.state.finished and "undefined" in callback.history[0].warning


def train_with_ddp_spawn(out: Path) -> None:
    """Run by the test below in a fresh interpreter: the callback's history after fit returns."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    callback = small_callback(top_k=0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, default_root_dir=out,
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = DigitsMLP()
    trainer.fit(model, datamodule=DigitsDataModule())
    x = load_digits_tensors()[2][:3]
    explained = callback.attribute(x)
    torch.save({"epochs": [row.epoch for row in callback.history], "proponents": explained.proponent_indices.shape}, out / "result.pt")


def test_a_hand_back_nobody_reads_is_removed():
    """Under ddp_spawn rank 0 hands its results back through a temporary file that reading ``history`` takes
    over: one never read is removed when the callback is collected, or at the latest when the interpreter exits."""
    callback = NTKAttributionCallback()
    handoff = callback._handoff
    handoff.write_bytes(b"results")  # as a spawned rank 0 leaves it at teardown
    del callback
    gc.collect()
    assert not handoff.exists()
    script = ("import lightning_ntk as ln\ncallback = ln.NTKAttributionCallback()\n"
              "callback._handoff.write_bytes(b'results')\nprint(callback._handoff)")  # still held at exit
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not Path(done.stdout.strip()).exists()


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_spawn_hands_the_history_back(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["epochs"] == [0, 1] and tuple(result["proponents"]) == (3, 5)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    train_with_ddp_spawn(Path(sys.argv[1]))


@pytest.mark.parametrize(
    "option, message",
    [
        ("projection_dim", r"projection_dim moved into projection=ProjectionConfig\(dim=...\) \(or projection=\{'dim': ...\}\)"),
        ("seed", r"seed moved into projection=ProjectionConfig\(seed=...\).*the subsets' seed"),
        ("store_dir", "store_dir moved"),
        ("surrogate_options", r"surrogate_options moved into surrogate=SurrogateConfig\(...\).*'max_iter', 'tolerance'"),
        ("featurizer_options", "featurizer_options moved into projection=ProjectionConfig"),
        ("alpha", r"alpha moved into surrogate=SurrogateConfig\(alpha=...\)"),
    ],
)
def test_options_of_earlier_versions_say_where_they_moved(option, message):
    """Both constructors read one table of moved options; the signature LightningCLI reads is unchanged."""
    for make in (lambda **kw: NTKAttributionCallback(**kw), lambda **kw: ln.FidelityPipeline(nn.Linear(4, 3), **kw)):
        with pytest.raises(TypeError, match=message):
            make(**{option: 1})
    with pytest.raises(TypeError, match="max_train_examples moved: pass max_train_examples.*to run()"):
        ln.FidelityPipeline(nn.Linear(4, 3), max_train_examples=10)
    with pytest.raises(TypeError, match=r"batch_size moved into subsets=SubsetConfig\(batch_size=...\)"):
        NTKAttributionCallback(batch_size=10)
    assert "projection" in inspect.signature(NTKAttributionCallback).parameters


def test_a_fit_that_stops_short_says_so_in_the_record_and_the_log_line(tmp_path, caplog):
    """A surrogate fit cut short by max_iter: the record's warning and the callback's log line say it did
    not converge and what helps."""
    callback = small_callback(surrogate={"max_iter": 1}, top_k=0, at_fit_end=False)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, [callback], max_epochs=1)
    record = callback.history[-1]
    assert not record.surrogate_converged and "did not converge" in record.warning and "max_iter" in record.warning
    assert any("not converged" in line and "Warning: the surrogate's fit did not converge" in line for line in caplog.messages)
