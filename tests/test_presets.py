"""The LightningCLI presets in callbacks/ attach the callback, with their options, to any LightningCLI
script: the tests' own digits model, and the paper's binary setups in examples/ (without torchvision)."""

import importlib
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI
from conftest import DigitsMLP

from lightning_ntk import NTKAttributionCallback
from lightning_ntk.demos import DigitsDataModule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two contending ones

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))


def preset_options(path):
    [entry] = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    assert entry["class_path"] == "lightning_ntk.NTKAttributionCallback"
    return entry["init_args"]


def attached_callback(cli):
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, NTKAttributionCallback)]
    return callback


def cli_args(tmp_path, preset, *extra):
    return ["--config", str(preset), "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", *extra]


def test_there_are_presets():
    assert {p.stem for p in PRESETS} >= {"trntk_fidelity", "proj_pntk_cheap", "attribution_topk"}


def configuration(callback):
    """Everything that decides what a callback computes and when."""
    return (callback.kernel, callback.projection, callback.subsets, callback.surrogate_config, callback.store_config,
            callback.budget, callback.every_n_epochs, callback.epochs, callback.at_fit_end, callback.top_k, callback.table_examples)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_attaches_the_callback_with_its_options(tmp_path, preset):
    cli = LightningCLI(DigitsMLP, DigitsDataModule, args=cli_args(tmp_path, preset), run=False)
    options = preset_options(preset)
    assert configuration(attached_callback(cli)) == configuration(NTKAttributionCallback(**options))  # the YAML means what Python means
    assert configuration(attached_callback(cli)) != configuration(NTKAttributionCallback())  # and it changes the defaults


def test_preset_runs_a_fit(tmp_path):
    preset = ROOT / "callbacks" / "proj_pntk_cheap.yaml"
    cli = LightningCLI(DigitsMLP, DigitsDataModule, args=["fit", *cli_args(tmp_path, preset, "--trainer.max_epochs=1")])
    history = attached_callback(cli).history
    assert [row.epoch for row in history] == [0]  # not a 5th epoch: the fit-end checkpoint
    assert history[0].num_train == 500 and history[0].num_query == 250


@pytest.mark.parametrize("script", ["mnist2", "cifar2"])
def test_examples_take_the_presets_without_torchvision(tmp_path, monkeypatch, script):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    module = importlib.import_module(script)
    cli_class = getattr(module, "Cifar2CLI", LightningCLI)
    preset = ROOT / "callbacks" / "trntk_fidelity.yaml"
    cli = cli_class(module.BinaryClassifier, module.TorchvisionPairDataModule, args=cli_args(tmp_path, preset), run=False)
    assert attached_callback(cli).kernel.name == "proj_trntk"
    expected = {"mnist2": ("MNIST", "mlp"), "cifar2": ("CIFAR10", "cnn")}[script]
    assert (cli.datamodule.hparams.dataset, cli.model.hparams.network) == expected
    assert "torchvision" not in sys.modules
