"""End to end: the notebook runs top to bottom under papermill on the demo data (offline, CPU),
writes every result, and a rerun with the same parameters reuses its caches and checkpoint."""

import json
import zipfile
from pathlib import Path

import papermill as pm
import pytest
import yaml

import utils

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["samples_per_class", "embedding_projection_clip", "learning_curve_dino", "threshold_sweep",
           "misclassified_hybrid", "retrieval_gallery_i2i"] + [
    f"confusion_{level}_{model}" for level in ("coarse", "fine") for model in ("prototypes", "dino", "hybrid")]


def _run(out: Path, **overrides) -> str:
    params = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    params.update(output_dir=str(out), **overrides)
    nb = pm.execute_notebook(str(ROOT / "entrep-prototypical.ipynb"), str(out / "executed.ipynb"),
                             parameters=params, cwd=str(ROOT), progress_bar=False)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _cache_files(out: Path) -> dict[Path, int]:
    """Every cache file (embeddings, DINOv2 predictions/features, decode checks) -> its mtime."""
    return {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*")
            if p.is_file() and p.suffix in (".safetensors", ".json")}


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo run twice into one output_dir: (output_dir, first metrics, second metrics, second log)."""
    out = tmp_path_factory.mktemp("run")
    _run(out)
    first = json.loads((out / "metrics.json").read_text())
    submissions = {z: (out / z).read_bytes() for z in ("submission.zip", "submission_i2i.zip", "submission_t2i.zip")}
    features = _cache_files(out)
    assert {p.parent.name for p in features} == {"features", "dino", "cache"}  # CLIP, DINOv2 and decode checks
    log = _run(out)
    second = json.loads((out / "metrics.json").read_text())
    return out, first, second, log, submissions, features


def test_notebook_has_the_parameter_contract():
    nb = json.loads((ROOT / "entrep-prototypical.ipynb").read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    src = "".join(tagged[0]["source"])
    for name in ("data_path", "output_dir", "clip_model", "dino_model", "dino_weights", "image_size", "epochs",
                 "batch_size", "seed", "device"):
        assert f"\n{name}:" in "\n" + src, name
    assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "commit the notebook without outputs"


def test_demo_run_writes_every_result(demo_runs):
    out, metrics, *_ = demo_runs
    params = json.loads((out / "params.json").read_text())
    assert params["data_path"] == "demo" and params["device_resolved"] == "cpu"
    assert (out / "demo_data" / "README_SYNTHETIC.txt").exists() and metrics["synthetic_demo_data"] is True
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 5_000, name
    for key in ("prototypes", "dino", "hybrid", "comparison_fine", "comparison_coarse", "per_class_hybrid", "retrieval"):
        assert metrics[key], key
    assert set(metrics["comparison_fine"]) == {"prototypes", "DINOv2", "hybrid", "soft fusion"}
    assert 0.0 <= metrics["hybrid"]["threshold"] <= 1.0
    assert {"R@1", "R@5", "MRR"} <= set(metrics["retrieval"]["i2i"]["table"][0])
    assert len(metrics["retrieval"]["t2i"]["table"]) == 2  # t2i captions and public description lines
    assert len(metrics["val_predictions"]["hybrid"]) == metrics["data"]["val"]


def test_demo_submissions_are_valid(demo_runs):
    out, *_ = demo_runs
    data = utils.load_entrep(out / "demo_data")
    cls, i2i, t2i = (data.queries[k] for k in ("cls", "i2i", "t2i"))
    utils.validate_track1(out / "submission.zip", cls.file.tolist())
    utils.validate_track2(out / "submission_i2i.zip", i2i.file.tolist(), i2i.file.tolist())
    utils.validate_track3(out / "submission_t2i.zip", t2i.text.tolist(), i2i.file.tolist())
    for name, json_name in (("submission.zip", "submission.json"), ("submission_i2i.zip", "submission_i2i.json"),
                            ("submission_t2i.zip", "submission_t2i.json")):
        assert zipfile.ZipFile(out / name).namelist() == [json_name]


def test_rerun_reuses_caches_and_checkpoint_and_repeats_the_results(demo_runs):
    out, first, second, log, submissions, features = demo_runs
    assert "reusing finished run" in log
    assert _cache_files(out) == features  # nothing re-encoded, re-predicted or re-checked
    assert second["val_predictions"] == first["val_predictions"]
    assert second["hybrid"]["threshold"] == first["hybrid"]["threshold"]
    for name, blob in submissions.items():
        assert (out / name).read_bytes() == blob, name


@pytest.mark.parametrize("seed, same", [(0, True), (1, False)])
def test_fresh_runs_are_deterministic_by_seed(demo_runs, tmp_path, seed, same):
    """From scratch into another folder: the same seed writes the same predictions and submissions
    on the CPU; another seed changes them."""
    _, first, *_, submissions, _ = demo_runs
    _run(tmp_path, seed=seed)
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert (again["val_predictions"] == first["val_predictions"]) is same
    assert all(((tmp_path / name).read_bytes() == blob) is same for name, blob in submissions.items())
