"""End to end: the notebook runs top to bottom under papermill on the demo data (offline, CPU), writes
every result, reads cleanly when saved, and a rerun with the same parameters reuses its caches and
checkpoint. The paper's protocol (configs/paper.yaml) runs too, with four separately trained models."""

import ast
import json
from pathlib import Path

import papermill as pm
import pytest
import yaml

import utils

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "entrep-prototypical.ipynb"
FIGURES = ["samples_per_class", "embedding_projection_clip", "learning_curve_dino_shared", "threshold_sweep",
           "misclassified_hybrid", "retrieval_gallery_i2i"] + [
    f"confusion_{level}_{model}" for level in ("coarse", "fine") for model in ("prototypes", "dino", "hybrid")]
CONTRACT = ("data_path", "output_dir", "clip_model", "dino_model", "dino_weights", "image_size", "epochs", "batch_size",
            "seed", "device")


def run_notebook(out: Path, config: str = "demo.yaml", **overrides):
    """Execute the notebook with a config's parameters (+ overrides) into `out`; returns the executed notebook."""
    params = yaml.safe_load((ROOT / "configs" / config).read_text())
    params.update(output_dir=str(out), **overrides)
    out.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(NOTEBOOK), str(out / "executed.ipynb"), parameters=params, cwd=str(ROOT),
                               progress_bar=False)


def log_of(nb) -> str:
    """Every text a run printed (streams and plain-text results)."""
    return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def cache_files(out: Path) -> dict[Path, int]:
    """Every cache file (embeddings, DINOv2 predictions and features) -> its modification time."""
    return {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.safetensors")}


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo run twice into one output_dir: (output_dir, first metrics, second metrics, first notebook,
    second log, first submissions' bytes, first cache files)."""
    out = tmp_path_factory.mktemp("run")
    first_nb = run_notebook(out)
    first = json.loads((out / "metrics.json").read_text())
    submissions = {name: (out / name).read_bytes() for name, _ in utils.SUBMISSIONS.values()}
    caches = cache_files(out)
    assert {p.parent.name for p in caches} == {"features", "dino"}
    log = log_of(run_notebook(out))
    second = json.loads((out / "metrics.json").read_text())
    return out, first, second, first_nb, log, submissions, caches


def parameters_cell() -> str:
    nb = json.loads(NOTEBOOK.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    return "".join(tagged[0]["source"])


def test_notebook_has_the_parameter_contract():
    src = parameters_cell()
    statements = ast.parse(src).body
    names = [s.target.id for s in statements if isinstance(s, ast.AnnAssign)]
    assert set(CONTRACT) <= set(names)
    assert all(isinstance(s, ast.AnnAssign) for s in statements), "the parameters cell holds typed assignments only"
    for s in statements:
        ast.literal_eval(s.value)  # literals only: anything derived belongs in Setup
    assert all("  # " in line for line in src.splitlines() if line.strip()), "every parameter has a trailing comment"
    nb = json.loads(NOTEBOOK.read_text())
    assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "commit the notebook without outputs"


def test_defaults_are_valid_parameters():
    """The notebook's defaults and the demo / paper configs pass the Setup checks."""
    defaults = {}
    exec(parameters_cell(), {}, defaults)
    utils.check_params({k: v for k, v in defaults.items() if k not in ("device", "dino_weights")})
    for config in ("demo.yaml", "paper.yaml"):
        utils.check_params({**defaults, **yaml.safe_load((ROOT / "configs" / config).read_text()), "device": "cpu"})


def test_code_cells_are_short():
    """The notebook reads like a method section: no code cell but the parameters is over a dozen lines."""
    nb = json.loads(NOTEBOOK.read_text())
    long = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and len(c["source"]) > 12
            and "parameters" not in c["metadata"].get("tags", [])]
    assert not long, f"cells {long} have more than 12 lines"


def test_demo_run_writes_every_result(demo_runs):
    out, metrics, *_ = demo_runs
    params = json.loads((out / "params.json").read_text())
    assert params["data_path"] == "demo" and params["device_resolved"] == "cpu"
    assert (out / "demo_data" / "README_SYNTHETIC.txt").exists() and metrics["synthetic_demo_data"] is True
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 5_000, name
    for key in ("data", "split", "prototypes", "dino", "hybrid", "comparison_fine", "comparison_coarse",
                "per_class_hybrid", "retrieval", "timings_s"):
        assert metrics[key], key
    assert set(metrics["comparison_fine"]) == {"prototypes", "DINOv2", "hybrid", "soft fusion"}
    assert set(metrics["comparison_coarse"]) == {"prototypes (4-way gate)", "DINOv2", "hybrid", "soft fusion"}
    assert 0.0 <= metrics["hybrid"]["threshold"] <= 1.0
    assert abs(metrics["split"]["val_fraction_achieved"] - metrics["split"]["val_fraction_asked"]) < 0.05
    i2i, t2i = metrics["retrieval"]["i2i"], metrics["retrieval"]["t2i"]
    assert {"R@1", "R@1_low", "R@1_high", "R@5", "MRR"} <= set(i2i["table"][0]) and i2i["distractors"] > 0
    assert "held-out pairs" in i2i["chosen_on"]
    embeddings = {row["embedding"] for row in i2i["table"]}
    assert {"biomedclip", "biomedclip tuned", "dinov2", "biomedclip tuned + dinov2 0.5"} <= embeddings
    assert {(row["queries"], row["model"]) for row in t2i["table"]} == {
        (q, m) for q in ("finding lines", "captions (their own image)") for m in ("biomedclip", "biomedclip tuned")}
    assert t2i["model"] in ("biomedclip", "biomedclip tuned") and "held-out finding lines" in t2i["chosen_on"]
    assert metrics["timings_s"]["retrieval_tuning_s"] > 0
    assert len(metrics["val_predictions"]["hybrid"]) == metrics["split"]["val"]
    assert metrics["data"]["retrieval_gallery"]["unlisted"] > 0


def test_demo_submissions_are_valid_and_answer_from_the_whole_test_folder(demo_runs):
    out, *_ = demo_runs
    data = utils.load_entrep(out / "demo_data")
    gallery = utils.retrieval_gallery(data, data.queries, "test_folders")
    utils.check_submission(out / "submission.zip", "track1", data.queries["cls"].file.tolist())
    track2 = utils.check_submission(out / "submission_i2i.zip", "track2", data.queries["i2i"].file.tolist(), gallery.file)
    utils.check_submission(out / "submission_t2i.zip", "track3", data.queries["t2i"].text.tolist(), gallery.file)
    assert set(track2.values()) - set(data.queries["i2i"].file), "some Track 2 answers are images no list names"


def test_saved_notebook_reads_cleanly(demo_runs):
    """One progress bar per long step, ending at 100%, no cursor codes, no warning noise, problems summarised."""
    _, metrics, _, nb, *_ = demo_runs
    text = log_of(nb)
    assert "\x1b[" not in text and "TqdmWarning" not in text and "IProgress" not in text
    training = next(c for c in nb.cells if c.cell_type == "code" and "utils.train_dino(" in c.source)
    bar = [o["text"] for o in training.outputs if o.get("name") == "stderr"]
    epochs = metrics["dino"]["models"]["shared"]["epochs_run"]
    assert len(bar) <= epochs + 4, f"{len(bar)} output chunks for {epochs} epochs"
    last = "".join(bar).rstrip().split("\r")[-1]
    assert f"{epochs}/{epochs}" in last and "100%" in last, last
    assert "PROBLEM [name-case]" not in text and "note [name-case]" in text  # a handled defect is a note


def test_rerun_reuses_caches_and_checkpoint_and_repeats_the_results(demo_runs):
    out, first, second, _, log, submissions, caches = demo_runs
    assert "train_dino: reusing finished run" in log and "train_retrieval: reusing finished run" in log
    assert cache_files(out) == caches  # nothing re-encoded or re-predicted
    assert second["val_predictions"] == first["val_predictions"]
    assert second["hybrid"]["threshold"] == first["hybrid"]["threshold"]
    for name, blob in submissions.items():
        assert (out / name).read_bytes() == blob, name


@pytest.mark.parametrize("seed, same", [(0, True), (1, False)])
def test_fresh_runs_are_deterministic_by_seed(demo_runs, tmp_path, seed, same):
    """From scratch into another folder: the same seed writes the same predictions and submissions on one
    machine (the very same computation); another seed changes them."""
    _, first, *_, submissions, _ = demo_runs
    run_notebook(tmp_path, seed=seed)
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert (again["val_predictions"] == first["val_predictions"]) is same
    assert all(((tmp_path / name).read_bytes() == blob) is same for name, blob in submissions.items())


def test_paper_protocol_trains_four_separate_models(tmp_path):
    """configs/paper.yaml (separate classifiers, plain stratified split, no flips, no TTA) on the demo with
    tiny models: four DINOv2 models, each with its own checkpoint, feed the hybrid and retrieval."""
    run_notebook(tmp_path, "paper.yaml", data_path="demo", clip_model="tiny", dino_model="tiny", dino_weights="",
                 image_size=56, epochs=3, device="cpu", num_workers=0, seed=0)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    models = metrics["dino"]["models"]
    assert sorted(models) == ["coarse", "ear", "nose", "vc"]
    assert {name: m["tasks"] for name, m in models.items()} == {t: [t] for t in ("coarse", "ear", "nose", "vc")}
    assert len({Path(m["checkpoint"]).parent for m in models.values()}) == 4
    assert metrics["split"]["method"] == "stratified" and metrics["params"]["flip_swap"] is False
    assert metrics["params"]["tta_flip"] is False and set(metrics["comparison_fine"]) >= {"DINOv2", "hybrid"}
    embeddings = {row["embedding"] for row in metrics["retrieval"]["i2i"]["table"]}
    assert "dinov2" in embeddings and "biomedclip tuned" not in embeddings  # frozen embeddings, as the paper
    assert (tmp_path / "submission.zip").exists()
