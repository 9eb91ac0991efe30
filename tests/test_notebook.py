"""End to end: the notebook runs top to bottom under papermill on the demo data (offline, CPU)."""

import json
from pathlib import Path

import papermill as pm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    params = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    params["output_dir"] = str(out)
    pm.execute_notebook(str(ROOT / "entrep-prototypical.ipynb"), str(out / "executed.ipynb"),
                        parameters=params, cwd=str(ROOT), progress_bar=False)
    return out


def test_notebook_has_the_parameter_contract():
    nb = json.loads((ROOT / "entrep-prototypical.ipynb").read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    src = "".join(tagged[0]["source"])
    for name in ("data_path", "output_dir", "clip_model", "dino_model", "dino_weights", "image_size", "epochs",
                 "batch_size", "seed", "device"):
        assert f"\n{name}:" in "\n" + src, name
    assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "commit the notebook without outputs"


def test_demo_run_writes_its_results(demo_run):
    params = json.loads((demo_run / "params.json").read_text())
    assert params["data_path"] == "demo" and params["device_resolved"] == "cpu"
    assert (demo_run / "demo_data" / "README_SYNTHETIC.txt").exists()
    assert (demo_run / "figures" / "samples_per_class.png").stat().st_size > 10_000
