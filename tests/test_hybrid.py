"""Tests for the hybrid part: fusion rules, validation-only choice, metrics, plots, submissions."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from utils import COARSE_CLASSES, COARSE_TO_ID, LABEL_TO_ID, LABELS
from utils import (
    TRACK1_JSON,
    TRACK2_JSON,
    TRACK3_JSON,
    batched_classification_scores,
    best_grid_value,
    bootstrap_ci,
    branch_accuracy,
    choose_threshold_cv,
    choose_weight_cv,
    classification_table,
    coarse_of,
    coarse_to_label7,
    comparison_table,
    hybrid_predict,
    plot_confusion,
    plot_misclassified_grid,
    plot_threshold_sweep,
    read_submission_zip,
    soft_fusion_predict,
    stratified_fold_ids,
    summary_metrics,
    validate_track1,
    validate_track2,
    validate_track3,
    write_submission_zip,
    write_track1,
    write_track2,
    write_track3,
)

EAR, NOSE, VC, THROAT = (COARSE_TO_ID[c] for c in ("ear", "nose", "vc", "throat"))


def one_hot_probs(coarse_ids, confidence):
    """(N, 4) probabilities: `confidence` on the given region, the rest spread evenly."""
    coarse_ids, confidence = np.asarray(coarse_ids), np.broadcast_to(np.asarray(confidence, float), (len(coarse_ids),))
    probs = np.repeat(((1 - confidence) / 3)[:, None], 4, axis=1)
    probs[np.arange(len(coarse_ids)), coarse_ids] = confidence
    return probs


def random_fusion_inputs(n, seed):
    """Validation-like arrays where confident prototypes are right and DINOv2 is usually right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n)
    true_coarse = coarse_of(y)
    conf = rng.uniform(0.3, 1.0, n)
    proto_coarse = np.where(rng.uniform(size=n) < conf, true_coarse, rng.integers(0, 4, n))
    dino_coarse = np.where(rng.uniform(size=n) < 0.85, true_coarse, rng.integers(0, 4, n))
    second = {"ear": LABEL_TO_ID["ear-right"], "nose": LABEL_TO_ID["nose-right"], "vc": LABEL_TO_ID["vc-closed"]}
    fine = {region: np.where(y == sid, 0.8, 0.2) for region, sid in second.items()}
    return one_hot_probs(proto_coarse, conf), one_hot_probs(dino_coarse, 0.7), fine, y


# ---------------------------------------------------------------------------------------------
# Hybrid rule
# ---------------------------------------------------------------------------------------------


def test_coarse_to_label7_uses_the_fine_decision_per_region_and_none_for_throat():
    coarse = [EAR, EAR, NOSE, NOSE, VC, VC, THROAT, EAR]
    p = np.array([0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.5])  # last: exactly 0.5 -> first label
    fine = {"ear": p, "nose": p, "vc": p}
    got = [LABELS[i] for i in coarse_to_label7(coarse, fine)]
    assert got == ["ear-right", "ear-left", "nose-right", "nose-left", "vc-closed", "vc-open", "throat", "ear-left"]


def test_hybrid_uses_prototype_at_exactly_the_threshold_and_dinov2_just_below():
    proto = np.array([[0.6, 0.2, 0.1, 0.1], [0.5999, 0.2001, 0.1, 0.1]])  # both say ear
    dino = one_hot_probs([NOSE, NOSE], 0.9)
    fine = {"ear": [0.9, 0.9], "nose": [0.1, 0.1], "vc": [0.5, 0.5]}
    labels, used_fallback = hybrid_predict(proto, dino, fine, threshold=0.6)
    assert used_fallback.tolist() == [False, True]
    assert [LABELS[i] for i in labels] == ["ear-right", "nose-left"]


def test_hybrid_throat_ignores_fine_probabilities():
    proto = one_hot_probs([THROAT, THROAT], 0.95)
    fine = {"ear": [0.99, 0.01], "nose": [0.99, 0.01], "vc": [0.99, 0.01]}
    labels, used_fallback = hybrid_predict(proto, one_hot_probs([EAR, VC], 0.9), fine, threshold=0.5)
    assert labels.tolist() == [LABEL_TO_ID["throat"]] * 2 and not used_fallback.any()


def test_hybrid_threshold_above_one_always_falls_back_and_zero_never_does():
    proto, dino, fine, _ = random_fusion_inputs(50, seed=1)
    all_dino, fell_all = hybrid_predict(proto, dino, fine, threshold=1.01)
    all_proto, fell_none = hybrid_predict(proto, dino, fine, threshold=0.0)
    assert fell_all.all() and not fell_none.any()
    assert np.array_equal(all_dino, coarse_to_label7(dino.argmax(1), fine))
    assert np.array_equal(all_proto, coarse_to_label7(proto.argmax(1), fine))


def test_soft_fusion_extremes_equal_single_models_and_middle_averages():
    proto, dino, fine, _ = random_fusion_inputs(40, seed=2)
    assert np.array_equal(soft_fusion_predict(proto, dino, fine, 1.0), hybrid_predict(proto, dino, fine, 0.0)[0])
    assert np.array_equal(soft_fusion_predict(proto, dino, fine, 0.0), hybrid_predict(proto, dino, fine, 2.0)[0])
    p = np.array([[0.5, 0.4, 0.05, 0.05]])  # ear by a little
    d = np.array([[0.1, 0.8, 0.05, 0.05]])  # nose by a lot -> the average says nose
    f = {"ear": [0.9], "nose": [0.9], "vc": [0.9]}
    assert LABELS[soft_fusion_predict(p, d, f, 0.5)[0]] == "nose-right"
    with pytest.raises(ValueError, match="weight"):
        soft_fusion_predict(p, d, f, 1.5)


def test_bad_inputs_raise_errors_that_say_what_to_pass():
    proto = one_hot_probs([EAR], 0.9)
    with pytest.raises(ValueError, match="'vc'"):
        hybrid_predict(proto, proto, {"ear": [0.9], "nose": [0.9]}, 0.5)
    with pytest.raises(ValueError, match="COARSE_CLASSES"):
        hybrid_predict(np.ones((1, 7)) / 7, proto, {"ear": [0.9], "nose": [0.9], "vc": [0.9]}, 0.5)


# ---------------------------------------------------------------------------------------------
# Choosing on validation
# ---------------------------------------------------------------------------------------------


def test_threshold_choice_finds_the_separating_plateau_and_takes_its_middle():
    # Prototypes are right when conf >= 0.7 and wrong when <= 0.5; DINOv2 is the reverse, so every
    # threshold in (0.5, 0.7] is perfect: grid {0.55, 0.6, 0.65, 0.7} -> tie rule picks 0.65.
    y_coarse = np.array([EAR, NOSE, VC, THROAT] * 10)
    conf = np.tile([0.9, 0.8, 0.7, 0.75, 0.4, 0.5, 0.45, 0.3], 5)
    proto_right = conf >= 0.7
    wrong = (y_coarse + 1) % 4
    proto = one_hot_probs(np.where(proto_right, y_coarse, wrong), conf)
    dino = one_hot_probs(np.where(proto_right, wrong, y_coarse), 0.8)
    y = coarse_to_label7(y_coarse, {r: np.full(40, 0.9) for r in ("ear", "nose", "vc")})
    fine = {r: np.full(40, 0.9) for r in ("ear", "nose", "vc")}
    choice = choose_threshold_cv(proto, dino, fine, y, grid=np.round(np.arange(0, 1.0001, 0.05), 2), n_splits=4)
    assert choice.chosen == pytest.approx(0.65)
    assert all(0.5 < v <= 0.7 for v in choice.fold_values)
    assert np.array_equal(choice.oof_pred, y)  # perfect out of fold too
    perfect = choice.sweep[choice.sweep["macro_f1"] == 1.0]["threshold"]
    assert perfect.tolist() == pytest.approx([0.55, 0.6, 0.65, 0.7])


def test_best_grid_value_tie_rule():
    grid = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert best_grid_value(grid, [0.5, 0.9, 0.9, 0.9, 0.2], [0.5] * 5) == 0.3  # middle of 3
    assert best_grid_value(grid, [0.9, 0.9, 0.9, 0.9, 0.2], [0.5] * 5) == 0.3  # upper middle of 4
    assert best_grid_value(grid, [0.9, 0.9, 0.9, 0.9, 0.2], [0.5, 0.6, 0.5, 0.5, 0.5]) == 0.2  # accuracy breaks it


def test_chosen_threshold_depends_only_on_validation_data():
    val = random_fusion_inputs(120, seed=3)
    val_copies = [np.copy(a) if not isinstance(a, dict) else {k: v.copy() for k, v in a.items()} for a in val]
    first = choose_threshold_cv(*val, seed=0)
    test_a, test_b = random_fusion_inputs(60, seed=4), random_fusion_inputs(60, seed=5)
    pred_a, _ = hybrid_predict(*test_a[:3], first.chosen)
    pred_b, _ = hybrid_predict(*test_b[:3], first.chosen)
    second = choose_threshold_cv(*val, seed=0)  # after predicting two different test sets
    assert second.chosen == first.chosen and second.fold_values == first.fold_values
    assert np.array_equal(second.oof_pred, first.oof_pred)
    assert not np.array_equal(pred_a, pred_b)  # the test sets really differed
    for before, after in zip(val_copies[:2] + val_copies[3:], val[:2] + val[3:]):
        assert np.array_equal(before, after)  # inputs are not modified


def test_out_of_fold_predictions_never_use_the_folds_own_labels():
    proto, dino, fine, y = random_fusion_inputs(150, seed=6)
    choice = choose_threshold_cv(proto, dino, fine, y, n_splits=5, seed=1)
    for k in range(5):
        in_k = choice.fold_of == k
        y_mutated = y.copy()
        y_mutated[in_k] = (y[in_k] + 3) % 7  # every label of fold k changes
        again = choose_threshold_cv(proto, dino, fine, y_mutated, fold_of=choice.fold_of)
        assert again.fold_values[k] == choice.fold_values[k]
        assert np.array_equal(again.oof_pred[in_k], choice.oof_pred[in_k])
        assert not again.sweep["accuracy"].equals(choice.sweep["accuracy"])  # labels were used elsewhere
    # each fold is predicted with its own fold's threshold
    for k, t in enumerate(choice.fold_values):
        in_k = choice.fold_of == k
        labels, fell = hybrid_predict(proto, dino, fine, t)
        assert np.array_equal(choice.oof_pred[in_k], labels[in_k]) and np.array_equal(choice.oof_fallback[in_k], fell[in_k])


def test_stratified_folds_are_seeded_and_cover_each_sample_once():
    y = np.repeat(np.arange(7), 10)
    folds = stratified_fold_ids(y, n_splits=5, seed=0)
    assert np.array_equal(folds, stratified_fold_ids(y, n_splits=5, seed=0))
    assert not np.array_equal(folds, stratified_fold_ids(y, n_splits=5, seed=1))
    assert sorted(np.bincount(folds)) == [14] * 5
    assert all(np.bincount(y[folds == k], minlength=7).tolist() == [2] * 7 for k in range(5))


def test_weight_choice_returns_grid_value_out_of_fold_predictions_and_sweep():
    proto, dino, fine, y = random_fusion_inputs(100, seed=7)
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    choice = choose_weight_cv(proto, dino, fine, y, grid=grid)
    assert choice.param == "weight" and choice.chosen in grid and set(choice.fold_values) <= set(grid)
    assert choice.oof_fallback is None and list(choice.sweep.columns) == ["weight", "accuracy", "macro_f1"]
    assert choice.sweep["accuracy"].tolist() == pytest.approx(
        [accuracy_score(y, soft_fusion_predict(proto, dino, fine, w)) for w in grid]
    )


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_batched_scores_equal_scikit_learn_per_row():
    rng = np.random.default_rng(8)
    y_true = rng.integers(0, 7, (20, 30))
    y_pred = np.where(rng.uniform(size=(20, 30)) < 0.6, y_true, rng.integers(0, 7, (20, 30)))
    y_pred[0] = 6  # a row predicting one class only
    got = batched_classification_scores(y_true, y_pred)
    for b in range(20):
        assert got["accuracy"][b] == pytest.approx(accuracy_score(y_true[b], y_pred[b]))
        assert got["macro_f1"][b] == pytest.approx(f1_score(y_true[b], y_pred[b], average="macro"))
        assert got["weighted_f1"][b] == pytest.approx(f1_score(y_true[b], y_pred[b], average="weighted"))


def test_summary_and_classification_table_equal_scikit_learn():
    rng = np.random.default_rng(9)
    y_true = rng.integers(0, 6, 200)  # throat (6) absent from y_true
    y_pred = np.where(rng.uniform(size=200) < 0.7, y_true, rng.integers(0, 7, 200))
    summary = summary_metrics(y_true, y_pred)
    assert summary["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert summary["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    table = classification_table(y_true, y_pred)
    assert list(table.index) == list(LABELS) + ["macro avg", "weighted avg"]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(7)), zero_division=0)
    assert np.allclose(table.loc[list(LABELS), ["precision", "recall", "f1"]].to_numpy(), np.c_[p, r, f])
    assert table.loc[list(LABELS), "support"].tolist() == s.tolist() and table.loc["throat", "support"] == 0
    assert table.loc["macro avg", "f1"] == pytest.approx(summary["macro_f1"])
    assert table.loc["weighted avg", "f1"] == pytest.approx(summary["weighted_f1"])
    coarse = classification_table(coarse_of(y_true), coarse_of(y_pred), labels=COARSE_CLASSES)
    assert list(coarse.index[:4]) == list(COARSE_CLASSES)


def test_coarse_of_and_branch_accuracy():
    assert [COARSE_CLASSES[c] for c in coarse_of(range(7))] == ["nose", "nose", "ear", "ear", "vc", "vc", "throat"]
    y_true = np.array([0, 1, 2, 3, 4])
    y_pred = np.array([0, 0, 2, 3, 5])
    branches = branch_accuracy(y_true, y_pred, [False, False, True, True, True])
    assert branches.loc["prototype", "n"] == 2 and branches.loc["prototype", "accuracy"] == 0.5
    assert branches.loc["DINOv2 fallback", "n"] == 3 and branches.loc["DINOv2 fallback", "accuracy"] == pytest.approx(2 / 3)
    assert branches.loc["all", "accuracy"] == pytest.approx(0.6)
    assert np.isnan(branch_accuracy(y_true, y_pred, [False] * 5).loc["DINOv2 fallback", "accuracy"])


def _noisy_predictions(n, seed, error_rate=0.2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n)
    return y, np.where(rng.uniform(size=n) < error_rate, rng.integers(0, 7, n), y)


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows_with_more_data():
    y, pred = _noisy_predictions(200, seed=10)
    ci = bootstrap_ci(y, pred, n_boot=500, seed=0)
    assert list(ci.index) == ["accuracy", "macro_f1", "weighted_f1"]
    assert (ci["low"] <= ci["estimate"]).all() and (ci["estimate"] <= ci["high"]).all()
    assert ci.loc["accuracy", "estimate"] == pytest.approx(accuracy_score(y, pred))
    assert ci.equals(bootstrap_ci(y, pred, n_boot=500, seed=0))
    assert not ci.equals(bootstrap_ci(y, pred, n_boot=500, seed=1))
    y_big, pred_big = _noisy_predictions(5000, seed=11)
    big = bootstrap_ci(y_big, pred_big, n_boot=500, seed=0)
    width, width_big = ci["high"] - ci["low"], big["high"] - big["low"]
    assert (width_big < width / 2).all()


def test_bootstrap_accepts_custom_vectorised_metrics():
    y, pred = _noisy_predictions(100, seed=12)
    ci = bootstrap_ci(y, pred, {"error": lambda t, p: (t != p).mean(axis=1)}, n_boot=200, seed=0)
    assert ci.loc["error", "estimate"] == pytest.approx(1 - accuracy_score(y, pred))


def test_comparison_table_has_estimates_and_intervals_per_model():
    y, pred = _noisy_predictions(150, seed=13)
    table = comparison_table({"hybrid": pred, "perfect": y}, y, n_boot=300, seed=0)
    assert list(table.index) == ["hybrid", "perfect"]
    assert {"accuracy", "accuracy_low", "macro_f1_high", "weighted_f1"} <= set(table.columns)
    assert table.loc["hybrid", "macro_f1"] == pytest.approx(summary_metrics(y, pred)["macro_f1"])
    assert table.loc["perfect", "accuracy_low"] == 1.0


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def test_plot_confusion_counts_rows_and_both_panels():
    y, pred = _noisy_predictions(80, seed=14)
    assert len(plot_confusion(y, pred, LABELS).axes) == 1
    rows = plot_confusion(y, pred, LABELS, normalize="true", title="hybrid")
    cells = np.asarray(rows.axes[0].collections[0].get_array()).reshape(7, 7)
    assert np.allclose(cells.sum(axis=1), 1.0)
    assert len(plot_confusion(y, pred, LABELS, normalize="both").axes) == 2


def test_plot_threshold_sweep_marks_the_chosen_value():
    proto, dino, fine, y = random_fusion_inputs(60, seed=15)
    choice = choose_threshold_cv(proto, dino, fine, y, grid=np.linspace(0, 1, 11))
    fig = plot_threshold_sweep(choice.sweep, choice.chosen)
    (ax,) = fig.axes
    assert any(f"{choice.chosen:g}" in text.get_text() for text in ax.get_legend().get_texts())
    xs = [np.asarray(line.get_xdata(), dtype=float) for line in ax.get_lines()]
    assert any(x.shape == (2,) and np.allclose(x, choice.chosen) for x in xs)  # the vertical marker


def test_plot_misclassified_grid_shows_only_errors_with_true_pred_titles(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (64, 48), (40 * i, 0, 0)).save(paths[-1])
    paths[3] = tmp_path / "missing.png"  # unreadable images do not crash the report
    y_true, y_pred = np.array([0, 1, 2, 3, 4]), np.array([0, 2, 2, 5, 6])
    fig = plot_misclassified_grid(paths, y_true, y_pred, LABELS)
    assert [ax.get_title() for ax in fig.axes] == ["nose-left / ear-right", "ear-left / vc-closed", "vc-open / throat"]
    assert len(plot_misclassified_grid(paths, y_true, y_pred, LABELS, max_images=2).axes) == 2
    assert len(plot_misclassified_grid(paths, y_true, y_true, LABELS).axes) == 1


# ---------------------------------------------------------------------------------------------
# Submissions
# ---------------------------------------------------------------------------------------------


def test_track1_zip_has_one_json_at_root_with_int_labels(tmp_path):
    names = [f"img{i}.png" for i in range(7)]
    path = write_track1(names, np.arange(7), tmp_path / "track1.zip")
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == [TRACK1_JSON]
        data = json.loads(zf.read(TRACK1_JSON).decode("utf-8"))
    assert data == {n: i for i, n in enumerate(names)} and all(type(v) is int for v in data.values())
    assert [p.name for p in tmp_path.iterdir()] == ["track1.zip"]  # no temp file left behind
    first = path.read_bytes()
    write_track1(names, np.arange(7), path)
    assert path.read_bytes() == first  # deterministic bytes on rerun


def test_track2_and_track3_round_trip_non_ascii_texts(tmp_path):
    queries = ["a.png", "b.png", "c.png"]
    path2 = write_track2(queries, np.array(["b.png", "a.png", "a.png"]), tmp_path / "t2.zip")
    assert read_submission_zip(path2) == (TRACK2_JSON, {"a.png": "b.png", "b.png": "a.png", "c.png": "a.png"})
    texts = ["vách ngăn lệch", "the tympanic membrane is intact"]
    path3 = write_track3(texts, ["a.png", "c.png"], tmp_path / "t3.zip", gallery_images=queries)
    raw = zipfile.ZipFile(path3).read(TRACK3_JSON)
    assert "vách ngăn lệch".encode("utf-8") in raw  # stored as UTF-8, not \\u escapes
    assert validate_track3(path3, texts, queries) == {texts[0]: "a.png", texts[1]: "c.png"}


@pytest.mark.parametrize(
    "json_name, mapping, validate, problem",
    [
        (TRACK1_JSON, {"a.png": 0}, lambda p: validate_track1(p, ["a.png", "b.png"]), "missing: 'b.png'"),
        (TRACK1_JSON, {"a.png": 7}, lambda p: validate_track1(p, ["a.png"]), "not integer label ids"),
        (TRACK1_JSON, {"a.png": True}, lambda p: validate_track1(p, ["a.png"]), "not integer label ids"),
        (TRACK1_JSON, {"a.png": 1, "z.png": 1}, lambda p: validate_track1(p, ["a.png"]), "not listed"),
        (TRACK2_JSON, {"a.png": "a.png", "b.png": "a.png"}, lambda p: validate_track2(p, ["a.png", "b.png"]), "retrieve themselves"),
        (TRACK2_JSON, {"a.png": "x.png", "b.png": "a.png"}, lambda p: validate_track2(p, ["a.png", "b.png"]), "not gallery images"),
        (TRACK3_JSON, {"a spur": "x.png"}, lambda p: validate_track3(p, ["a spur"], ["a.png"]), "not gallery images"),
        (TRACK2_JSON, {"a.png": 0}, lambda p: validate_track1(p, ["a.png"]), "needs 'submission.json'"),
    ],
)
def test_validators_name_the_zip_and_the_problem(tmp_path, json_name, mapping, validate, problem):
    path = write_submission_zip(mapping, tmp_path / "bad.zip", json_name)
    with pytest.raises(ValueError, match="bad.zip") as err:
        validate(path)
    assert problem in str(err.value)


def test_zip_structure_must_be_exactly_one_json_at_root(tmp_path):
    for entries in ({"sub/submission.json": "{}"}, {TRACK1_JSON: "{}", "notes.txt": ""}):
        path = tmp_path / "odd.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, text in entries.items():
                zf.writestr(name, text)
        with pytest.raises(ValueError, match="exactly one .json at its root"):
            validate_track1(path, [])
    with pytest.raises(ValueError, match="bare file name"):
        write_submission_zip({}, tmp_path / "x.zip", "dir/submission.json")


def test_duplicate_queries_are_reported_and_written_once(tmp_path):
    with pytest.warns(UserWarning, match="listed more than once") as record:
        path = write_track3(["a spur", "a spur", "intact"], ["a.png", "b.png", "c.png"], tmp_path / "t3.zip", ["a.png", "b.png", "c.png"])
    assert "Differing answers for 1" in str(record[0].message)
    assert read_submission_zip(path)[1] == {"a spur": "a.png", "intact": "c.png"}


def test_writer_removes_an_invalid_zip_and_rejects_non_integer_labels(tmp_path):
    with pytest.raises(ValueError, match="retrieve themselves"):
        write_track2(["a.png", "b.png"], ["a.png", "a.png"], tmp_path / "t2.zip")
    assert not (tmp_path / "t2.zip").exists()
    with pytest.raises(ValueError, match="integer label ids"):
        write_track1(["a.png"], np.array([1.5]), tmp_path / "t1.zip")
