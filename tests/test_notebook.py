"""notebooks/quickstart.ipynb runs end to end (tiny settings) and only imports the library."""

import json
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"

TINY_SETTINGS = {
    "DMM_QUICKSTART_EPOCHS": "1",
    "DMM_QUICKSTART_Z_DIM": "3",
    "DMM_QUICKSTART_HIDDEN": "8",
    "DMM_QUICKSTART_RNN_DIM": "8",
    "DMM_QUICKSTART_MAX_SEQUENCES": "6",
    "DMM_QUICKSTART_SAMPLES": "2",
    "DMM_QUICKSTART_LENGTH": "8",
}


def test_the_quickstart_notebook_is_committed_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_the_quickstart_notebook_runs_end_to_end(jsb_path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    for name, value in TINY_SETTINGS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DMM_JAX_DATA_DIR", str(jsb_path.parent))
    monkeypatch.setenv("DMM_QUICKSTART_OUT", str(tmp_path / "out"))
    # The kernel imports this checkout's dmm_jax, whatever copy is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # data, training curves, generated pieces, forecast
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"piece_{i}.mid" for i in range(3)
    ]
    text = "".join(o.get("text", "") for o in outputs)
    assert "model" in text and "baseline" in text
