"""Text classification: models that return a ModelOutput, a dict or a dataclass, token batches as dicts,
padding that contributes nothing (checked in float64 against autograd loops over the unpadded
examples), decoded text in the attribution tables, the word-order task, the example script and the
study setup."""

import dataclasses
import importlib
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from wandb_offline import find_runs, read_run

import lightning_ntk as ln
from lightning_ntk.demos.text import (
    ANIMALS, TextClassifier, TextDataModule, TokenDataset, WordTokenizer, pad_tokens, size_order_sentences, size_order_tokenizer, small_bert,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two contending ones
ROOT = Path(__file__).resolve().parents[1]


# -- the logits in what the model returns ------------------------------------------------------------


@dataclasses.dataclass
class Prediction:
    scores: torch.Tensor
    logits: torch.Tensor


LAYOUTS = {
    "tensor": (lambda logits: logits, ln.Task()),
    "dict": (lambda logits: {"hidden": logits * 2, "logits": logits}, ln.Task()),
    "ModelOutput": (lambda logits: SequenceClassifierOutput(logits=logits), ln.Task()),
    "dataclass": (lambda logits: Prediction(scores=logits * 2, logits=logits), ln.Task()),
    "tuple (return_dict=False)": (lambda logits: (logits, logits * 2), ln.Task(output=0)),
    "another key": (lambda logits: {"scores": logits}, ln.Task(output="scores")),
    "callable": (lambda logits: [{"out": logits}], ln.Task(output=lambda out: out[0]["out"])),
}


class Wrapped(nn.Module):
    """An MLP whose forward returns its logits in another layout."""

    def __init__(self, network, layout):
        super().__init__()
        self.network, self.layout = network, layout

    def forward(self, x):
        return self.layout(self.network(x))


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_every_stage_finds_the_logits_without_a_wrapper(layout):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    wrapped, task = Wrapped(network, LAYOUTS[layout][0]), LAYOUTS[layout][1]
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    torch.testing.assert_close(task.forward(wrapped, x), network(x))
    for kind in ("trntk", "pntk", "em", "ck"):
        torch.testing.assert_close(ln.exact_kernel(wrapped, x, kind=kind, task=task), ln.exact_kernel(network, x, kind=kind), rtol=1e-12, atol=1e-12)
    sketch = dict(kind="proj_trntk", projection_dim=16, projector="sketch", seed=3)
    torch.testing.assert_close(ln.project_features(wrapped, x, task=task, **sketch), ln.project_features(network, x, **sketch))
    checkpoint = ln.FidelityPipeline(wrapped, "ck", task=task).run((x, y), (x, y))
    assert checkpoint.record.network_acc == pytest.approx((network(x).argmax(1) == y).double().mean().item())


def test_outputs_without_logits_are_refused_with_the_fix_named():
    x = torch.randn(3, 4)
    linear = nn.Linear(4, 2)
    with pytest.raises(TypeError, match=r"SequenceClassifierOutput with keys \['hidden_states'\].*Task\(output="):
        ln.Task().forward(Wrapped(linear, lambda out: SequenceClassifierOutput(hidden_states=(out,))), x)
    with pytest.raises(TypeError, match=r"tuple of 2 values.*Task\(output=0\)"):
        ln.exact_kernel(Wrapped(linear, lambda out: (out, out)), x)
    with pytest.raises(TypeError, match=r"Prediction with fields \['scores', 'logits'\], with no logits at 'probs'"):
        ln.Task(output="probs").forward(Wrapped(linear, lambda out: Prediction(out, out)), x)
    with pytest.raises(TypeError, match=r"logits are a list, not a tensor.*Task\(output="):
        ln.exact_kernel(linear, x, kind="ck", task=ln.Task(output=lambda out: [out]))


# -- padding contributes nothing ----------------------------------------------------------------------


def tiny_bert(seed=0):
    """A float64 BERT with every parameter drawn at random (no zero biases, no unit LayerNorm scales)."""
    torch.manual_seed(seed)
    model = small_bert(len(size_order_tokenizer()), hidden_size=16, layers=2, heads=2).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


def unpadded(ids):
    """Model inputs of one example, as long as it is: no padding at all."""
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "position_ids": torch.arange(len(ids))[None]}


def brute_force_gradients(model, examples):
    """``[N, C, P]``: per-class gradients of the trainable parameters, one unpadded example and one
    autograd.grad call at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for ids in examples:
        logits = model(**unpadded(ids)).logits[0]
        rows.append(torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(logits[c], params, retain_graph=True)]) for c in range(2)]))
    return torch.stack(rows)


def hidden_states(model, inputs):
    """Every Linear output but the classifier's (what the em kernel is made of), and the classifier's input."""
    outputs, classifier_input = [], []
    handles = [m.register_forward_hook(lambda mod, args, out: outputs.append(out)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n != "classifier"]
    handles.append(model.classifier.register_forward_hook(lambda mod, args, out: classifier_input.append(args[0])))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return outputs, classifier_input[0]


@pytest.fixture(scope="module")
def sentences():
    tokenizer = size_order_tokenizer()
    texts, labels = size_order_sentences(6, seed=0)  # 7 to 10 tokens
    ids = [torch.tensor(tokenizer.encode(t)) for t in texts]
    assert len({len(i) for i in ids}) > 2  # several lengths, so that padding varies
    return ids, labels


def padded_batch(ids, length, junk=True):
    """All examples padded to ``length``; padded positions hold random tokens (the mask alone must make
    them irrelevant) when ``junk``."""
    batch = pad_tokens(TokenDataset(ids, [0] * len(ids)), length=length)
    if junk:
        filler = torch.randint(4, len(size_order_tokenizer()), batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
        batch["input_ids"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"], filler)
    return {k: v for k, v in batch.items() if k != "labels"}


def test_gradient_kernels_of_padded_batches_equal_those_of_the_unpadded_examples(sentences):
    ids, labels = sentences
    model = tiny_bert()
    gradients = brute_force_gradients(model, ids)
    trntk0 = torch.einsum("acp,bcp->ab", gradients, gradients)
    summed = gradients.sum(1)
    pntk = summed @ summed.T / torch.outer(summed.norm(dim=1), summed.norm(dim=1))
    batch = padded_batch(ids, length=14)
    torch.testing.assert_close(ln.exact_kernel(model, batch, kind="trntk0"), trntk0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ln.exact_kernel(model, batch, kind="pntk"), pntk, rtol=1e-10, atol=1e-12)
    # Batches of a DataLoader padded each to its own longest example: the lengths differ between batches.
    loader = torch.utils.data.DataLoader(TokenDataset(ids, labels), batch_size=4, collate_fn=pad_tokens)
    assert len({b["input_ids"].shape[1] for b in loader}) == 2
    torch.testing.assert_close(ln.exact_kernel(model, loader, kind="trntk0"), trntk0, rtol=1e-10, atol=1e-12)
    # Projected features are the projections of those gradients: padding changes none of them.
    sketch = dict(kind="proj_trntk", projection_dim=32, projector="sketch", seed=1)
    one_by_one = torch.cat([ln.project_features(model, unpadded(i), **sketch) for i in ids])
    torch.testing.assert_close(ln.project_features(model, batch, **sketch), one_by_one, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ln.project_features(model, loader, **sketch), one_by_one, rtol=1e-10, atol=1e-12)


def test_layer_output_kernels_ignore_padded_positions(sentences):
    ids, _ = sentences
    model = tiny_bert()
    states = [hidden_states(model, unpadded(i)) for i in ids]
    n = len(ids)
    em = torch.zeros(n, n, dtype=torch.float64)  # position-aligned inner products over the real positions of both
    for a in range(n):
        for b in range(n):
            for ha, hb in zip(states[a][0], states[b][0]):
                if ha.ndim == 3:
                    t = min(ha.shape[1], hb.shape[1])
                    em[a, b] += (ha[0, :t] * hb[0, :t]).sum()
                else:  # the pooler: one vector per example
                    em[a, b] += (ha * hb).sum()
    batch = padded_batch(ids, length=14)
    features = ln.embedding_features(model, batch, "em")
    torch.testing.assert_close(ln.kernel_from_features(features, normalize=False), em, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ln.exact_kernel(model, batch, kind="em"), em / torch.outer(em.diagonal().sqrt(), em.diagonal().sqrt()))
    ck = torch.cat([s[1] for s in states])
    torch.testing.assert_close(ln.embedding_features(model, batch, "ck"), ck, rtol=1e-10, atol=1e-12)

    loader = torch.utils.data.DataLoader(TokenDataset(ids, [0] * n), batch_size=4, collate_fn=pad_tokens)
    torch.testing.assert_close(ln.embedding_features(model, loader, "ck"), ck, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="depend on the padded length. Pad every batch to the same length"):
        ln.embedding_features(model, loader, "em")


# -- the task, the data and the tables ---------------------------------------------------------------------


def test_the_word_order_task_is_balanced_and_only_order_tells_the_label():
    rank = {animal: i for i, animal in enumerate(ANIMALS)}
    texts, labels = size_order_sentences(500, seed=0, label_noise=0)
    for text, label in zip(texts, labels):
        first, second = [w for w in text.split() if w in rank]
        assert label == int(rank[first] > rank[second])
    noisy_texts, noisy_labels = size_order_sentences(500, seed=0, label_noise=0.5)
    assert noisy_texts == texts
    flips = {gap: [] for gap in range(1, len(ANIMALS))}  # flipped labels by size gap: half of the closest pairs, few of the far ones
    for text, clean, noisy in zip(texts, labels, noisy_labels):
        first, second = [w for w in text.split() if w in rank]
        flips[abs(rank[first] - rank[second])].append(float(clean != noisy))
    far = [f for gap in range(6, len(ANIMALS)) for f in flips[gap]]
    assert 0.35 < sum(flips[1]) / len(flips[1]) < 0.65 and sum(far) / len(far) < 0.15

    texts, labels = size_order_sentences(2000, seed=0)
    assert 0.45 < sum(labels) / len(labels) < 0.55
    # Every bag of words comes with both labels: swapping the animals keeps the words and flips the label.
    bags: dict[tuple, set] = {}
    for text, label in zip(texts, labels):
        words = text.split()
        bags.setdefault(tuple(sorted(w for w in words if w in rank)), set()).add(label)
    assert sum(len(v) == 2 for v in bags.values()) / len(bags) > 0.9
    tokenizer = size_order_tokenizer()
    assert all(tokenizer.decode(tokenizer.encode(t)) == t for t in texts[:50])
    assert WordTokenizer(["b", "a"]).encode("a zebra") == [2, 4, 1, 3]  # [CLS] a [UNK] [SEP]


def test_callback_on_a_bert_classifier_logs_decoded_sentences(tmp_path, wandb_dir):
    L.seed_everything(0, verbose=False)
    data = TextDataModule(num_train=200, num_val=60, batch_size=32)
    model = TextClassifier(small_bert(data.vocab_size))
    callback = ln.NTKAttributionCallback(
        projection={"dim": 32}, subsets={"max_train_examples": 120, "max_query_examples": 40}, epochs=[], top_k=2,
        table_examples=3, task=ln.Task(decode=data.decode),
    )
    logger = WandbLogger(project="ntk-text-test", save_dir=str(wandb_dir))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=logger, callbacks=[callback], default_root_dir=tmp_path,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    [record] = callback.history
    assert record.num_train == 120 and record.num_query == 40 and math.isfinite(record.kendall_tau)

    logger.experiment.finish()
    run = read_run(find_runs(wandb_dir)[0])
    table = run.media(run.rows("ntk/attributions")[-1]["ntk/attributions"]["path"])
    columns = {name: i for i, name in enumerate(table["columns"])}

    def sentence(dataset, index):
        example = dataset[index]
        return f"#{index} label {int(example['labels'])}", data.decode(example["input_ids"].tolist())

    for line in table["data"]:
        caption, text = sentence(data.val_set, line[columns["query_index"]])
        assert line[columns["input"]] == f"{caption}: {text}" and len(text.split()) >= 5
        for k, index in enumerate(line[columns["proponent_indices"]].split(", "), start=1):
            caption, text = sentence(data.train_set, int(index))
            assert line[columns[f"proponent_{k}"]].startswith(caption) and line[columns[f"proponent_{k}"]].endswith(f": {text}")


def test_example_script_fine_tunes_with_the_callback(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.chdir(tmp_path)
    example = importlib.import_module("text_classification")
    cli = example.main(["fit", "--trainer.max_epochs=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                        "--data.num_train=96", "--data.num_val=32", f"--trainer.default_root_dir={tmp_path}"])
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, ln.NTKAttributionCallback)]
    assert callback.task.decode == cli.datamodule.decode and cli.model.network.config.vocab_size == cli.datamodule.vocab_size
    assert [row.epoch for row in callback.history] == [0] and callback.history[0].num_train == 96


@pytest.mark.slow
def test_study_setup_on_the_text_task(tmp_path):
    from lightning_ntk.studies.paper import DEFAULT_KERNELS, run_seed

    kernels = [k for k in DEFAULT_KERNELS if k.label in ("trNTK", "pNTK", "em", "ck")]
    rows, _, _ = run_seed("order_bert", 0, kernels, track_epochs=False, out_dir=tmp_path)
    assert [r["kernel"] for r in rows] == ["trNTK", "pNTK", "em", "ck"]
    for row in rows:
        assert row["network_acc"] > 0.75 and row["agreement"] > 0.8 and math.isfinite(row["kendall_tau"])
