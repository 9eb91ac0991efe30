"""End to end: the notebook runs top to bottom under papermill on the demo data (offline, CPU), writes
every result, reads cleanly when saved, and a rerun with the same parameters reuses its caches and
checkpoints. The paper's protocol (configs/paper.yaml) runs too, with four separately trained models.

Layout (training.RunFolder): each training run in output_dir/checkpoints/<kind>_<id>/, a finished one holding
config.json, best.pt and done.json (last.pt only while unfinished); caches in output_dir/cache/features
(BiomedCLIP) and output_dir/cache/dino (DINOv2 probabilities and features)."""

import ast
import json
from pathlib import Path

import papermill as pm
import pytest
import yaml

import preflight
import retrieval
import utils

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "entrep-prototypical.ipynb"
FINISHED_RUN = ["best.pt", "config.json", "done.json"]  # a finished run's folder: no last.pt
FIGURES = ["samples_per_class", "embedding_projection_clip", "learning_curve_dino_shared", "threshold_sweep",
           "misclassified_hybrid", "retrieval_gallery_i2i"] + [
    f"confusion_{level}_{model}" for level in ("coarse", "fine") for model in ("prototypes", "dino", "hybrid")]
FAST = dict(epochs=2, image_size=42, retrieval_epochs=2)  # tiny models, few epochs: runs that test the plumbing
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


def progress_texts(cell) -> list[str]:
    """What a cell's progress bars wrote: stderr chunks (tqdm outside a kernel) and text-only display outputs
    (runtime.progress in a kernel: one display output, updated in place)."""
    return [o["text"] if o.get("output_type") == "stream" else o["data"]["text/plain"] for o in cell.outputs
            if o.get("name") == "stderr"
            or (o.get("output_type") == "display_data" and set(o["data"]) == {"text/plain"})]


def cache_files(out: Path) -> dict[Path, int]:
    """Every cache file (embeddings, DINOv2 predictions and features) -> its modification time."""
    return {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.safetensors")}


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, full_demo):
    """The demo run twice into one output_dir: (output_dir, first metrics, second metrics, first notebook,
    second log, first submissions' bytes, first cache files)."""
    out = tmp_path_factory.mktemp("run")
    full_demo(out)
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
    assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), \
        "commit the notebook without outputs"


def test_defaults_are_valid_parameters():
    """The notebook's defaults and the demo / paper configs pass the Setup checks."""
    defaults = {}
    exec(parameters_cell(), {}, defaults)
    preflight.check_params({k: v for k, v in defaults.items() if k not in ("device", "dino_weights")})
    for config in ("demo.yaml", "paper.yaml"):
        preflight.check_params({**defaults, **yaml.safe_load((ROOT / "configs" / config).read_text()), "device": "cpu"})


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
                "per_class_hybrid", "retrieval", "stages", "total_s"):
        assert metrics[key], key
    assert set(metrics["comparison_fine"]) == {"prototypes", "DINOv2", "hybrid", "soft fusion"}
    assert set(metrics["comparison_coarse"]) == {"prototypes (4-way gate)", "DINOv2", "hybrid", "soft fusion"}
    assert 0.0 <= metrics["hybrid"]["threshold"] <= 1.0
    assert abs(metrics["split"]["val_fraction_achieved"] - metrics["split"]["val_fraction_asked"]) < 0.05
    i2i, t2i = metrics["retrieval"]["i2i"], metrics["retrieval"]["t2i"]
    for track in (i2i, t2i):  # the selection procedure's figures, out of fold, on enough held-out queries
        block = track["selection"]
        assert block["n"] >= retrieval.MIN_SELECTION_QUERIES and "4 of 5 folds" in block["how"]
        assert block["R@1_low"] <= block["R@1"] <= block["R@1_high"] and "MRR" in block and block["chosen"]
        assert len(block["per_fold"]) == 5 and track["gallery"]["images"] > track["gallery"]["queries"] == block["n"]
    assert i2i["gallery"]["ratio"] == pytest.approx(i2i["gallery"]["test_ratio"], abs=0.05)  # the test's per query
    procedure = "full procedure (out of fold)"
    assert {row["setting"] for row in i2i["table"]} == {"biomedclip tuned", "biomedclip", "dinov2", procedure}
    subsets = ("all held-out queries", "finding lines, unseen", "finding lines, seen", "captions (their own image)")
    assert {(row["setting"], row["queries"]) for row in t2i["table"]} == {
        (s, q) for s in ("biomedclip tuned", "biomedclip", procedure) for q in subsets}
    assert metrics["stages"]["retrieval fine-tuning"]["seconds"] > 0  # runtime.Stages: the tuning and its embedding
    assert len(metrics["val_predictions"]["hybrid"]) == metrics["data"]["labelled"]  # every image, out of fold
    assert metrics["folds"]["folds"] == 3 and "3 stratified folds" in metrics["folds"]["how"]  # the demo's
    assert metrics["data"]["retrieval_gallery"]["unlisted"] > 0


def test_demo_submissions_are_valid_and_answer_from_the_whole_test_folder(demo_runs):
    out, *_ = demo_runs
    data = utils.load_entrep(out / "demo_data")
    gallery = retrieval.gallery_images(data, data.queries, "test_folders")
    utils.check_submission(out / "submission.zip", "track1", data.queries["cls"].file.tolist())
    track2 = utils.check_submission(out / "submission_i2i.zip", "track2", data.queries["i2i"].file.tolist(),
                                    gallery.file)
    utils.check_submission(out / "submission_t2i.zip", "track3", data.queries["t2i"].text.tolist(), gallery.file)
    assert set(track2.values()) - set(data.queries["i2i"].file), "some Track 2 answers are images no list names"


def test_saved_notebook_reads_cleanly(demo_runs):
    """One progress bar per long step, ending at 100%, no cursor codes, no warning noise, problems summarised."""
    _, metrics, _, nb, *_ = demo_runs
    text = log_of(nb)
    assert "\x1b[" not in text and "TqdmWarning" not in text and "IProgress" not in text
    cell = next(c for c in nb.cells if c.cell_type == "code" and "training.train_dino(" in c.source)
    bar = progress_texts(cell)
    epochs = [model["epochs_run"] for model in metrics["dino"]["models"].values()]  # one training loop per fold
    assert len(bar) == len(epochs), f"{len(bar)} outputs for {len(epochs)} training loops"  # one line per loop
    assert all(f"{n}/{n}" in line and "100%" in line for n, line in zip(epochs, bar)), bar
    embedding = next(c for c in nb.cells if c.cell_type == "code" and "utils.embed_images(clip" in c.source)
    assert len(progress_texts(embedding)) <= 1
    assert "PROBLEM [name-case]" not in text and "note [name-case]" in text  # a handled defect is a note


def test_the_saved_notebook_ends_with_the_run_report(demo_runs):
    """The last cell: validation scores with intervals, the frozen choices, time and memory per stage, disk used
    and the first rows of each submission."""
    out, metrics, _, nb, *_ = demo_runs
    report = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "Validation, 7 classes (95% bootstrap intervals):" in report and "hybrid" in report
    assert f"hybrid threshold {metrics['hybrid']['threshold']}" in report
    assert all(stage in report for stage in metrics["stages"]) and "output_dir holds" in report
    for zip_name, _ in utils.SUBMISSIONS.values():
        assert f"{zip_name} (" in report
    assert metrics["disk_used_bytes"] > 0 and metrics["params"]["disk"]["planned_total"] > 0


def test_a_parameter_of_the_wrong_type_stops_setup_naming_it(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r"epochs='many': use a whole number"):
        run_notebook(tmp_path, epochs="many")
    nb = json.loads((tmp_path / "executed.ipynb").read_text())
    failed = next(c for c in nb["cells"] if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    assert "preflight.check_params" in "".join(failed["source"])  # Setup, before any work
    assert not (tmp_path / "cache").exists()


def test_rerun_reuses_caches_and_checkpoint_and_repeats_the_results(demo_runs):
    out, first, second, _, log, submissions, caches = demo_runs
    assert log.count("dino_shared: reusing finished run") == len(first["dino"]["models"])  # every fold's
    assert "retrieval: reusing finished run" in log
    runs = sorted((out / "checkpoints").iterdir())  # the DINOv2 run and the retrieval run, both finished
    assert sorted(run.name.rsplit("_", 1)[0] for run in runs) == sorted(
        ["retrieval", *(f"dino_{name.split(',')[0]}" for name in first["dino"]["models"])])
    assert all(sorted(f.name for f in run.iterdir()) == FINISHED_RUN for run in runs)
    assert {Path(m["checkpoint"]) for m in second["dino"]["models"].values()} <= {run / "best.pt" for run in runs}
    assert cache_files(out) == caches  # nothing re-encoded or re-predicted
    assert second["val_predictions"] == first["val_predictions"]
    assert second["hybrid"]["threshold"] == first["hybrid"]["threshold"]
    for name, blob in submissions.items():
        assert (out / name).read_bytes() == blob, name


def test_fresh_runs_are_deterministic_by_seed(full_demo, tmp_path):
    """From scratch into other folders, with short training (FAST: the same code paths, the demo's folds and
    out-of-fold retrieval choice): the same seed writes the same predictions and submissions on one machine
    (the very same computation); another seed changes them (and draws its own demo set in the notebook)."""
    runs = {}
    for name, seed in (("first", 0), ("again", 0), ("other seed", 1)):
        if seed == 0:
            full_demo(tmp_path / name)
        run_notebook(tmp_path / name, seed=seed, **FAST)
        runs[name] = (json.loads((tmp_path / name / "metrics.json").read_text())["val_predictions"],
                      [(tmp_path / name / file).read_bytes() for file, _ in utils.SUBMISSIONS.values()])
    assert runs["again"] == runs["first"]
    assert runs["other seed"][0] != runs["first"][0]
    assert all(a != b for a, b in zip(runs["other seed"][1], runs["first"][1]))


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
    for m in models.values():  # each a finished run of its own: best.pt, config.json, done.json
        assert sorted(f.name for f in Path(m["checkpoint"]).parent.iterdir()) == FINISHED_RUN
    assert metrics["split"]["method"] == "stratified" and metrics["params"]["flip_swap"] is False
    assert metrics["params"]["tta_flip"] is False and set(metrics["comparison_fine"]) >= {"DINOv2", "hybrid"}
    settings = {row["setting"] for row in metrics["retrieval"]["i2i"]["table"]}
    assert "dinov2" in settings and "biomedclip tuned" not in settings  # frozen embeddings, as the paper
    assert (tmp_path / "submission.zip").exists()
    first = {Path(m["checkpoint"]).parent for m in models.values()}
    log = log_of(run_notebook(tmp_path, "paper.yaml", data_path="demo", clip_model="tiny", dino_model="tiny",
                              dino_weights="", image_size=56, epochs=2, device="cpu", num_workers=0, seed=0,
                              keep_runs=1))
    models = json.loads((tmp_path / "metrics.json").read_text())["dino"]["models"]
    again = {Path(m["checkpoint"]).parent for m in models.values()}
    runs = set((tmp_path / "checkpoints").iterdir())
    assert again <= runs and len(runs - again) == 1 and (runs - again) <= first  # keep_runs=1 earlier run folder
    assert log.count("pruned ") == 3 and "keep_runs=1" in log
    assert all(len(list(run.glob("*.pt"))) == 1 for run in runs)  # one weights file per finished run
