"""Text classification that needs no download: a word-level tokenizer, a synthetic task that only word
order solves, token batches as Hugging Face models take them, and a small BERT built from a config.

The task (:func:`size_order_sentences`): "the old cat chased a horse today" is labelled 1 when the first
animal named is larger than the second (with label noise that grows as their sizes get closer). Both orders of every pair of animals are equally likely, so
the words alone (a bag of words) are at chance: a model must read their order, as a transformer does
through its position embeddings. A surrogate that is faithful to such a model has to capture that too.

``transformers`` (the ``text`` extra) is imported only by :func:`small_bert` and the pretrained path of
:class:`TextDataModule`.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..metrics import predictions
from ..task import Task

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
ANIMALS = ("ant", "mouse", "frog", "cat", "dog", "fox", "wolf", "horse", "bear", "elephant")  # smallest to largest
VERBS = ("chased", "saw", "followed", "pushed", "greeted", "watched")
DETERMINERS = ("the", "a")
ADJECTIVES = ("old", "young", "happy", "tired", "grey", "quiet")
ENDINGS = ("today", "again", "yesterday", "twice")
MAX_SENTENCE_TOKENS = 10  # [CLS] det adjective animal verb det adjective animal ending [SEP]


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary: ``[PAD]`` is id 0, unknown words map to
    ``[UNK]``, and every sentence is framed by ``[CLS]`` … ``[SEP]`` as BERT expects."""

    def __init__(self, words: Sequence[str]):
        self.vocab = list(SPECIAL_TOKENS) + sorted(set(words) - set(SPECIAL_TOKENS))
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = range(len(SPECIAL_TOKENS))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.cls_id, *(self.ids.get(word, self.unk_id) for word in text.split()), self.sep_id]

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids``, special tokens (padding included) left out."""
        return " ".join(self.vocab[i] for i in ids if i >= len(SPECIAL_TOKENS))


def size_order_sentences(num_examples: int, seed: int = 0, label_noise: float = 0.3) -> tuple[list[str], list[int]]:
    """``num_examples`` sentences "<det> [adj] A <verb> <det> [adj] B [ending]" over two different
    animals A, B, and their labels: 1 when A is larger than B (in the order of :data:`ANIMALS`),
    flipped with probability ``label_noise / gap`` where ``gap`` is how many places apart the two are.

    Labels are balanced, and a sentence's words without their order say nothing about its label.
    The noise makes animals of close sizes ambiguous, so a well-fitted model is less sure of them:
    its confidence varies from example to example, as on real data, and Kendall-τ between its and a
    surrogate's confidence measures something.
    """
    if not 0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must lie in [0, 0.5] (a flip probability), got {label_noise!r}.")
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num_examples):
        first, second = rng.sample(range(len(ANIMALS)), 2)

        def phrase(animal: int) -> list[str]:
            adjective = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
            return [rng.choice(DETERMINERS), *adjective, ANIMALS[animal]]

        ending = [rng.choice(ENDINGS)] if rng.random() < 0.5 else []
        texts.append(" ".join(phrase(first) + [rng.choice(VERBS)] + phrase(second) + ending))
        flipped = rng.random() < label_noise / abs(first - second)
        labels.append(int((first > second) != flipped))
    return texts, labels


def size_order_tokenizer() -> WordTokenizer:
    """The tokenizer of the task's vocabulary."""
    return WordTokenizer(ANIMALS + VERBS + DETERMINERS + ADJECTIVES + ENDINGS)


class TokenDataset(Dataset):
    """Examples as dicts ``{"input_ids": [T_i], "labels": []}`` of variable length; :func:`pad_tokens`
    makes batches of them."""

    def __init__(self, ids: Sequence[Sequence[int]], labels: Sequence[int]):
        if len(ids) != len(labels):
            raise ValueError(f"Got {len(ids)} token sequences but {len(labels)} labels.")
        self.ids, self.labels = [torch.as_tensor(x, dtype=torch.long) for x in ids], torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def pad_tokens(examples: Sequence[dict], pad_id: int = 0, length: int | None = None, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """Collate token examples into a batch: ``input_ids`` padded with ``pad_id`` to the longest example
    (or to ``length``), the ``attention_mask`` of real positions, ``labels``, and ``position_ids``
    0…T−1 for every example when ``position_ids``.

    Explicit position ids give the position embedding the batch in its first dimension, as every
    other layer sees it; BERT numbers positions this way, so its outputs do not change. Models that
    number positions otherwise (RoBERTa) or take no position ids (DistilBERT) need ``position_ids=False``.
    """
    longest = max(len(e["input_ids"]) for e in examples)
    width = longest if length is None else length
    if longest > width:
        raise ValueError(f"An example has {longest} tokens, more than length={width}: raise the length or truncate the examples.")
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        batch["position_ids"] = torch.arange(width).expand(len(examples), width).clone()
    if "labels" in examples[0]:
        batch["labels"] = torch.stack([torch.as_tensor(e["labels"]) for e in examples])
    return batch


def size_order_tensors(num_train: int = 1000, num_test: int = 400, seed: int = 0) -> tuple[dict, torch.Tensor, dict, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the task, the inputs as dicts of ``[N, T]`` tensors
    padded to one length (the train and test sentences are drawn with different seeds)."""
    tokenizer = size_order_tokenizer()
    sets = []
    for count, draw in ((num_train, 2 * seed), (num_test, 2 * seed + 1)):
        texts, labels = size_order_sentences(count, draw)
        batch = pad_tokens(TokenDataset([tokenizer.encode(t) for t in texts], labels), tokenizer.pad_id, length=MAX_SENTENCE_TOKENS)
        sets += [{k: v for k, v in batch.items() if k != "labels"}, batch["labels"]]
    return tuple(sets)


def small_bert(vocab_size: int, num_labels: int = 2, hidden_size: int = 32, layers: int = 2, heads: int = 2, max_positions: int = 64) -> nn.Module:
    """A ``BertForSequenceClassification`` built from a config (no download), small enough for a CPU."""
    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError as err:
        raise ImportError("The text demos need transformers: pip install 'lightning-ntk[text]'") from err
    # initializer_range: BERT's 0.02 is sized for hidden size 768; at 32 it leaves every input's [CLS]
    # output nearly the same, and training sits at chance for a number of epochs that rounding decides
    # (10 of 12 for the study's seed 0 in float32). At 0.1 every seed starts learning within two epochs.
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden_size, max_position_embeddings=max_positions, num_labels=num_labels,
        initializer_range=0.1,
    )
    return BertForSequenceClassification(config)


class TextClassifier(L.LightningModule):
    """Trains a sequence classifier on dict batches (``input_ids``, ``attention_mask``, ..., ``labels``)
    with cross-entropy. Its forward returns what the network returns (a ``ModelOutput`` for Hugging
    Face models): the engine finds the logits in it (see :class:`~lightning_ntk.task.Task`)."""

    def __init__(self, network: nn.Module, lr: float = 1e-3, optimizer: str = "adamw", weight_decay: float = 0.01):
        super().__init__()
        self.network, self.lr, self.optimizer, self.weight_decay = network, lr, optimizer, weight_decay
        self.task = Task()

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.network(**inputs)

    def _logits_and_labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.forward(self, self.task.get_inputs(batch)), self.task.get_labels(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, labels = self._logits_and_labels(batch)
        loss = F.cross_entropy(logits, labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, labels = self._logits_and_labels(batch)
        self.log("val_acc", (predictions(logits) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class TextDataModule(L.LightningDataModule):
    """Token batches for :class:`TextClassifier`: the synthetic size-order task by default (no download),
    or a Hugging Face dataset with a pretrained tokenizer.

    Args:
        dataset: a Hugging Face dataset (``"glue"``, ``"imdb"``, ...; needs ``pip install datasets`` and a
            network), with ``subset`` its configuration (``"cola"``), ``text_field``/``label_field`` its
            columns and ``splits`` its training and validation splits. None: the synthetic task.
        pretrained: the tokenizer's name (that of the pretrained model).
        num_train, num_val: examples kept of each split (the synthetic task draws that many).
        max_length: tokens kept per example (longer ones are truncated).
        position_ids: give each example explicit position ids (see :func:`pad_tokens`).
    """

    def __init__(
        self,
        dataset: str | None = None,
        subset: str | None = None,
        text_field: str = "sentence",
        label_field: str = "label",
        splits: tuple[str, str] = ("train", "validation"),
        pretrained: str | None = None,
        num_train: int = 2000,
        num_val: int = 500,
        max_length: int = 64,
        batch_size: int = 32,
        position_ids: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if dataset is not None and pretrained is None:
            raise ValueError(
                f"dataset={dataset!r} needs the pretrained tokenizer's name: pass pretrained='bert-base-uncased' (or another; "
                "--model.pretrained in examples/text_classification.py)."
            )
        if dataset is None:
            self.tokenizer = size_order_tokenizer()
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(pretrained)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if isinstance(self.tokenizer, WordTokenizer) else self.tokenizer.pad_token_id

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens left out: what the attribution tables show."""
        if isinstance(self.tokenizer, WordTokenizer):
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prepare_data(self) -> None:
        if self.hparams.dataset is not None:
            self._load_split(self.hparams.splits[0])  # downloads once into the Hugging Face cache

    def _load_split(self, split: str):
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise ImportError("dataset=... reads Hugging Face datasets: pip install datasets") from err
        return load_dataset(self.hparams.dataset, self.hparams.subset, split=split)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(self.tokenizer, WordTokenizer):
            return [self.tokenizer.encode(t)[: self.hparams.max_length] for t in texts]
        return self.tokenizer(list(texts), truncation=True, max_length=self.hparams.max_length)["input_ids"]

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        sets = []
        for split, count, draw in ((h.splits[0], h.num_train, 2 * h.seed), (h.splits[1], h.num_val, 2 * h.seed + 1)):
            if h.dataset is None:
                texts, labels = size_order_sentences(count, draw)
            else:
                rows = self._load_split(split)
                rows = rows.shuffle(seed=h.seed).select(range(min(count, len(rows))))
                texts, labels = rows[h.text_field], rows[h.label_field]
            sets.append(TokenDataset(self._encode(texts), labels))
        self.train_set, self.val_set = sets

    def collate(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pad_tokens(examples, self.pad_id, position_ids=self.hparams.position_ids)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=128, collate_fn=self.collate)
