"""README.md says what the code does: every ```python block runs as written, in a fresh interpreter
(W&B offline in a temporary folder, one torch thread), and its tables of kernels, logged keys and
options are those of the code. A snippet whose first line is ``# slow: <why>`` runs under
``@pytest.mark.slow`` (still part of ``make test``)."""

import ast
import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ntk import CheckpointRecord, NTKAttributionCallback, ProjectionConfig, StoreConfig, SubsetConfig, SurrogateConfig
from lightning_ntk.registry import KERNELS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def snippets():
    """Each ```python block of the README, named after the section it is in."""
    params = []
    for number, block in enumerate(re.finditer(r"^```python\n(.*?)^```$", README, re.M | re.S), 1):
        headings = re.findall(r"^#+ (.+)$", README[: block.start()], re.M)
        name = re.sub(r"\W+", "-", headings[-1]).strip("-").lower() if headings else "top"
        code = block.group(1)
        marks = [pytest.mark.slow] if code.startswith("# slow:") else []
        params.append(pytest.param(code, id=f"{number}-{name}", marks=marks))
    return params


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs(code, tmp_path):
    home = tmp_path / "wandb_home"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline", "WANDB_SILENT": "true",
        **{var: str(home) for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")},
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }
    (tmp_path / "snippet.py").write_text(code)
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"The README snippet failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"


def test_there_are_snippets_for_each_entry_point():
    ids = [param.id for param in snippets()]
    assert any("quick-start" in i for i in ids) and any("fidelitypipeline" in i for i in ids), ids


def table_after(marker: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``marker``, header and separator left out."""
    start = README.index(marker)
    lines = README[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def test_the_kernel_table_is_the_registry():
    rows = table_after("<!-- kernels:")
    expected = [[f"`{k.name}`", k.family, yes_no(k.projected), yes_no(k.normalized), yes_no(k.scalar), k.description] for k in KERNELS.values()]
    assert rows == expected


def test_the_logged_keys_are_the_figures_of_a_checkpoint_record():
    blank = CheckpointRecord(**{f.name: "" if f.type == "str" else 0 for f in dataclasses.fields(CheckpointRecord)})
    logged = {key for row in table_after("| key | what it is |") for key in re.findall(r"`(ntk/\w+)`", row[0])}
    assert logged == {f"ntk/{name}" for name in blank.scalars()}


def names_and_defaults(rows):
    """(name, default) of each option named in a table's first column, its default in the second."""
    out = []
    for row in rows:
        names, defaults = re.findall(r"`(\w+)`", row[0]), re.findall(r"`([^`]*)`", row[1])
        assert len(names) == len(defaults), row
        out += [(name, ast.literal_eval(default)) for name, default in zip(names, defaults)]
    return out


@pytest.mark.parametrize("config", [ProjectionConfig, SubsetConfig, SurrogateConfig, StoreConfig], ids=lambda c: c.__name__)
def test_the_config_tables_are_the_dataclasses(config):
    documented = names_and_defaults(table_after(f"`{config.__name__}`: "))
    assert documented == [(f.name, f.default) for f in dataclasses.fields(config)]


def test_the_callback_options_table_is_its_signature():
    documented = names_and_defaults(table_after("`NTKAttributionCallback(kernel=..."))
    parameters = inspect.signature(NTKAttributionCallback).parameters.values()
    assert sorted(documented) == sorted((p.name, p.default) for p in parameters)


def test_links_point_to_files_and_headings():
    slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in re.findall(r"^#+ (.+)$", README, re.M)}
    for target in re.findall(r"\]\(([^)]+)\)", README):
        if target.startswith("#"):
            assert target[1:] in slugs, target
        elif not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_the_demo_lists_every_kernel_and_takes_none_for_the_subset_sizes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    parser = importlib.import_module("digits").parser()
    help_text = parser.format_help()
    assert all(name in help_text for name in KERNELS)
    kernel = next(action for action in parser._actions if action.dest == "kernel")
    assert kernel.choices == [name for name, k in KERNELS.items() if k.scalar]
    args = parser.parse_args(["--max-train-examples", "none", "--max-query-examples", "40"])
    assert args.max_train_examples is None and args.max_query_examples == 40
    options = [action for action in parser._actions if action.dest != "help"]
    assert all(action.help for action in options) and help_text.count("(default:") == len(options)


def test_the_examples_extra_installs_what_the_quick_start_and_the_presets_import():
    """``pip install -e ".[examples]"`` is the README's line for one's own environment: the Quick start logs to
    W&B (wandb, pillow for its images) on scikit-learn's digits, and the presets need jsonargparse."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    packages = {re.match(r"[\w\-]+", requirement).group(0) for requirement in extras["examples"]}
    assert {"wandb", "pillow", "scikit-learn", "jsonargparse"} <= packages
    assert 'pip install -e ".[examples]"' in README
