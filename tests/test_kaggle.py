"""Where users run it: a Kaggle-like setting built from this project's environment. The packages Kaggle's image
lacks (open_clip_torch, ftfy) are hidden, no package index is reachable (PIP_NO_INDEX=1, no pip config),
the notebook's working folder holds no project module, and `/kaggle/input` holds one dataset made by
`make kaggle-wheels` (the modules, the notebook, wheels). The notebook must find its modules, install
from the wheels, take papermill's command-line strings with their types, and run to the end on the demo.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = re.compile(r"^(open_clip|open_clip_torch|ftfy)([-_.]|$)", re.IGNORECASE)


@pytest.fixture(scope="module")
def kaggle_dataset(tmp_path_factory) -> Path:
    """The dataset `make kaggle-wheels` writes, attached under an input folder (built once per module)."""
    inputs = tmp_path_factory.mktemp("kaggle_input")
    subprocess.run(["make", "-s", "kaggle-wheels", f"KAGGLE_DIST={inputs / 'entrep-prototypical'}",
                    f"VENV={sys.prefix}"], cwd=ROOT, check=True, capture_output=True, text=True)
    return inputs


def kaggle_python(folder: Path) -> Path:
    """A fresh virtual environment that sees this environment's packages (as Kaggle's image ships torch,
    timm, transformers, ...) except open_clip_torch and ftfy; pip installs into it for real."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    image = folder / "image-packages"
    image.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not HIDDEN.match(entry.name):
            (image / entry.name).symlink_to(entry)
    python = folder / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "kaggle_image.pth").write_text(f"import site; site.addsitedir({str(image)!r})\n")
    return python


def run_like_kaggle(python: Path, inputs: Path, out: Path, *params: str) -> subprocess.CompletedProcess:
    """The notebook run with papermill's command line from a working folder holding only the notebook."""
    work = out / "working"
    work.mkdir(parents=True)
    shutil.copy(ROOT / "entrep-prototypical.ipynb", work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1")
    command = [str(python), "-m", "papermill", "entrep-prototypical.ipynb", str(out / "executed.ipynb"),
               "-f", str(ROOT / "configs" / "demo.yaml"), "-p", "output_dir", str(out / "outputs"),
               "-p", "kaggle_input", str(inputs), "-p", "internet", "off", "-p", "cv_folds", "1", *params,
               "--no-progress-bar"]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1200)


def test_the_image_hides_open_clip_and_keeps_torch(tmp_path):
    python = kaggle_python(tmp_path / "env")
    probe = "import importlib.util as u, torch, timm; print(u.find_spec('open_clip'), u.find_spec('ftfy'))"
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.split()
    assert found == ["None", "None"]


def test_notebook_runs_from_an_attached_dataset_with_internet_off(kaggle_dataset, full_demo, tmp_path):
    python = kaggle_python(tmp_path / "env")
    full_demo(tmp_path / "outputs")
    run = run_like_kaggle(python, kaggle_dataset, tmp_path, "-p", "flip_swap", "false", "-p", "tta_flip", "no")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "outputs"
    params = json.loads((out / "params.json").read_text())
    assert params["flip_swap"] is False and params["tta_flip"] is False  # strings typed by the annotations
    (run_config,) = (out / "checkpoints").glob("dino_shared_*/config.json")
    assert json.loads(run_config.read_text())["config"]["flip_p"] == 0.0  # papermill's 'false' really turns flips off
    assert json.loads((out / "metrics.json").read_text())["dino"]["tta_flip"] is False
    for name in ("submission.zip", "submission_i2i.zip", "submission_t2i.zip"):
        assert (out / name).is_file()
    log = (tmp_path / "executed.ipynb").read_text()
    assert "open_clip_torch" in log and "ftfy" in log  # installed from the dataset's wheels
    where = "import open_clip, torch; print(open_clip.__file__, torch.__file__)"
    installed = subprocess.run([str(python), "-c", where], capture_output=True, text=True, check=True).stdout.split()
    assert str(tmp_path / "env") in installed[0] and "image-packages" in installed[1]  # torch was never reinstalled


def test_without_wheels_or_internet_setup_stops_naming_the_dataset_to_attach(kaggle_dataset, tmp_path):
    python = kaggle_python(tmp_path / "env")
    inputs = tmp_path / "inputs"
    shutil.copytree(kaggle_dataset, inputs, ignore=shutil.ignore_patterns("wheels"))
    run = run_like_kaggle(python, inputs, tmp_path)
    assert run.returncode != 0
    executed = json.loads((tmp_path / "executed.ipynb").read_text())
    failed = next(c for c in executed["cells"] if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    assert "runtime.install_missing" in "".join(failed["source"])  # it stopped at Setup, before any work
    message = "".join(o.get("evalue", "") for o in failed["outputs"])
    assert "make kaggle-wheels" in message and "open_clip_torch" in message
