"""Fine-tune a BERT sequence classifier and track how faithful its NTK surrogate is, with decoded text in
the W&B attribution tables.

A LightningCLI script. The model's forward returns a Hugging Face ``ModelOutput`` and batches are dicts
(``input_ids``, ``attention_mask``, ``labels``): the callback reads both as they are. With no option it
needs no download: a 2-layer BERT built from a config learns a synthetic task that only word order
solves ("the cat chased a horse": is the first animal the larger one?). It logs to W&B (offline unless
a W&B login exists) when wandb is installed, and prints the fidelity per checkpoint and the training
sentences that explain a few test predictions::

    pip install -e ".[text,wandb]"
    python examples/text_classification.py fit --trainer.max_epochs 6

With a network, a real data set and pretrained weights (``pip install datasets``)::

    python examples/text_classification.py fit --data.dataset glue --data.subset cola \\
        --model.pretrained bert-base-uncased --model.lr 2e-5 --trainer.max_epochs 3

Any preset of ``callbacks/`` replaces the default callback (``--config callbacks/attribution_topk.yaml``).
"""

from __future__ import annotations

import dataclasses
import os

from lightning.pytorch.cli import LightningCLI

from lightning_ntk import NTKAttributionCallback
from lightning_ntk.dashboards import format_history, wandb_mode
from lightning_ntk.demos.text import TextClassifier, TextDataModule, small_bert


class BertClassifier(TextClassifier):
    """A BERT sequence classifier: pretrained weights when ``pretrained`` names them (downloaded once),
    else a small BERT built from a config (``vocab_size`` comes from the data's tokenizer)."""

    def __init__(self, pretrained: str | None = None, vocab_size: int = 64, num_labels: int = 2, hidden_size: int = 32,
                 layers: int = 2, heads: int = 2, lr: float = 2e-3):
        if pretrained is None:
            network = small_bert(vocab_size, num_labels, hidden_size, layers, heads)
        else:
            from transformers import AutoModelForSequenceClassification

            network = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=num_labels)
        super().__init__(network, lr=lr)
        self.save_hyperparameters()


def default_logger() -> dict:
    """W&B when it is installed (offline without a login), else CSV."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}}
    return {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "lightning-ntk-text", "mode": wandb_mode()}}


DEFAULT_CALLBACK = {
    "class_path": "lightning_ntk.NTKAttributionCallback",
    "init_args": {"kernel": "proj_trntk", "projection": {"dim": 512}, "subsets": {"max_train_examples": 500, "max_query_examples": 200},
                  "every_n_epochs": 1, "top_k": 3, "table_examples": 8},
}


class TextCLI(LightningCLI):
    """Links the model to the data's tokenizer, and shows every attached callback's examples as text."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.set_defaults({"trainer.callbacks": [DEFAULT_CALLBACK], "trainer.logger": default_logger(), "trainer.enable_checkpointing": False})

    def ntk_callbacks(self) -> list[NTKAttributionCallback]:
        return [c for c in self.trainer.callbacks if isinstance(c, NTKAttributionCallback)]

    def before_fit(self) -> None:
        for callback in self.ntk_callbacks():
            if callback.task.decode is None:
                callback.task = dataclasses.replace(callback.task, decode=self.datamodule.decode)

    def after_fit(self) -> None:
        for callback in self.ntk_callbacks():
            print(f"\nFidelity of the {callback.kernel.name} surrogate at each checkpoint:")
            print(format_history(callback.history))
            if callback.surrogate is None:
                continue
            data = self.datamodule
            batch = data.collate([data.val_set[i] for i in range(3)])
            explained = callback.attribute(batch, top_k=3)
            print("\nTraining sentences that push the surrogate towards its prediction:")
            for i in range(3):
                print(f"  {data.decode(batch['input_ids'][i][batch['attention_mask'][i] == 1].tolist())!r} "
                      f"(label {int(batch['labels'][i])}, surrogate predicts {int(explained.target[i])}):")
                for j in explained.proponent_indices[i]:
                    example = data.train_set[int(j)]
                    print(f"      {data.decode(example['input_ids'].tolist())!r} (label {int(example['labels'])})")
        run = getattr(self.trainer.logger, "experiment", None)
        if hasattr(run, "finish") and hasattr(run, "settings"):
            run_dir, offline = os.path.dirname(run.dir), run.settings.mode == "offline"
            run.finish()
            if offline:
                print(f"\nThe W&B run was saved offline. Upload it with:\n  wandb sync {run_dir}")


def main(args=None) -> TextCLI:
    return TextCLI(
BertClassifier, TextDataModule, seed_everything_default=0, args=args)


if __name__ == "__main__":
    main()
