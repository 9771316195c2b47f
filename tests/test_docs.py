"""The documents run as written: the README's set-up commands and merge -> export ->
load-in-PEFT example, and the executed notebook."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses / notebooks: seconds each

ROOT = pathlib.Path(__file__).resolve().parents[1]


README = (ROOT / "README.md").read_text()


def _block_after(heading: str, lang: str, index: int = 0) -> str:
    section = README.split(heading, 1)[1]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)[index]


def test_setup_commands_and_ci_agree():
    test_command = _block_after("## Set up", "bash", 1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
    assert _block_after("## Set up", "bash", 0).strip() == "pip install . && hydraopt demo"


DOCUMENTS = ("README.md", "docs/*.md", "benchmarks/*/README.md", "benchmarks/*.py")
REPO_PATH = re.compile(
    r"\b(?:tests|benchmarks|docs|notebooks|hydraopt_jax)/[\w./-]+\.(?:py|md|png|json|ipynb|sh)\b"
)


def test_readme_demo_table_is_what_the_demo_prints():
    """Every row of the README's demo table (plan, solver, storage, errors; not the seconds)
    is the one `hydraopt demo` computes now, in its order."""
    import io

    from rich.console import Console

    from hydraopt_jax.cli.demo import run_demo

    documented = []
    for line in _block_after("## The demo", "").splitlines():
        cells = [c.strip() for c in line.strip("│").split("│")]
        if len(cells) != 6 or cells[0] == "plan":
            continue
        if cells[2]:
            documented.append(cells[:5])
        else:  # a label rich wrapped onto the next line
            documented[-1][0] += " " + cells[0]
    rows = run_demo(Console(file=io.StringIO(), width=80))
    computed = [
        [r["plan"], r["solver"], f"{r['storage_ratio']:.3f}", f"{r['mean_error']:.4f}",
         f"{r['worst_error']:.4f}"]
        for r in rows
    ]  # fmt: skip
    assert documented == computed


def test_every_repository_path_the_documents_name_exists():
    named = {
        (doc.relative_to(ROOT), path)
        for pattern in DOCUMENTS
        for doc in ROOT.glob(pattern)
        for path in REPO_PATH.findall(doc.read_text())
    }
    assert len(named) > 20
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (ROOT / path).exists())
    assert not missing, missing


def test_readme_merge_export_load_example(tmp_path):
    shutil.rmtree("/tmp/hydraopt-example", ignore_errors=True)
    script = _block_after("## From PEFT adapters to PEFT adapters", "bash")
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, check=True, capture_output=True
    )
    exported = sorted(
        p.name for p in pathlib.Path("/tmp/hydraopt-example/peft").iterdir() if p.is_dir()
    )
    assert "copy_L0" in exported and len(exported) == 5
    code = _block_after("## From PEFT adapters to PEFT adapters", "python")
    code += "\nassert model.peft_config['default'].r == 8\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    shutil.rmtree("/tmp/hydraopt-example", ignore_errors=True)


NOTEBOOK = ROOT / "notebooks" / "tradeoff.ipynb"


nbformat = pytest.importorskip("nbformat")


nbclient = pytest.importorskip("nbclient")


pytest.importorskip("ipykernel")


pytest.importorskip("matplotlib")


pytest.importorskip("torch")


def test_tradeoff_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "storage" in text and "relative error" in text
    assert "HydraOpt front >= every baseline" in text
    # the chart is drawn (an inline PNG)
    assert any("image/png" in o.get("data", {}) for o in outputs)
