"""Demo: track how faithful an NTK surrogate of an MLP is while it learns scikit-learn's digits.

Runs on a laptop CPU in well under a minute, with no download: the digits ship with scikit-learn. It logs
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

from lightning_ntk import KERNELS, CheckpointRecord, NTKAttributionCallback, ProjectionConfig, SubsetConfig
from lightning_ntk.dashboards import format_history, wandb_mode
from lightning_ntk.demos import DigitsClassifier, DigitsDataModule
from lightning_ntk.projection import PROJECTOR_KINDS


def make_logger(project: str, save_dir: str):
    try:
        from lightning.pytorch.loggers import WandbLogger
        import wandb  # noqa: F401
    except ImportError:
        print("wandb is not installed (pip install wandb): logging to CSV only.")
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir)
    return WandbLogger(project=project, save_dir=save_dir, mode=wandb_mode())


def count_or_none(text: str) -> int | None:
    """A subset size: a positive integer, or ``none`` for the whole set."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    kernels = [name for name, kernel in KERNELS.items() if kernel.scalar]
    blocks = [name for name, kernel in KERNELS.items() if not kernel.scalar]
    p = argparse.ArgumentParser(
        description="Train an MLP on scikit-learn's 8×8 digits (1,300 train / 497 test, no download) and track how faithful "
        "an NTK kernel-machine surrogate of it is, with the training examples that explain its predictions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--kernel", default="proj_trntk", choices=kernels,
                   help="the surrogate's kernel: " + "; ".join(f"{name}: {KERNELS[name].description}" for name in kernels)
                   + f" ({', '.join(blocks)} is a C×C block per pair: no surrogate can use it)")
    p.add_argument("--projection-dim", type=int, default=1024, help="K, the dimension of the random projection (proj_* kernels)")
    p.add_argument("--projector", default="sketch", choices=PROJECTOR_KINDS,
                   help="sketch: the fast structured count-sketch; rademacher/gaussian: the paper's dense projections (far slower)")
    p.add_argument("--every-n-epochs", type=int, default=2, help="a checkpoint at the end of every n-th epoch (and at the end of training)")
    p.add_argument("--max-train-examples", type=count_or_none, default=600,
                   help="size of the seeded reference subset of the 1,300 training digits ('none': all of them)")
    p.add_argument("--max-query-examples", type=count_or_none, default=None,
                   help="size of the seeded query subset of the 497 test digits ('none': all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training run, the projection and the subsets")
    p.add_argument("--out", default=".", help="folder for the logs and the feature store (ntk_store/ in the logger's folder)")
    p.add_argument("--project", default="lightning-ntk-demo", help="W&B project (offline unless a W&B login exists)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the demo's tensors are small, so one thread avoids synchronisation overhead")
    return p


def main(argv=None) -> list[CheckpointRecord]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)

    L.seed_everything(args.seed, verbose=False)
    callback = NTKAttributionCallback(
        kernel=args.kernel,
        projection=ProjectionConfig(dim=args.projection_dim, projector=args.projector, seed=args.seed),
        subsets=SubsetConfig(max_train_examples=args.max_train_examples, max_query_examples=args.max_query_examples, seed=args.seed),
        every_n_epochs=args.every_n_epochs, top_k=5, image_shape=[8, 8],
    )
    logger = make_logger(args.project, args.out)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                        default_root_dir=args.out, enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10)
    data = DigitsDataModule(seed=args.seed)
    trainer.fit(DigitsClassifier(), datamodule=data)

    last = callback.history[-1]
    print(f"\nFidelity of the {args.kernel} surrogate ({last.num_train} training examples, {last.num_query} test examples) "
          "at each checkpoint:")
    print(format_history(callback.history))

    x, y = data.val_set.tensors[0][:3], data.val_set.tensors[1][:3]
    explained = callback.attribute((x, y))
    train_labels = data.train_set.tensors[1]
    print("\nTraining examples whose removal would most lower the network's prediction (index: label):")
    for i in range(len(x)):
        proponents = ", ".join(f"{int(j)}: {int(train_labels[j])}" for j in explained.proponent_indices[i])
        print(f"  test example {i} (label {int(y[i])}, network predicts {int(explained.target[i])}): {proponents}")
    suspects, losses = callback.suspicious(top_k=5)
    print("\nTraining examples the surrogate fits worst, perhaps mislabelled (index: label): "
          + ", ".join(f"{int(j)}: {int(train_labels[j])}" for j in suspects))

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
