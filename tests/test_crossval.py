"""Cross-validated evaluation (crossval.py, utils.make_folds): every labelled image predicted once, by models
that never saw it nor anything of its content group; choices made on each fold's own choice images; the
fold models averaged for the test; a run stopped mid-way resumes to the same submissions. And the options
it measures: the letterboxed square, same-label mixing, the refit, grouped bootstrap intervals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import crossval
import demo_data
import retrieval
import training
import utils
from runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]


def content_group_of(data: utils.EntrepData) -> dict[str, int]:
    """Each labelled image's content group (identical bytes, i2i partners, one examination)."""
    return dict(zip(data.images["path"], utils.split_groups(data.images, data.i2i)))


# ---- folds ----------------------------------------------------------------------------------------------------

def test_one_fold_is_the_validation_split_as_before(demo_data_set):
    data = demo_data_set
    train, val, how = utils.split_train_val(data.images, data.i2i, 0.15, 0, "grouped")
    folds, said = utils.make_folds(data.images, data.i2i, 1, 0.15, 0, "grouped")
    (fold,) = folds
    assert said == how and fold.name == "validation split"
    assert fold.choose is fold.predict  # choices and figures on the same split: cross-fitted, as before
    assert fold.predict["path"].tolist() == data.images.iloc[val]["path"].tolist()
    assert fold.fit["path"].tolist() == data.images.iloc[train]["path"].tolist()
    excluded = fold.fit["path"].iloc[:3].tolist()
    (fewer,), _ = utils.make_folds(data.images, data.i2i, 1, 0.15, 0, "grouped", excluded)
    assert fewer.fit["path"].tolist() == [p for p in fold.fit["path"] if p not in excluded]


def test_every_image_is_predicted_once_by_a_fold_that_never_saw_its_group(demo_data_set):
    data = demo_data_set
    held = set(data.images["path"].iloc[::7])  # as the retrieval hold-out: predicted, never trained on
    folds, how = utils.make_folds(data.images, data.i2i, 5, 0.15, 0, "grouped", held)
    assert len(folds) == 5 and how.startswith("5 stratified folds")
    sizes = [len(f.predict) for f in folds]
    assert max(sizes) <= 1.6 * min(sizes)  # folds of about equal size
    common = data.images["label_id"].value_counts().index[0]  # stratified: the commonest label in every fold
    assert all((f.predict["label_id"] == common).any() for f in folds)
    predicted = pd.concat([f.predict for f in folds])
    assert sorted(predicted["path"]) == sorted(data.images["path"])  # each labelled image exactly once
    group = content_group_of(data)
    for fold in folds:
        seen = set(fold.fit["path"]) | set(fold.choose["path"])
        assert not seen & set(fold.predict["path"]) and not seen & held
        assert not set(fold.fit["path"]) & set(fold.choose["path"])  # choices on images the models did not fit
        assert not {group[p] for p in seen} & {group[p] for p in fold.predict["path"]}  # not even a twin


def test_too_few_groups_lower_the_folds_and_say_so(demo_data_set):
    images = demo_data_set.images.groupby("label_id").head(2).reset_index(drop=True)  # 2 images per label
    folds, how = utils.make_folds(images, demo_data_set.i2i, 5, 0.15, 0)
    assert 2 <= len(folds) < 5 and f"cv_folds=5 lowered to {len(folds)}" in how
    assert sorted(pd.concat([f.predict for f in folds])["path"]) == sorted(images["path"])
    assert utils.make_folds(images.iloc[:1], demo_data_set.i2i, 5, 0.15, 0)[0] == []  # one image: no folds


# ---- grouped bootstrap -------------------------------------------------------------------------------------

def test_singleton_groups_are_the_plain_bootstrap_and_duplicates_widen_the_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 60)
    p = np.where(rng.random(60) < 0.7, y, rng.integers(0, 7, 60))
    plain = utils.bootstrap_ci(y, p, seed=1)
    pd.testing.assert_frame_equal(plain, utils.bootstrap_ci(y, p, seed=1, groups=np.arange(60)))
    twice, pairs = np.repeat(y, 2), np.repeat(p, 2)  # every image counted twice
    naive = utils.bootstrap_ci(twice, pairs, seed=1)
    grouped = utils.bootstrap_ci(twice, pairs, seed=1, groups=np.repeat(np.arange(60), 2))
    width = lambda ci: ci.loc["accuracy", "high"] - ci.loc["accuracy", "low"]
    assert grouped.loc["accuracy", "estimate"] == naive.loc["accuracy", "estimate"]
    assert width(grouped) > 1.2 * width(naive)  # a twin is not independent evidence
    assert width(grouped) == pytest.approx(width(plain), abs=0.05)
    with pytest.raises(ValueError, match="one per image"):
        utils.bootstrap_ci(y, p, groups=[0, 1])


# ---- the winner's recipe: the letterboxed square, same-label mixing ----------------------------------------

def test_pad_keeps_the_whole_frame_on_black_and_crop_takes_the_centre():
    frame = Image.new("RGB", (64, 48), (200, 100, 50))
    padded, cropped = (np.asarray(utils.to_square(frame, 32, mode)) for mode in ("pad", "crop"))
    assert padded.shape == cropped.shape == (32, 32, 3)
    assert (padded[:4] == 0).all() and (padded[-4:] == 0).all()  # 64x48 -> 32x24 between two black bars
    assert (padded[12, :] == (200, 100, 50)).all() and (cropped == (200, 100, 50)).all()
    with pytest.raises(ValueError, match="resize='stretch'"):
        utils.to_square(frame, 32, "stretch")


def test_a_padded_clip_reads_other_pixels_under_another_cache_key(tiny_clip, tmp_path):
    frame = tmp_path / "f.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 96, 3), dtype=np.uint8)).save(frame)
    padded = utils.square_clip(tiny_clip, "pad")
    assert utils.square_clip(tiny_clip, "crop") is tiny_clip
    assert "PadToSquare" in utils.transform_id(padded.preprocess)
    rt = Runtime(progress=False, cache_dir=tmp_path / "cache")
    a, b = utils.embed_images(tiny_clip, [frame], rt), utils.embed_images(padded, [frame], rt)
    assert not torch.allclose(a, b)
    assert len(list((tmp_path / "cache" / "features").glob("clip_*.safetensors"))) == 2


@pytest.fixture(scope="module")
def tiny_clip():
    return utils.load_clip("tiny")


def test_same_label_mixing_only_mixes_images_of_one_label():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 0, 0, 5, 5, 6, 1, 1])
    assert training.same_label_mix(x, y, "off") is x
    assert torch.equal(training.same_label_mix(x, y, "mixup", p=0.0), x)
    mixed = training.same_label_mix(x, y, "mixup", p=1.0)
    assert torch.equal(mixed[5], x[5])  # the only image of its label has no partner
    for i in range(8):  # a convex blend of images of its own label, never of another
        same = x[y == y[i]]
        coef = torch.linalg.lstsq(same.flatten(1).T, mixed[i].flatten()[:, None]).solution.flatten()
        assert torch.allclose(same.flatten(1).T @ coef, mixed[i].flatten(), atol=1e-4)
        assert coef.min() > -1e-4 and coef.sum() == pytest.approx(1.0, abs=1e-3)
    cut = training.same_label_mix(x, y, "cutmix", p=1.0)
    for i in range(8):  # every pixel is its own or a same-label partner's
        partners = torch.nonzero(y == y[i]).flatten()
        assert all(((cut[i] == x[j]).all(0) | (cut[i] == x[i]).all(0)).any() for j in partners)
    torch.manual_seed(3)
    again = training.same_label_mix(x, y, "cutmix", p=1.0)
    torch.manual_seed(3)
    assert torch.equal(again, training.same_label_mix(x, y, "cutmix", p=1.0))  # the epoch's seed decides


def test_mixing_and_the_square_are_part_of_a_runs_identity():
    cfg = training.DinoConfig(epochs=1)
    assert cfg.mix == "off" and cfg.resize == "crop"  # the defaults change nothing
    assert training.DinoConfig(epochs=1, mix="cutmix") != cfg and training.DinoConfig(epochs=1, resize="pad") != cfg


# ---- fusion per fold, out-of-fold table, ensemble ------------------------------------------------------------

def _outputs(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    coarse = rng.dirichlet(np.ones(4), n)
    return {"proto_coarse": coarse, "proto_fine": rng.dirichlet(np.ones(7), n),
            "dino": {"coarse": rng.dirichlet(np.ones(4), n), **{t: rng.random(n) for t in ("ear", "nose", "vc")}}}


def _fold(name: str, images: pd.DataFrame, choose: slice, predict: slice, same: bool = False) -> utils.Fold:
    rows = images.iloc[predict].reset_index(drop=True)
    return utils.Fold(name, images.iloc[:0], rows if same else images.iloc[choose].reset_index(drop=True), rows)


def test_a_fold_predicts_its_images_with_the_threshold_chosen_on_its_choice_images(demo_data_set):
    images = demo_data_set.images
    fold = _fold("fold 1 of 2", images, slice(0, 40), slice(40, 70))
    choose, predict = _outputs(40, 0), _outputs(30, 1)
    result = crossval.fit_fold_fusion(fold, choose, predict, demo_data_set.i2i, 0)
    expected, fell_back = utils.hybrid_predict(predict["proto_coarse"], predict["dino"], result.hybrid.chosen)
    assert np.array_equal(result.pred["hybrid"], expected) and np.array_equal(result.fell_back, fell_back)
    assert np.array_equal(result.pred["prototypes"], predict["proto_fine"].argmax(1))
    assert list(result.pred) == list(crossval.MODELS)
    one = _fold("validation split", images, slice(0, 0), slice(0, 40), same=True)
    single = crossval.fit_fold_fusion(one, choose, choose, demo_data_set.i2i, 0)
    assert np.array_equal(single.pred["hybrid"], single.hybrid.oof_pred)  # cross-fitted on the split


def test_out_of_fold_table_holds_every_folds_predictions_in_order(demo_data_set):
    images, i2i = demo_data_set.images, demo_data_set.i2i
    folds = [_fold("fold 1 of 2", images, slice(0, 30), slice(30, 50)),
             _fold("fold 2 of 2", images, slice(0, 30), slice(50, 75))]
    results = [crossval.fit_fold_fusion(f, _outputs(30, 0), _outputs(20 if i == 0 else 25, i + 1), i2i, 0)
               for i, f in enumerate(folds)]
    oof, outputs = crossval.out_of_fold(folds, results)
    assert oof["path"].tolist() == images["path"].iloc[30:75].tolist() and len(outputs["proto_coarse"]) == 45
    assert oof["fold"].tolist() == ["fold 1 of 2"] * 20 + ["fold 2 of 2"] * 25
    assert np.array_equal(oof["true"], images["label_id"].iloc[30:75])
    csv = crossval.oof_csv(oof)
    assert list(csv.columns) == ["image", "fold", "true", *crossval.MODELS] and csv["true"].isin(utils.LABELS).all()
    scores = crossval.per_fold_scores(oof)
    assert list(scores) == ["fold 1 of 2", "fold 2 of 2"] and set(scores["fold 1 of 2"]) == set(crossval.MODELS)


class _Fixed:
    """A prototype classifier stub with fixed probabilities."""

    def __init__(self, probs):
        self.probs = torch.tensor(probs, dtype=torch.float32)

    def predict_proba(self, feats):
        return self.probs


def test_the_test_ensemble_averages_every_folds_outputs(monkeypatch):
    dino = [{"coarse": np.array([[1.0, 0, 0, 0]]), "ear": np.array([0.2])},
            {"coarse": np.array([[0, 1.0, 0, 0]]), "ear": np.array([0.6])}]
    calls = iter(dino)
    monkeypatch.setattr(crossval, "predict_dino", lambda *a, **k: next(calls))
    protos = [{"coarse": _Fixed([[0.5, 0.5, 0, 0]])}, {"coarse": _Fixed([[0, 0, 1.0, 0]])}]
    feats = utils.FeatureTable(["a.png"], torch.zeros(1, 4))
    mean, table = crossval.ensemble_outputs(protos, [[], []], ["a.png"], feats, Runtime(), None, crossval.Reading())
    assert np.allclose(mean["proto_coarse"], [[0.25, 0.25, 0.5, 0]]) and np.allclose(mean["dino"]["ear"], [0.4])
    assert table["source"].tolist() == ["prototypes 1", "prototypes 2", "DINOv2 1", "DINOv2 2"]
    assert table.loc[3, "p_ear-right"] == pytest.approx(0.6)  # each fold's own, for blending


def test_the_ensembles_gain_is_scored_on_held_images_with_a_threshold_chosen_without_them(demo_data_set):
    """Rows 0-1 are held out: their own fold models got both wrong, the averaged DINOv2 gets both right, the
    averaged prototypes are wrong at confidence 0.8. The ensemble's threshold comes from rows 2-5 only."""
    ear_l, nose_l, ear_r, nose_r = (utils.LABEL_TO_ID[n] for n in ("ear-left", "nose-left", "ear-right", "nose-right"))
    oof = pd.DataFrame({"fold": ["f1", "f2"] * 3, "true": [ear_l, nose_l] * 3,
                        "DINOv2": [ear_r, nose_r, ear_l, nose_l, ear_l, nose_l], "hybrid": [ear_r, nose_r] * 3})
    coarse = lambda region, p: [p if r == region else (1 - p) / 3 for r in range(4)]  # (ear, nose, vc, throat)
    heads = lambda n: {"ear": np.zeros(n), "nose": np.zeros(n), "vc": np.zeros(n)}  # the first (left) labels
    right = [coarse(0, 1.0), coarse(1, 1.0)]
    outputs = {"proto_coarse": np.array([coarse(1, 0.7), coarse(0, 0.7), *right, *right]),  # wrong on 0-1 at 0.7
               "dino": {"coarse": np.array(right * 3), **heads(6)}}
    held = np.array([True, True, False, False, False, False])
    ensemble = {"proto_coarse": np.array([coarse(1, 0.8), coarse(0, 0.8)]), "dino": {"coarse": np.array(right),
                                                                                       **heads(2)}}
    gain = crossval.ensemble_gain(oof, outputs, held, ensemble, 0)
    assert gain.index.tolist() == ["DINOv2, one fold model", "DINOv2, fold ensemble", "hybrid, one fold model",
                                   "hybrid, fold ensemble"]
    # rows 2-5 tie every threshold (0.5 chosen): the ensemble trusts its wrong prototypes. Rows 0-1 would have
    # asked for a threshold above 0.7 and so fallen back to DINOv2: they must not take part.
    assert gain["accuracy"].tolist() == [0.0, 1.0, 0.0, 0.0]
    outputs["proto_coarse"][2:] = np.array([coarse(1, 0.8), coarse(0, 0.8)] * 2)  # wrong on rows 2-5 at 0.8
    assert crossval.ensemble_gain(oof, outputs, held, ensemble, 0)["accuracy"].tolist() == [0.0, 1.0, 0.0, 1.0]


# ---- the refit -------------------------------------------------------------------------------------------------

def test_refit_trains_every_image_for_the_folds_median_best_epoch_and_keeps_its_last(tmp_path, demo_data_set):
    images = demo_data_set.images.iloc[:24].reset_index(drop=True)
    history = lambda best: pd.DataFrame({"val_score": [0.1 * (i == best - 1) for i in range(6)]})
    tiny = lambda tasks: utils.DinoClassifier(utils.build_dino("tiny", "", 28), tasks)
    folds = [{"shared": utils.Trained(tiny(tuple(utils.DINO_TASKS)), tmp_path, history(b), "")} for b in (2, 3, 5)]
    cfg = training.DinoConfig(epochs=20, batch_size=8, lr_head=0.01, lr_backbone=0.001)
    refit = training.refit_dino(folds, images, cfg, Runtime(checkpoint_dir=tmp_path / "ck", progress=False), tiny)
    run = refit["shared"]
    assert len(run.history) == 3 and "val_score" not in run.history  # median best epoch, nothing to evaluate
    assert run.path.parent.name.startswith("dino_shared_refit_") and run.finished
    assert {p.name for p in run.path.parent.iterdir()} == {"config.json", "best.pt", "done.json"}


# ---- a cross-validated notebook run, stopped in fold 3 and resumed ---------------------------------------------

CV_PARAMS = {"clip_model": "tiny", "dino_model": "tiny", "dino_weights": "", "image_size": 56, "epochs": 3,
             "batch_size": 16, "seed": 0, "device": "cpu", "val_fraction": 0.15, "num_workers": 0, "cv_folds": 5,
             "lr_head": 0.005, "lr_backbone": 0.002, "retrieval_tuning": "off", "internet": "off"}


def papermill(out: Path, data_root: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    args = [a for k, v in {**CV_PARAMS, "data_path": str(data_root), "output_dir": str(out)}.items()
            for a in ("-p", k, str(v))]
    return subprocess.Popen([sys.executable, "-m", "papermill", str(ROOT / "entrep-prototypical.ipynb"),
                             str(out / "executed.ipynb"), *args, "--cwd", str(ROOT), "--no-progress-bar"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def finished_dino_runs(out: Path) -> int:
    return len(list((out / "checkpoints").glob("dino_shared_*/done.json")))


@pytest.fixture(scope="module")
def cv_runs(tmp_path_factory):
    """The smallest data that exercises cross-validation: one uninterrupted cv_folds=5 run, and one killed
    after fold 2's run has finished, then run again into the same output_dir."""
    base = tmp_path_factory.mktemp("cv")
    data_root = demo_data.make_demo_dataset(base / "data", seed=3, n_train=60, n_public=20, n_test=12,
                                            n_i2i_pairs=10, n_t2i=10, n_unlisted=6)
    whole = papermill(base / "whole", data_root)
    stopped = papermill(base / "stopped", data_root)
    deadline = time.time() + 900
    while finished_dino_runs(base / "stopped") < 2 and stopped.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(stopped.pid, signal.SIGKILL)  # the session ends during fold 3
    stopped.wait()
    killed_after = finished_dino_runs(base / "stopped")
    assert whole.wait(timeout=900) == 0, whole.stderr.read().decode()[-3000:]
    resumed = papermill(base / "stopped", data_root)
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read().decode()[-3000:]
    return base, data_root, killed_after


def test_every_labelled_image_has_one_out_of_fold_prediction_by_models_that_never_saw_it(cv_runs):
    base, data_root, _ = cv_runs
    out, data = base / "whole", utils.load_entrep(data_root)
    metrics = json.loads((out / "metrics.json").read_text())
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert sorted(oof["image"]) == sorted(data.images["file"]) and oof["image"].is_unique
    assert list(oof.columns) == ["image", "fold", "true", *crossval.MODELS] and oof["fold"].nunique() == 5
    assert metrics["folds"]["folds"] == 5 and len(metrics["val_predictions"]["file"]) == len(data.images)
    group_of_file = {Path(p).name: g for p, g in content_group_of(data).items()}
    groups_of_sha1 = {}
    for path, group in content_group_of(data).items():
        groups_of_sha1.setdefault(data.sha1[path], set()).add(group)
    for name, model in metrics["dino"]["models"].items():  # each fold's DINOv2 run, from its own config.json
        fold = name.split(", ", 1)[1]
        identity = json.loads((Path(model["checkpoint"]).parent / "config.json").read_text())
        trained_groups = set().union(*(groups_of_sha1[sha] for sha, _ in identity["train"] + identity["val"]))
        predicted = {group_of_file[f] for f in oof.loc[oof["fold"] == fold, "image"]}
        assert not trained_groups & predicted, f"{fold}: a model predicted an image of a group it trained on"
    held = set(retrieval.held_out_images(data, *(data.images.iloc[ix]["path"] for ix in utils.split_train_val(
        data.images, data.i2i, 0.15, 0, "grouped")[:2])))
    held_sha1 = {data.sha1[p] for p in held if p in data.sha1}
    for model in metrics["dino"]["models"].values():  # the retrieval hold-out: never trained on, in any fold
        identity = json.loads((Path(model["checkpoint"]).parent / "config.json").read_text())
        assert not {sha for sha, _ in identity["train"] + identity["val"]} & held_sha1


def test_figures_and_tables_come_from_the_out_of_fold_predictions(cv_runs):
    out = cv_runs[0] / "whole"
    metrics = json.loads((out / "metrics.json").read_text())
    oof = pd.read_csv(out / "oof_predictions.csv")
    hybrid = metrics["comparison_fine"]["hybrid"]
    assert hybrid["accuracy"] == pytest.approx((oof["hybrid"] == oof["true"]).mean())
    assert hybrid["accuracy_low"] <= hybrid["accuracy"] <= hybrid["accuracy_high"]
    assert set(metrics["per_fold"]) == set(oof["fold"]) and len(metrics["hybrid"]["threshold_per_fold"]) == 5
    assert metrics["hybrid"]["selection"] == "chosen in each of 5 folds on its choice images"
    probs = pd.read_csv(out / "test_probabilities.csv")
    assert set(probs["source"]) == {f"{m} {i}" for m in ("prototypes", "DINOv2") for i in range(1, 6)}
    gain = metrics["ensemble_gain"]  # on the retrieval hold-out's labelled images, which no fold model saw
    assert 0 < gain["n"] < len(oof) and gain["table"]["hybrid, one fold model"]["accuracy"] >= 0


def test_a_run_stopped_in_fold_3_resumes_to_the_submissions_of_an_uninterrupted_run(cv_runs):
    base, _, killed_after = cv_runs
    assert 2 <= killed_after < 5  # it was stopped part-way through the folds
    for name, _ in utils.SUBMISSIONS.values():
        assert (base / "stopped" / name).read_bytes() == (base / "whole" / name).read_bytes(), name
    log = (base / "stopped" / "executed.ipynb").read_text()
    assert log.count("reusing finished run") >= killed_after  # the finished folds were not trained again
