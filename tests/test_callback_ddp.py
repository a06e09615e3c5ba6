"""NTKAttributionCallback under real DDP: 2 processes, gloo, CPU. Featurization is sharded over the
ranks and gathered; the results equal a single-process run on the same weights.

Run as a script, this file trains with ``strategy="ddp"`` (Lightning re-launches it for rank 1);
the test runs it in a subprocess and compares with a single-process run of its own.
"""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DigitsMLP, fit, small_callback, stored_checkpoint

from lightning_ntk.demos import DigitsDataModule

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.ddp, pytest.mark.slow]

# Odd subset sizes: the second rank's shards are padded to the first's length before all_gather.
OPTIONS = dict(top_k=0, budget=1000, subsets={"max_train_examples": 121, "max_query_examples": 61})
FIDELITY = ("kendall_tau", "tad", "agreement", "surrogate_acc", "network_acc", "miss_overlap_p")


def train_with_ddp(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    callback = small_callback(**OPTIONS)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=out, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = DigitsMLP()
    trainer.fit(model, datamodule=DigitsDataModule())
    torch.save({"history": [row.to_dict() for row in callback.history], "state_dict": model.state_dict()}, out / f"rank{trainer.global_rank}.pt")


def test_ddp_matches_a_single_process(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank holds the same history
    history = ranks[0]["history"]
    assert [row["epoch"] for row in history] == [0, 1]
    for a, b in zip(ranks[0]["state_dict"].values(), ranks[1]["state_dict"].values()):
        assert torch.equal(a, b)
    assert len(list((tmp_path / "ntk_store").iterdir())) == 2  # rank 0 wrote each checkpoint once

    # One process, the same weights, frozen (lr 0, BatchNorm statistics fixed) for one epoch.
    model = DigitsMLP(lr=0.0)
    model.load_state_dict(ranks[0]["state_dict"])
    model.network[1].momentum = 0.0
    single = small_callback(**OPTIONS, store={"dir": str(tmp_path / "single")})
    fit(tmp_path, [single], max_epochs=1, model=model)
    for (name, a), b in zip(ranks[0]["state_dict"].items(), model.state_dict().values()):
        assert torch.equal(a, b) or name.endswith("num_batches_tracked")  # it saw exactly the DDP-trained weights
    assert single.history[0].parameters == history[-1]["parameters"]
    assert {k: getattr(single.history[0], k) for k in FIDELITY} == pytest.approx({k: history[-1][k] for k in FIDELITY}, abs=1e-6)
    ddp_features = stored_checkpoint(tmp_path, 1)
    [folder] = (tmp_path / "single").glob("epoch=0000-*")
    single_features = {name: torch.as_tensor(__import__("numpy").load(folder / f"{name}.npy")) for name in ddp_features}
    for name, values in ddp_features.items():
        torch.testing.assert_close(values, single_features[name], rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":
    train_with_ddp(Path(sys.argv[1]))
