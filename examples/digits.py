"""Demo: track how faithful an NTK surrogate of an MLP is while it learns scikit-learn's digits.

Runs on a laptop CPU in about a minute, with no download: the digits ship with scikit-learn. It logs
to W&B (offline unless a W&B login exists), prints the fidelity of the proj-trNTK surrogate at each
checkpoint and the training examples that explain a few test predictions, and tells you how to
upload the offline run.

    python examples/digits.py --help
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch

from lightning_ntk import NTKAttributionCallback, ProjectionConfig, SubsetConfig
from lightning_ntk.dashboards import format_history, wandb_mode
from lightning_ntk.demos import DigitsClassifier, DigitsDataModule


def make_logger(project: str, save_dir: str):
    try:
        from lightning.pytorch.loggers import WandbLogger
        import wandb  # noqa: F401
    except ImportError:
        print("wandb is not installed (pip install wandb): logging to CSV only.")
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir)
    return WandbLogger(project=project, save_dir=save_dir, mode=wandb_mode())


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="NTK surrogate fidelity tracking on scikit-learn's digits.")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--kernel", default="proj_trntk", help="proj_trntk, proj_pntk, trntk, pntk, em or ck")
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument("--projector", default="sketch", help="sketch (fast, structured) or rademacher/gaussian (dense, as in the paper)")
    parser.add_argument("--every-n-epochs", type=int, default=2)
    parser.add_argument("--max-train-examples", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".", help="folder for logs and the feature store (ntk_store/)")
    parser.add_argument("--project", default="lightning-ntk-demo", help="W&B project")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; the demo's tensors are small, so one thread avoids synchronisation overhead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    L.seed_everything(args.seed, verbose=False)
    callback = NTKAttributionCallback(
        kernel=args.kernel,
        projection=ProjectionConfig(dim=args.projection_dim, projector=args.projector, seed=args.seed),
        subsets=SubsetConfig(max_train_examples=args.max_train_examples, max_query_examples=None, seed=args.seed),
        every_n_epochs=args.every_n_epochs, top_k=5, image_shape=[8, 8],
    )
    logger = make_logger(args.project, args.out)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                        default_root_dir=args.out, enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10)
    data = DigitsDataModule(seed=args.seed)
    trainer.fit(DigitsClassifier(), datamodule=data)

    print(f"\nFidelity of the {args.kernel} surrogate ({args.max_train_examples} training examples, "
          f"{len(data.val_set)} test examples) at each checkpoint:")
    print(format_history(callback.history))

    x, y = data.val_set.tensors[0][:3], data.val_set.tensors[1][:3]
    explained = callback.attribute((x, y))
    train_labels = data.train_set.tensors[1]
    print("\nTraining examples that push the surrogate towards its prediction (index: label):")
    for i in range(len(x)):
        proponents = ", ".join(f"{int(j)}: {int(train_labels[j])}" for j in explained.proponent_indices[i])
        print(f"  test example {i} (label {int(y[i])}, surrogate predicts {int(explained.target[i])}): {proponents}")

    run = getattr(logger, "experiment", None)
    if hasattr(run, "finish"):
        run_dir = os.path.dirname(run.dir)
        offline = run.settings.mode == "offline"
        run.finish()
        if offline:
            print(f"\nThe W&B run was saved offline. Upload it with:\n  wandb sync {run_dir}")
    return callback.history


if __name__ == "__main__":
    main()
