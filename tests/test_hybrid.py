"""Tests for the hybrid part: fusion rules, validation-only choice, metrics, plots, submissions."""

from __future__ import annotations

import json
import re
import time
import unicodedata
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from plots import plot_confusion, plot_image_grid, plot_threshold_sweep
from utils import (
    COARSE_CLASSES,
    COARSE_TO_ID,
    FINE_TASKS,
    LABEL_TO_COARSE,
    LABEL_TO_ID,
    LABELS,
    SOFT_FUSION_GRID,
    SUBMISSIONS,
    THRESHOLD_GRID,
    batched_scores,
    best_grid_value,
    bootstrap_ci,
    branch_accuracy,
    check_submission,
    choose_fusion,
    classification_table,
    coarse_of,
    comparison_table,
    dino_labels,
    hybrid_predict,
    region_then_fine,
    soft_fusion_predict,
    summary_metrics,
    write_submission,
)

EAR, NOSE, VC, THROAT = (COARSE_TO_ID[c] for c in ("ear", "nose", "vc", "throat"))
FINE = ("ear", "nose", "vc")


def one_hot_probs(coarse_ids, confidence):
    """(N, 4) probabilities: `confidence` on the given region, the rest spread evenly."""
    coarse_ids = np.asarray(coarse_ids)
    confidence = np.broadcast_to(np.asarray(confidence, float), (len(coarse_ids),))
    probs = np.repeat(((1 - confidence) / 3)[:, None], 4, axis=1)
    probs[np.arange(len(coarse_ids)), coarse_ids] = confidence
    return probs


def dino(coarse_probs, ear, nose, vc):
    """dino_probs as the notebook passes it: coarse (N, 4) and p(second label) per binary task."""
    n = len(coarse_probs)
    fine = {t: np.broadcast_to(np.asarray(p, float), (n,)).copy() for t, p in zip(FINE, (ear, nose, vc))}
    return {"coarse": np.asarray(coarse_probs, float), **fine}


def random_fusion_inputs(n, seed):
    """Validation-like arrays where confident prototypes are right and DINOv2 is usually right:
    (proto_coarse (N, 4), dino_probs, y_true (N,))."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n)
    true_coarse = coarse_of(y)
    conf = rng.uniform(0.3, 1.0, n)
    proto_coarse = np.where(rng.uniform(size=n) < conf, true_coarse, rng.integers(0, 4, n))
    dino_coarse = np.where(rng.uniform(size=n) < 0.85, true_coarse, rng.integers(0, 4, n))
    fine = {task: np.where(y == LABEL_TO_ID[second], 0.8, 0.2) for task, (_, second) in FINE_TASKS.items()}
    return one_hot_probs(proto_coarse, conf), {"coarse": one_hot_probs(dino_coarse, 0.7), **fine}, y


def copy_probs(dino_probs):
    return {k: np.array(v, copy=True) for k, v in dino_probs.items()}


def names(ids):
    return [LABELS[i] for i in ids]


# ---------------------------------------------------------------------------------------------
# Second stage: region, then that region's binary decision
# ---------------------------------------------------------------------------------------------


def test_fine_tasks_pairs_are_the_documented_orientation():
    # A binary head's output 1 (p > 0.5) is the pair's SECOND label: ear-right, nose-right, vc-closed.
    assert FINE_TASKS == {"ear": ("ear-left", "ear-right"), "nose": ("nose-left", "nose-right"),
                          "vc": ("vc-open", "vc-closed")}


@pytest.mark.parametrize("region, second, first", [("ear", "ear-right", "ear-left"),
                                                   ("nose", "nose-right", "nose-left"),
                                                   ("vc", "vc-closed", "vc-open")])
def test_region_then_fine_orientation_per_region(region, second, first):
    coarse = [COARSE_TO_ID[region]] * 5
    p_own = np.array([0.9, 0.1, 0.5, 0.5000001, 1.0])  # exactly 0.5 -> the first label
    # the other regions' decisions say the opposite: they must be ignored
    probs = {t: (p_own if t == region else 1.0 - p_own) for t in FINE}
    assert names(region_then_fine(coarse, probs)) == [second, first, first, second, second]


def test_region_then_fine_uses_the_own_regions_decision_and_none_for_throat():
    coarse = [EAR, EAR, NOSE, NOSE, VC, VC, THROAT, THROAT, EAR]
    p = np.array([0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.5])
    got = names(region_then_fine(coarse, {"ear": p, "nose": p, "vc": p}))
    assert got == ["ear-right", "ear-left", "nose-right", "nose-left", "vc-closed", "vc-open", "throat", "throat",
                   "ear-left"]
    # extra keys such as "coarse" are allowed (the notebook passes the whole dino_probs dict)
    with_coarse = {"coarse": one_hot_probs(coarse, 0.9), "ear": p, "nose": p, "vc": p}
    assert names(region_then_fine(coarse, with_coarse)) == got
    assert names(dino_labels(with_coarse)) == got  # DINOv2 alone: its own coarse head's region
    assert region_then_fine([], {"ear": [], "nose": [], "vc": []}).shape == (0,)


def test_region_then_fine_bad_inputs_say_what_to_pass():
    p = [0.9, 0.9]
    with pytest.raises(ValueError, match=r"'vc'.*p\(vc-closed\)"):
        region_then_fine([EAR, NOSE], {"ear": p, "nose": p})
    with pytest.raises(ValueError, match="one per image"):
        region_then_fine([EAR, NOSE], {"ear": p, "nose": p, "vc": [0.9]})
    for bad in ([EAR, 4], [EAR, -1]):
        with pytest.raises(ValueError, match="COARSE_CLASSES"):
            region_then_fine(bad, {"ear": p, "nose": p, "vc": p})


# ---------------------------------------------------------------------------------------------
# Hybrid rule and soft fusion
# ---------------------------------------------------------------------------------------------


def test_hybrid_uses_prototype_at_exactly_the_threshold_and_dinov2_just_below():
    proto = np.array([[0.6, 0.2, 0.1, 0.1], [0.5999, 0.2001, 0.1, 0.1]])  # both say ear
    probs = dino(one_hot_probs([NOSE, NOSE], 0.9), ear=0.9, nose=0.1, vc=0.5)
    labels, fell_back = hybrid_predict(proto, probs, threshold=0.6)
    assert fell_back.dtype == bool and fell_back.tolist() == [False, True]
    assert names(labels) == ["ear-right", "nose-left"]


def test_hybrid_threshold_zero_never_falls_back_and_above_one_always_does():
    proto, probs, _ = random_fusion_inputs(50, seed=1)
    all_dino, fell_all = hybrid_predict(proto, probs, threshold=1.01)
    all_proto, fell_none = hybrid_predict(proto, probs, threshold=0.0)
    assert fell_all.all() and not fell_none.any()
    assert np.array_equal(all_dino, region_then_fine(probs["coarse"].argmax(1), probs))
    assert np.array_equal(all_proto, region_then_fine(proto.argmax(1), probs))
    assert not np.array_equal(all_dino, all_proto)  # the two branches really differ here
    certain = one_hot_probs([VC], 1.0)  # confidence exactly 1.0 at threshold 1.0: the prototype
    labels, fell = hybrid_predict(certain, dino(one_hot_probs([EAR], 0.9), 0.9, 0.9, 0.9), 1.0)
    assert names(labels) == ["vc-closed"] and not fell.any()


def test_hybrid_nan_confidence_falls_back_to_dinov2():
    proto = np.array([[np.nan] * 4, [0.9, np.nan, 0.05, 0.05], [0.9, 0.05, 0.03, 0.02]])
    probs = dino(one_hot_probs([NOSE, VC, NOSE], 0.8), ear=0.9, nose=0.9, vc=0.1)
    for threshold in (0.0, 0.5):  # even threshold 0, which never falls back for a real confidence
        labels, fell_back = hybrid_predict(proto, probs, threshold)
        assert fell_back.tolist() == [True, True, False]
        assert names(labels) == ["nose-right", "vc-open", "ear-right"]


def test_hybrid_throat_ignores_fine_probabilities():
    proto = one_hot_probs([THROAT, THROAT], 0.95)
    probs = dino(one_hot_probs([EAR, VC], 0.9), ear=[0.99, 0.01], nose=[0.99, 0.01], vc=[0.99, 0.01])
    labels, fell_back = hybrid_predict(proto, probs, threshold=0.5)
    assert labels.tolist() == [LABEL_TO_ID["throat"]] * 2 and not fell_back.any()


def test_hybrid_bad_inputs_say_what_to_pass():
    proto = one_hot_probs([EAR], 0.9)
    with pytest.raises(ValueError, match="'vc'"):
        hybrid_predict(proto, {"coarse": proto, "ear": [0.9], "nose": [0.9]}, 0.5)
    with pytest.raises(ValueError, match="COARSE_CLASSES"):
        hybrid_predict(np.ones((1, 7)) / 7, dino(proto, 0.9, 0.9, 0.9), 0.5)
    with pytest.raises(ValueError, match=r"dino_probs\['coarse'\].*COARSE_CLASSES"):
        hybrid_predict(one_hot_probs([EAR, EAR], 0.9), dino(proto, 0.9, 0.9, 0.9), 0.5)  # 2 rows vs 1


def test_soft_fusion_extremes_equal_single_models_and_middle_averages():
    proto, probs, _ = random_fusion_inputs(40, seed=2)
    assert np.array_equal(soft_fusion_predict(proto, probs, 1.0), region_then_fine(proto.argmax(1), probs))
    assert np.array_equal(soft_fusion_predict(proto, probs, 0.0), region_then_fine(probs["coarse"].argmax(1), probs))
    assert np.array_equal(soft_fusion_predict(proto, probs, 1.0), hybrid_predict(proto, probs, 0.0)[0])
    assert np.array_equal(soft_fusion_predict(proto, probs, 0.0), hybrid_predict(proto, probs, 2.0)[0])
    p = np.array([[0.5, 0.4, 0.05, 0.05]])  # ear by a little
    d = dino(np.array([[0.1, 0.8, 0.05, 0.05]]), 0.9, 0.9, 0.9)  # nose by a lot -> the average says nose
    assert names(soft_fusion_predict(p, d, 0.5)) == ["nose-right"]
    assert names(soft_fusion_predict(p, d, 0.9)) == ["ear-right"]  # 0.46 ear vs 0.44 nose
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="weight"):
            soft_fusion_predict(p, d, bad)


# ---------------------------------------------------------------------------------------------
# Choosing on validation (cross-fitted)
# ---------------------------------------------------------------------------------------------


def plateau_inputs():
    """Prototypes right when conf >= 0.7 and wrong when <= 0.5; DINOv2 the reverse. Every threshold in
    (max wrong conf, min right conf] is perfect. fold_of = index % 4."""
    y_coarse = np.array([EAR, NOSE, VC, THROAT] * 10)
    conf = np.tile([0.9, 0.8, 0.7, 0.75, 0.4, 0.5, 0.45, 0.3], 5)
    proto_right = conf >= 0.7
    wrong = (y_coarse + 1) % 4
    proto = one_hot_probs(np.where(proto_right, y_coarse, wrong), conf)
    probs = dino(one_hot_probs(np.where(proto_right, wrong, y_coarse), 0.8), 0.9, 0.9, 0.9)
    return proto, probs, region_then_fine(y_coarse, probs), np.arange(40) % 4


def test_best_grid_value_tie_rule():
    grid = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert best_grid_value(grid, [0.5, 0.9, 0.9, 0.9, 0.2], [0.5] * 5) == 0.3  # middle of 3
    assert best_grid_value(grid, [0.9, 0.9, 0.9, 0.9, 0.2], [0.5] * 5) == 0.3  # upper middle of 4
    assert best_grid_value(grid, [0.9, 0.9, 0.9, 0.9, 0.2], [0.5, 0.6, 0.5, 0.5, 0.5]) == 0.2  # accuracy breaks it
    assert best_grid_value(grid[::-1], [0.2, 0.9, 0.9, 0.9, 0.9], [0.5] * 5) == 0.3  # grid order does not matter
    assert best_grid_value(grid, [0.9, 0.9 + 1e-15, 0.9, 0.1, 0.1], [0.5] * 5) == 0.2  # rounding noise is a tie


def test_threshold_choice_finds_the_separating_plateau_and_takes_its_middle():
    proto, probs, y, fold_of = plateau_inputs()
    choice = choose_fusion("hybrid", proto, probs, y, fold_of)
    # all data: wrong confs <= 0.5, right >= 0.7 -> perfect on 0.51..0.70 (20 values): upper middle 0.61
    assert choice.param == "threshold" and choice.chosen == pytest.approx(0.61)
    perfect = choice.sweep[choice.sweep["macro_f1"] == 1.0]["threshold"]
    assert perfect.tolist() == pytest.approx([round(0.51 + 0.01 * i, 2) for i in range(20)])
    # without fold 1 (confs 0.8, 0.5): plateau 0.46..0.70 -> 0.58; without fold 2 (0.7, 0.45): 0.51..0.75 -> 0.63
    assert choice.fold_values == pytest.approx((0.61, 0.58, 0.63, 0.61))
    assert np.array_equal(choice.oof_pred, y)  # perfect out of fold too
    assert choice.oof_fallback.tolist() == (np.asarray(proto).max(1) < 0.7).tolist()
    assert list(choice.sweep.columns) == ["threshold", "accuracy", "macro_f1", "fallback_fraction"]
    assert choice.sweep["threshold"].tolist() == list(THRESHOLD_GRID)
    for t in (0.0, 0.5, 0.61, 1.0):
        row = choice.sweep[np.isclose(choice.sweep["threshold"], t)].iloc[0]
        labels, fell = hybrid_predict(proto, probs, t)
        assert row["fallback_fraction"] == pytest.approx(fell.mean())
        assert row["accuracy"] == pytest.approx(accuracy_score(y, labels))
        assert row["macro_f1"] == pytest.approx(f1_score(y, labels, average="macro"))


def test_chosen_value_depends_only_on_validation_data():
    proto, probs, y = random_fusion_inputs(120, seed=3)
    fold_of = np.random.default_rng(0).permutation(np.arange(120) % 5)
    before = (proto.copy(), copy_probs(probs), y.copy(), fold_of.copy())
    first = choose_fusion("hybrid", proto, probs, y, fold_of)
    test_a, test_b = random_fusion_inputs(60, seed=4), random_fusion_inputs(60, seed=5)
    pred_a, _ = hybrid_predict(*test_a[:2], first.chosen)
    pred_b, _ = hybrid_predict(*test_b[:2], first.chosen)
    second = choose_fusion("hybrid", proto, probs, y, fold_of)  # after predicting two different test sets
    assert second.chosen == first.chosen and second.fold_values == first.fold_values
    assert np.array_equal(second.oof_pred, first.oof_pred) and second.sweep.equals(first.sweep)
    assert not np.array_equal(pred_a, pred_b)  # the test sets really differed
    assert np.array_equal(before[0], proto) and np.array_equal(before[2], y) and np.array_equal(before[3], fold_of)
    assert all(np.array_equal(before[1][k], probs[k]) for k in probs)  # inputs are not modified


def test_out_of_fold_predictions_never_use_the_folds_own_labels():
    proto, probs, y = random_fusion_inputs(150, seed=6)
    fold_of = np.random.default_rng(1).permutation(np.arange(150) % 5)
    choice = choose_fusion("hybrid", proto, probs, y, fold_of)
    assert len(choice.fold_values) == 5
    for k in range(5):
        in_k = fold_of == k
        y_mutated = y.copy()
        y_mutated[in_k] = (y[in_k] + 3) % 7  # every label of fold k changes
        again = choose_fusion("hybrid", proto, probs, y_mutated, fold_of)
        assert again.fold_values[k] == choice.fold_values[k]
        assert np.array_equal(again.oof_pred[in_k], choice.oof_pred[in_k])
        assert np.array_equal(again.oof_fallback[in_k], choice.oof_fallback[in_k])
        assert not again.sweep["accuracy"].equals(choice.sweep["accuracy"])  # labels were used elsewhere
    # each fold is predicted with its own fold's threshold
    for k, t in enumerate(choice.fold_values):
        in_k = fold_of == k
        labels, fell = hybrid_predict(proto, probs, t)
        assert np.array_equal(choice.oof_pred[in_k], labels[in_k])
        assert np.array_equal(choice.oof_fallback[in_k], fell[in_k])


@pytest.mark.parametrize("rule", ["hybrid", "soft"])
def test_a_single_fold_gives_in_sample_predictions_without_error(rule):
    proto, probs, y = random_fusion_inputs(30, seed=16)
    choice = choose_fusion(rule, proto, probs, y, np.full(30, 3))
    assert len(choice.fold_values) == 1 and choice.fold_values[0] == choice.chosen
    if rule == "hybrid":
        labels, fell = hybrid_predict(proto, probs, choice.chosen)
        assert np.array_equal(choice.oof_fallback, fell)
    else:
        labels = soft_fusion_predict(proto, probs, choice.chosen)
    assert np.array_equal(choice.oof_pred, labels)


def test_soft_fusion_can_choose_the_prototypes_alone():
    # DINOv2 is sure of the wrong region; the prototypes lean to the right one by a hair, so only weight 1
    # (prototypes only, the end of the grid) answers right
    n = 20
    proto = one_hot_probs(np.full(n, THROAT), 0.26)  # throat 0.26, each other region 0.2467
    probs = dino(one_hot_probs(np.full(n, EAR), 1.0), 0.9, 0.9, 0.9)  # ear, certainly
    choice = choose_fusion("soft", proto, probs, np.full(n, LABELS.index("throat")), np.arange(n) % 5)
    assert choice.chosen == 1.0 and list(choice.fold_values) == [1.0] * 5
    assert (choice.oof_pred == LABELS.index("throat")).all()


def test_fold_ids_of_the_wrong_length_raise():
    proto, probs, y = random_fusion_inputs(20, seed=17)
    for rule in ("hybrid", "soft"):
        with pytest.raises(ValueError, match="fold_of"):
            choose_fusion(rule, proto, probs, y, np.arange(19) % 5)


def test_weight_choice_returns_grid_value_out_of_fold_predictions_and_sweep():
    proto, probs, y = random_fusion_inputs(100, seed=7)
    fold_of = np.arange(100) % 5
    choice = choose_fusion("soft", proto, probs, y, fold_of)
    assert choice.param == "weight" and choice.chosen in SOFT_FUSION_GRID
    assert set(choice.fold_values) <= set(SOFT_FUSION_GRID)
    assert choice.oof_fallback is None and list(choice.sweep.columns) == ["weight", "accuracy", "macro_f1"]
    assert choice.sweep["weight"].tolist() == list(SOFT_FUSION_GRID)
    assert choice.sweep["accuracy"].tolist() == pytest.approx(
        [accuracy_score(y, soft_fusion_predict(proto, probs, w)) for w in SOFT_FUSION_GRID])
    for k, w in enumerate(choice.fold_values):
        assert np.array_equal(choice.oof_pred[fold_of == k], soft_fusion_predict(proto, probs, w)[fold_of == k])


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_batched_scores_equal_scikit_learn_per_row_with_absent_classes():
    rng = np.random.default_rng(8)
    y_true = rng.integers(0, 7, (20, 30))
    y_pred = np.where(rng.uniform(size=(20, 30)) < 0.6, y_true, rng.integers(0, 7, (20, 30)))
    y_pred[0] = 6  # a row predicting one class only
    y_true[1] = np.where(y_true[1] == 6, 0, y_true[1])  # throat absent from the truth, predicted
    y_pred[2] = np.where(y_pred[2] == 3, 4, y_pred[2])
    y_true[2] = np.where(y_true[2] == 3, 4, y_true[2])  # class 3 absent from both
    y_true[3], y_pred[3] = 2, 2  # one class, all right
    y_true[4, :], y_pred[4, :] = rng.integers(0, 3, 30), rng.integers(3, 7, 30)  # all wrong
    got = batched_scores(y_true, y_pred)
    for b in range(20):
        assert got["accuracy"][b] == pytest.approx(accuracy_score(y_true[b], y_pred[b]))
        assert got["macro_f1"][b] == pytest.approx(f1_score(y_true[b], y_pred[b], average="macro"))
        assert got["weighted_f1"][b] == pytest.approx(f1_score(y_true[b], y_pred[b], average="weighted"))
    shared = batched_scores(y_true[5], y_pred)  # one (N,) truth for every row
    for b in range(20):
        assert shared["macro_f1"][b] == pytest.approx(f1_score(y_true[5], y_pred[b], average="macro"))
    one = batched_scores(y_true[6], y_pred[6])  # a single (N,) row
    assert one["weighted_f1"].shape == (1,)
    assert one["weighted_f1"][0] == pytest.approx(f1_score(y_true[6], y_pred[6], average="weighted"))


def test_summary_and_classification_table_equal_scikit_learn():
    rng = np.random.default_rng(9)
    y_true = rng.integers(0, 6, 200)  # throat (6) absent from y_true
    y_pred = np.where(rng.uniform(size=200) < 0.7, y_true, rng.integers(0, 7, 200))
    summary = summary_metrics(y_true, y_pred)
    assert summary["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert summary["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert summary["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    table = classification_table(y_true, y_pred)
    assert list(table.index) == list(LABELS) + ["macro avg", "weighted avg"]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(7)), zero_division=0)
    assert np.allclose(table.loc[list(LABELS), ["precision", "recall", "f1"]].to_numpy(), np.c_[p, r, f])
    assert table.loc[list(LABELS), "support"].tolist() == s.tolist() and table.loc["throat", "support"] == 0
    assert table.loc["macro avg", "f1"] == pytest.approx(summary["macro_f1"])
    assert table.loc["weighted avg", "f1"] == pytest.approx(summary["weighted_f1"])
    assert table.loc["weighted avg", "support"] == 200
    coarse = classification_table(coarse_of(y_true), coarse_of(y_pred), labels=COARSE_CLASSES)
    assert list(coarse.index[:4]) == list(COARSE_CLASSES)
    assert coarse.loc["macro avg", "f1"] == pytest.approx(f1_score(coarse_of(y_true), coarse_of(y_pred),
                                                                   average="macro"))


def test_classification_table_rejects_out_of_range_ids():
    y = np.array([0, 1, 2, 3, 4, 5, 6])
    for bad in (7, -1):  # an id == the number of classes used to be dropped silently
        with pytest.raises(ValueError, match="0..6"):
            classification_table(y, np.r_[y[:-1], bad])
        with pytest.raises(ValueError, match="0..6"):
            classification_table(np.r_[y[:-1], bad], y)
    with pytest.raises(ValueError, match="0..3"):
        classification_table([0, 1, 2, 4], [0, 1, 2, 3], labels=COARSE_CLASSES)
    with pytest.raises(ValueError, match="integer"):
        classification_table(y, y.astype(float))


def test_coarse_of_follows_label_to_coarse():
    assert [COARSE_CLASSES[c] for c in coarse_of(range(7))] == [LABEL_TO_COARSE[name] for name in LABELS]
    assert [COARSE_CLASSES[c] for c in coarse_of(range(7))] == ["nose", "nose", "ear", "ear", "vc", "vc", "throat"]
    assert coarse_of(np.array([], dtype=int)).shape == (0,)
    with pytest.raises(ValueError):
        coarse_of([7])


def test_branch_accuracy():
    y_true = np.array([0, 1, 2, 3, 4])
    y_pred = np.array([0, 0, 2, 3, 5])
    branches = branch_accuracy(y_true, y_pred, [False, False, True, True, True])
    assert branches.loc["prototype", "n"] == 2 and branches.loc["prototype", "accuracy"] == 0.5
    assert branches.loc["DINOv2 fallback", "n"] == 3
    assert branches.loc["DINOv2 fallback", "accuracy"] == pytest.approx(2 / 3)
    assert branches.loc["DINOv2 fallback", "fraction"] == pytest.approx(0.6)
    assert branches.loc["all", "n"] == 5 and branches.loc["all", "accuracy"] == pytest.approx(0.6)
    assert np.isnan(branch_accuracy(y_true, y_pred, [False] * 5).loc["DINOv2 fallback", "accuracy"])


def _noisy_predictions(n, seed, error_rate=0.2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n)
    return y, np.where(rng.uniform(size=n) < error_rate, rng.integers(0, 7, n), y)


def naive_scores(t, p, n_classes=7):
    """(B, N) -> accuracy, macro F1 and weighted F1 per row, one class at a time (a reference)."""
    tp = np.stack([((t == c) & (p == c)).sum(1) for c in range(n_classes)], 1).astype(float)
    support = np.stack([(t == c).sum(1) for c in range(n_classes)], 1).astype(float)
    predicted = np.stack([(p == c).sum(1) for c in range(n_classes)], 1).astype(float)
    present = support + predicted > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    return {"accuracy": (t == p).mean(1), "macro_f1": f1.sum(1) / present.sum(1),
            "weighted_f1": (f1 * support).sum(1) / t.shape[1]}


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows_with_more_data():
    y, pred = _noisy_predictions(200, seed=10)
    ci = bootstrap_ci(y, pred, n_boot=500, seed=0)
    assert list(ci.index) == ["accuracy", "macro_f1", "weighted_f1"]
    assert list(ci.columns) == ["estimate", "low", "high"]
    assert (ci["low"] <= ci["estimate"]).all() and (ci["estimate"] <= ci["high"]).all()
    assert ci.loc["accuracy", "estimate"] == pytest.approx(accuracy_score(y, pred))
    assert ci.loc["macro_f1", "estimate"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert ci.loc["weighted_f1", "estimate"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert ci.equals(bootstrap_ci(y, pred, n_boot=500, seed=0))
    assert not ci.equals(bootstrap_ci(y, pred, n_boot=500, seed=1))
    y_big, pred_big = _noisy_predictions(5000, seed=11)
    big = bootstrap_ci(y_big, pred_big, n_boot=500, seed=0)
    width, width_big = ci["high"] - ci["low"], big["high"] - big["low"]
    assert (width_big < width / 2).all()
    with pytest.raises(ValueError, match="equally long"):
        bootstrap_ci(y, pred[:-1])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([], [])


def test_bootstrap_resamples_depend_only_on_seed_and_size():
    # Paired comparisons: two models scored on the same images see the same resamples. Renaming the
    # classes (the same permutation on truth and prediction) changes no score on any resample.
    y, pred = _noisy_predictions(300, seed=18)
    perm = np.array([3, 6, 0, 5, 1, 2, 4])
    assert np.allclose(bootstrap_ci(y, pred, n_boot=400, seed=5).to_numpy(),
                       bootstrap_ci(perm[y], perm[pred], n_boot=400, seed=5).to_numpy(), rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def reference_bootstrap():
    """(y, pred, scores): 1,000 noisy predictions and the naive scores of 40,000 resamples of them, drawn
    with a generator of this test's own (not bootstrap_ci's draws)."""
    y, pred = _noisy_predictions(1000, seed=19)
    rng = np.random.default_rng(12345)
    chunks = []
    for _ in range(20):  # 2,000 resamples at a time
        idx = rng.integers(0, len(y), size=(2000, len(y)))
        chunks.append(naive_scores(y[idx], pred[idx]))
    return y, pred, {m: np.concatenate([c[m] for c in chunks]) for m in chunks[0]}


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_bootstrap_interval_is_the_alpha_over_two_percentile_interval(reference_bootstrap, alpha):
    # The interval's ends must be the alpha/2 and 1 - alpha/2 quantiles of the resampled scores (the
    # mutant "quantiles (alpha, 1 - alpha)" gives intervals too narrow).
    y, pred, scores = reference_bootstrap
    ci = bootstrap_ci(y, pred, n_boot=5000, seed=0, alpha=alpha)
    for metric in ci.index:
        ref = scores[metric]
        q = {a: np.quantile(ref, a) for a in (alpha / 2, alpha, 1 - alpha, 1 - alpha / 2)}
        low, high = ci.loc[metric, "low"], ci.loc[metric, "high"]
        assert q[alpha] - q[alpha / 2] > 0 and q[1 - alpha / 2] - q[1 - alpha] > 0  # the two candidates differ
        # each end is nearer the right quantile than the wrong one (measured: within 0.4 of their gap;
        # the mutant's ends sit on the wrong quantiles)
        assert abs(low - q[alpha / 2]) < abs(low - q[alpha]), metric
        assert abs(high - q[1 - alpha / 2]) < abs(high - q[1 - alpha]), metric
        assert ci.loc[metric, "high"] - ci.loc[metric, "low"] > (q[1 - alpha] - q[alpha])  # wider than the mutant's


def test_comparison_table_has_paired_estimates_and_intervals_per_model():
    y, pred = _noisy_predictions(150, seed=13)
    worse = pred.copy()
    worse[:10] = (y[:10] + 1) % 7  # strictly more errors than `pred`
    table = comparison_table({"hybrid": pred, "worse": worse, "perfect": y}, y, seed=4)
    assert list(table.index) == ["hybrid", "worse", "perfect"]
    assert list(table.columns) == [f"{m}{s}" for m in ("accuracy", "macro_f1", "weighted_f1")
                                   for s in ("", "_low", "_high")]
    assert table.loc["hybrid", "macro_f1"] == pytest.approx(summary_metrics(y, pred)["macro_f1"])
    assert table.loc["perfect", "accuracy_low"] == 1.0 and table.loc["perfect", "macro_f1_high"] == 1.0
    for name, p in (("hybrid", pred), ("worse", worse)):
        ci = bootstrap_ci(y, p, seed=4)  # the same seed, so the same resamples
        for m in ci.index:
            assert table.loc[name, [m, f"{m}_low", f"{m}_high"]].tolist() == ci.loc[m].tolist()
    # paired: on every shared resample `worse` scores no better, so its bounds are no higher
    assert table.loc["worse", "accuracy_low"] <= table.loc["hybrid", "accuracy_low"]
    assert table.loc["worse", "accuracy_high"] <= table.loc["hybrid", "accuracy_high"]


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def heatmap_cells(ax, n):
    return np.asarray(ax.collections[0].get_array(), dtype=float).reshape(n, n)


def test_plot_confusion_shows_counts_and_row_normalised_panels():
    y, pred = _noisy_predictions(80, seed=14)
    y = np.where(y == 6, 0, y)  # throat absent from the truth: its row is empty
    fig = plot_confusion(y, pred, LABELS, title="hybrid")
    counts_ax, rows_ax = fig.axes
    counts = confusion_matrix(y, pred, labels=range(7))
    assert np.array_equal(heatmap_cells(counts_ax, 7), counts)
    rows = heatmap_cells(rows_ax, 7)
    assert np.allclose(rows[:6], counts[:6] / counts[:6].sum(1, keepdims=True))
    assert np.allclose(rows[6], 0.0)  # an empty row shows zeros, not NaN
    assert (counts_ax.get_title(), rows_ax.get_title()) == ("counts", "row-normalised")
    assert [t.get_text() for t in counts_ax.get_xticklabels()] == list(LABELS)
    assert fig._suptitle.get_text() == "hybrid"
    coarse = plot_confusion(coarse_of(y), coarse_of(pred), COARSE_CLASSES)
    assert np.array_equal(heatmap_cells(coarse.axes[0], 4), confusion_matrix(coarse_of(y), coarse_of(pred)))


@pytest.mark.parametrize("rule", ["hybrid", "soft"])
def test_plot_threshold_sweep_marks_the_chosen_value(rule):
    proto, probs, y = random_fusion_inputs(60, seed=15)
    choice = choose_fusion(rule, proto, probs, y, np.arange(60) % 3)
    fig = plot_threshold_sweep(choice.sweep, choice.chosen)
    (ax,) = fig.axes
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any(choice.param in t and f"{choice.chosen:g}" in t for t in legend)
    xs = [np.asarray(line.get_xdata(), dtype=float) for line in ax.get_lines()]
    assert any(x.shape == (2,) and np.allclose(x, choice.chosen) for x in xs)  # the vertical marker
    assert ax.get_xlabel() == choice.param


def test_plot_image_grid_shows_images_with_titles_and_survives_unreadable_files(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (64, 48), (40 * i, 0, 0)).save(paths[-1])
    paths[3] = tmp_path / "missing.png"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths[4] = tmp_path / "broken.png"
    titles = [f"t{i}" for i in range(5)]
    fig = plot_image_grid(paths, titles, title="errors", ncols=3)
    assert len(fig.axes) == 6  # 2 rows of 3
    assert [ax.get_title() for ax in fig.axes[:5]] == titles
    assert [len(ax.images) for ax in fig.axes] == [1, 1, 1, 0, 0, 0]
    assert np.array_equal(fig.axes[1].images[0].get_array()[0, 0], [40, 0, 0])
    for ax, name in ((fig.axes[3], "missing.png"), (fig.axes[4], "broken.png")):
        assert any("cannot load" in t.get_text() and name in t.get_text() for t in ax.texts)
    assert fig._suptitle.get_text() == "errors"
    empty = plot_image_grid([], [], title="hybrid errors")
    assert any("none" in t.get_text() for t in empty.axes[0].texts)


# ---------------------------------------------------------------------------------------------
# Submissions
# ---------------------------------------------------------------------------------------------

GALLERY = ["a.png", "b.png", "c.png", "d.png"]
T2I_TEXTS = ["vách ngăn lệch", 'a "quoted" spur, left side', "line one\nline two", "  leading spaces",
             "Ménière\u0301 — 耳, 50%\t\\n", "plain"]


def zip_json(path):
    with zipfile.ZipFile(path) as zf:
        (name,) = zf.namelist()
        return name, zf.read(name)


@pytest.mark.parametrize("track, queries, answers", [
    ("track1", [f"img{i}.png" for i in range(7)], np.arange(7)),
    ("track2", GALLERY, ["b.png", "a.png", "a.png", "c.png"]),
    ("track3", T2I_TEXTS, ["a.png", "b.png", "c.png", "d.png", "a.png", "a.png"]),
])
def test_submission_zip_holds_one_json_at_its_root_and_round_trips(tmp_path, track, queries, answers):
    zip_name, json_name = SUBMISSIONS[track]
    out = tmp_path / "new" / "folder"  # created when missing
    path = write_submission(track, queries, answers, out, gallery=GALLERY)
    assert path == out / zip_name and [p.name for p in out.iterdir()] == [zip_name]  # no temp file left
    name, raw = zip_json(path)
    assert name == json_name and "/" not in name
    data = json.loads(raw.decode("utf-8"))
    expected = {q: (int(a) if track == "track1" else a) for q, a in zip(queries, answers)}
    assert data == expected and list(data) == list(queries)  # exact keys, in order
    if track == "track1":
        assert all(type(v) is int for v in data.values())
    assert check_submission(path, track, queries, GALLERY) == expected


def test_three_tracks_share_a_folder_without_overwriting_each_other(tmp_path):
    write_submission("track1", ["a.png"], [2], tmp_path)
    write_submission("track2", ["a.png"], ["b.png"], tmp_path, GALLERY)
    write_submission("track3", ["a spur"], ["c.png"], tmp_path, GALLERY)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(zip_name for zip_name, _ in SUBMISSIONS.values())
    assert check_submission(tmp_path / SUBMISSIONS["track1"][0], "track1", ["a.png"]) == {"a.png": 2}


def test_non_ascii_texts_round_trip_exactly_as_utf8(tmp_path):
    answers = ["a.png", "b.png", "c.png", "d.png", "a.png", "b.png"]
    path = write_submission("track3", T2I_TEXTS, answers, tmp_path, gallery=GALLERY)
    _, raw = zip_json(path)
    assert "vách ngăn lệch".encode() in raw and "耳".encode() in raw  # UTF-8, not \\u escapes
    mapping = json.loads(raw.decode("utf-8"))
    assert list(mapping) == T2I_TEXTS  # quotes, commas, newlines, tabs, leading spaces, combining marks kept
    combining = "Ménière\u0301 — 耳, 50%\t\\n"
    assert combining in mapping and unicodedata.normalize("NFC", combining) not in mapping  # not normalised


def test_numpy_queries_and_answers_are_converted(tmp_path):
    path = write_submission("track1", np.array(["a.png", "b.png"]), np.array([3, 6], dtype=np.int32), tmp_path)
    assert json.loads(zip_json(path)[1]) == {"a.png": 3, "b.png": 6}
    path = write_submission("track2", np.array(["a.png", "b.png"]), np.array(["c.png", "a.png"]), tmp_path,
                            gallery=np.array(GALLERY))
    assert json.loads(zip_json(path)[1]) == {"a.png": "c.png", "b.png": "a.png"}


@pytest.mark.parametrize("track, answers, expected", [
    ("track1", [1, 2, 3], {"a.png": 1, "b.png": 3}),
    ("track2", ["c.png", "d.png", "a.png"], {"a.png": "c.png", "b.png": "a.png"}),
])
def test_repeated_queries_are_written_once_with_the_first_answer_and_a_warning(tmp_path, track, answers, expected):
    with pytest.warns(UserWarning, match="more than once"):
        path = write_submission(track, ["a.png", "a.png", "b.png"], answers, tmp_path, gallery=GALLERY)
    assert json.loads(zip_json(path)[1]) == expected


@pytest.mark.parametrize("track, queries, answers, problem", [
    ("track2", ["a.png", "b.png"], ["a.png", "a.png"], "a.png -> 'a.png'"),  # answered by itself
    ("track2", ["a.png", "b.png"], ["x.png", "a.png"], "x.png"),  # outside the gallery
    ("track3", ["a spur"], ["x.png"], "x.png"),
    ("track1", ["a.png"], [7], "label ids 0-6"),
    ("track1", ["a.png"], ["3"], "label ids 0-6"),
    ("track1", ["a.png"], [True], "label ids 0-6"),
    ("track1", ["a.png"], [np.float64(2.0)], "label ids 0-6"),
    ("track1", ["a.png"], [-1], "label ids 0-6"),
])
def test_invalid_submissions_raise_naming_the_zip_and_the_zip_is_removed(tmp_path, track, queries, answers, problem):
    valid = [0] * len(queries) if track == "track1" else ["d.png"] * len(queries)
    path = write_submission(track, queries, valid, tmp_path, gallery=GALLERY)  # a valid zip from an earlier run
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        write_submission(track, queries, answers, tmp_path, gallery=GALLERY)
    assert problem in str(err.value)
    assert list(tmp_path.iterdir()) == []  # neither the invalid zip nor a temp file is left


def test_missing_and_extra_queries_are_named(tmp_path):
    path = write_submission("track1", ["a.png", "z.png"], [0, 1], tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        check_submission(path, "track1", ["a.png", "b.png"])
    assert "1 listed queries missing" in str(err.value) and "'b.png'" in str(err.value)
    assert "1 keys are not listed queries" in str(err.value) and "'z.png'" in str(err.value)
    with pytest.raises(ValueError, match="one answer per query"):
        write_submission("track1", ["a.png", "b.png"], [0], tmp_path / "other")


def test_identical_reruns_give_identical_bytes(tmp_path, monkeypatch):
    args = ("track3", T2I_TEXTS, ["a.png"] * len(T2I_TEXTS))
    first = write_submission(*args, tmp_path / "one", gallery=GALLERY).read_bytes()
    real_time = time.time()
    monkeypatch.setattr(time, "time", lambda: real_time + 3 * 86400)  # a rerun days later
    again = write_submission(*args, tmp_path / "two", gallery=GALLERY).read_bytes()
    path = write_submission(*args, tmp_path / "one", gallery=GALLERY)  # overwrite in place
    assert again == first and path.read_bytes() == first


@pytest.mark.parametrize("entries", [
    {"submission.json": '{"a.png": 0}', "notes.txt": ""},  # two files
    {"sub/submission.json": '{"a.png": 0}'},  # the JSON in a folder
    {"submission_i2i.json": '{"a.png": 0}'},  # another track's name
    {"submission.json": '[["a.png", 0]]'},  # a JSON array
    {"submission.json": '{"a.png": 0, "a.png": 1}'},  # a repeated key
    {"submission.json": '{"a.png": 0'},  # broken JSON
])
def test_check_submission_rejects_malformed_zips(tmp_path, entries):
    path = tmp_path / "odd.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in entries.items():
            zf.writestr(name, text)
    with pytest.raises(ValueError, match="odd.zip"):
        check_submission(path, "track1", ["a.png"])


def test_submission_files_carry_the_challenges_names(tmp_path):
    names = {track: write_submission(track, ["a.png"], [0 if track == "track1" else "b.png"], tmp_path,
                                     gallery=["a.png", "b.png"]) for track in ("track1", "track2", "track3")}
    assert {t: (p.name, zip_json(p)[0]) for t, p in names.items()} == {
        "track1": ("submission.zip", "submission.json"), "track2": ("submission_i2i.zip", "submission_i2i.json"),
        "track3": ("submission_t2i.zip", "submission_t2i.json")}


def test_check_submission_names_the_problem_of_a_malformed_zip(tmp_path):
    def make(text, name="submission.json"):
        path = tmp_path / "odd.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(name, text)
        return path

    with pytest.raises(ValueError, match="repeats keys"):
        check_submission(make('{"a.png": 0, "a.png": 1}'), "track1", ["a.png"])
    with pytest.raises(ValueError, match="JSON object"):
        check_submission(make('[["a.png", 0]]'), "track1", ["a.png"])
    with pytest.raises(ValueError, match="exactly submission.json at its root"):
        check_submission(make('{"a.png": 0}', "sub/submission.json"), "track1", ["a.png"])
    with pytest.raises(ValueError, match="not a valid"):
        check_submission(tmp_path / "nowhere.zip", "track1", ["a.png"])


# ---------------------------------------------------------------------------------------------
# Gaps found by mutation testing (benchmarks/MUTATION.md)
# ---------------------------------------------------------------------------------------------


def test_result_tables_name_their_index_and_count_support_in_integers():
    y_true, y_pred = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])
    table = classification_table(y_true, y_pred)
    assert table.index.name == "class" and table["support"].dtype.kind == "i"  # "3", not "3.0", in metrics.json
    assert branch_accuracy(y_true, y_pred, [False, True, True, False]).index.name == "branch"
    assert comparison_table({"hybrid": y_pred}, y_true).index.name == "model"


def test_classification_table_shows_absent_classes_and_scores_silently():
    # classes 2-6 absent from both sides, class 1 never predicted: rows of zeros, no scikit-learn warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = classification_table([0, 0, 1, 1], [0, 0, 0, 0])
    assert list(table.index[:7]) == list(LABELS)
    assert table.loc[list(LABELS[2:]), "support"].tolist() == [0] * 5
    assert (table.loc[list(LABELS[1:]), ["precision", "recall", "f1"]] == 0).all().all()
    assert table.loc["macro avg", "precision"] == pytest.approx(0.25)  # over the classes present: (0.5 + 0) / 2


@pytest.mark.parametrize("score", [
    lambda t, p: classification_table(t, p),
    lambda t, p: branch_accuracy(t, p, [False, True]),
    lambda t, p: bootstrap_ci(t, p, n_boot=10),
    lambda t, p: batched_scores(t, p),
])
def test_metric_errors_name_the_argument_at_fault(score):
    with pytest.raises(ValueError, match="^y_true must hold integer class ids"):
        score([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="^y_pred must hold integer class ids"):
        score([0, 1], [0.5, 1.0])


def test_branch_accuracy_reads_fell_back_as_truth_values_and_leaves_empty_branches_nan_silently():
    branches = branch_accuracy([0, 1, 2], [0, 1, 0], [0, 1, 1])  # 0 / 1 flags, as read back from a CSV
    assert branches["n"].tolist() == [1, 2, 3]
    assert branches.loc["DINOv2 fallback", "accuracy"] == 0.5 and branches.loc["prototype", "accuracy"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" from numpy
        none_fell_back = branch_accuracy([0, 1], [0, 1], [False, False])
        empty = branch_accuracy([], [], [])
    assert np.isnan(none_fell_back.loc["DINOv2 fallback", "accuracy"])
    assert empty["n"].tolist() == [0, 0, 0] and empty[["fraction", "accuracy"]].isna().all().all()


def test_comparison_table_by_default_uses_the_default_bootstrap_resamples():
    y, pred = _noisy_predictions(60, seed=21)
    table, ci = comparison_table({"hybrid": pred}, y), bootstrap_ci(y, pred)
    for m in ci.index:  # metrics.json's intervals and the comparison table's agree
        assert table.loc["hybrid", [m, f"{m}_low", f"{m}_high"]].tolist() == ci.loc[m].tolist()


@pytest.mark.parametrize("call", [
    lambda out: write_submission("track4", ["a.png"], [0], out),
    lambda out: check_submission(out / "submission.zip", "track4", ["a.png"]),
])
def test_an_unknown_track_is_refused_with_the_known_ones(tmp_path, call):
    message = "track must be one of ('track1', 'track2', 'track3'); got 'track4'."
    with pytest.raises(ValueError, match=re.escape(message)):
        call(tmp_path)


def test_submission_zip_entry_is_dated_1980_readable_and_its_json_one_answer_per_line(tmp_path):
    path = write_submission("track1", ["b.png", "a.png"], [3, 0], tmp_path)
    with zipfile.ZipFile(path) as zf:
        (info,) = zf.infolist()
        raw = zf.read(info)
    assert info.date_time == (1980, 1, 1, 0, 0, 0)  # the zip epoch: no time of writing in the file
    assert info.external_attr >> 16 == 0o644 and info.compress_type == zipfile.ZIP_DEFLATED  # rw-r--r-- unzipped
    assert raw == b'{\n "b.png": 3,\n "a.png": 0\n}'  # one answer per line: diffs of two runs are readable


def test_repeated_query_warning_is_exact_and_points_at_the_caller(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_submission("track1", ["a.png", "b.png"], [0, 1], tmp_path)  # each query once: no warning
    queries = ["a", "a", "b", "b", "c", "c", "d", "d", "e"]
    with pytest.warns(UserWarning) as record:
        write_submission("track1", queries, [0] * len(queries), tmp_path)
    (w,) = record
    assert str(w.message) == ("track1: 4 queries are listed more than once (e.g. ['a', 'b', 'c']); the JSON holds "
                              "each once, with its first answer.")
    # it points at the line that called write_submission (a notebook cell), or under mutation testing at
    # mutmut's trampoline, which wraps every utils function in one more frame
    assert w.filename == __file__ or Path(w.filename).name == "trampoline.py"


def test_a_failed_write_raises_its_own_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(zipfile, "ZipFile", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        write_submission("track1", ["a.png"], [0], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fuse", [lambda p, d: soft_fusion_predict(p, d, 0.5), lambda p, d: hybrid_predict(p, d, 0.5)])
def test_fusion_errors_name_the_input_at_fault_with_its_expected_shape(fuse):
    proto = one_hot_probs([EAR, NOSE, VC], 0.9)
    with pytest.raises(ValueError, match=re.escape("proto_coarse must be [N, 4] probabilities in COARSE_CLASSES")):
        fuse(np.ones((3, 7)) / 7, dino(proto, 0.9, 0.9, 0.9))
    with pytest.raises(ValueError, match=re.escape("dino_probs['coarse'] must be [3, 4] probabilities")):
        fuse(proto, dino(proto[:2], 0.9, 0.9, 0.9))  # one row short
    with pytest.raises(ValueError, match=re.escape("dino_probs['coarse'] is missing: pass DINOv2's (N, 4) region "
                                                   "probabilities (predict_dino's 'coarse').")):
        fuse(proto, {"ear": [0.9] * 3, "nose": [0.9] * 3, "vc": [0.9] * 3})


def test_check_submission_lists_every_problem_with_three_examples_each(tmp_path):
    path = tmp_path / "submission.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("submission.json", json.dumps({**{f"x{i}.png": 9 for i in range(5)}, "a.png": 0}))
    listed = ["a.png", *(f"q{i}.png" for i in range(5))]
    with pytest.raises(ValueError) as err:
        check_submission(path, "track1", listed)
    assert str(err.value) == (
        f"{path} is not a valid submission:\n"
        "- 5 listed queries missing, e.g. ['q0.png', 'q1.png', 'q2.png']\n"
        "- 5 keys are not listed queries, e.g. ['x0.png', 'x1.png', 'x2.png']\n"
        "- 5 answers are not label ids 0-6, e.g. ['x0.png: 9', 'x1.png: 9', 'x2.png: 9']\n"
        "Fix the predictions and write it again; do not upload this file.")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("submission_i2i.json", json.dumps({"a.png": "a.png", "b.png": "z.png"}))
    with pytest.raises(ValueError, match=re.escape("2 answers are not gallery images other than the query, e.g. "
                                                   "[\"a.png -> 'a.png'\", \"b.png -> 'z.png'\"]")):
        check_submission(path, "track2", ["a.png", "b.png"], gallery=["a.png", "b.png"])
    message = f"{path}: pass gallery= (the image names a track2 answer may use)."
    with pytest.raises(ValueError, match=re.escape(message)):
        check_submission(path, "track2", ["a.png", "b.png"])
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("submission.json", '{"a": 0, "a": 1, "b": 0, "b": 1, "c": 0, "c": 1, "d": 0, "d": 1}')
    with pytest.raises(ValueError, match=re.escape("the JSON repeats keys ['a', 'b', 'c'].")):
        check_submission(path, "track1", ["a", "b", "c", "d"])


def test_fusion_choice_arrays_are_ids_and_flags_and_a_bad_rule_is_named():
    proto, probs, y = random_fusion_inputs(40, seed=22)
    choice = choose_fusion("hybrid", proto, probs, y, np.arange(40) % 4)
    assert choice.oof_pred.dtype == np.int64 and choice.oof_fallback.dtype == bool
    assert choose_fusion("soft", proto, probs, y, np.arange(40) % 4).oof_pred.dtype == np.int64
    with pytest.raises(ValueError, match=re.escape("rule must be 'hybrid' (threshold) or 'soft' (weight); got 'max'.")):
        choose_fusion("max", proto, probs, y, np.arange(40) % 4)


def test_best_grid_value_compares_scores_not_rounded_to_whole_numbers():
    grid = [0.1, 0.2, 0.3]
    assert best_grid_value(grid, [0.9, 0.8, 0.8], [0.5] * 3) == 0.1  # 0.9 beats 0.8 (both near 1)
    assert best_grid_value(grid, [0.8, 0.8, 0.8], [0.6, 0.6, 0.7]) == 0.3  # accuracy 0.7 beats 0.6


def test_bootstrap_defaults_index_name_and_that_every_image_can_be_resampled():
    y, pred = _noisy_predictions(50, seed=23)
    ci = bootstrap_ci(y, pred)
    assert ci.equals(bootstrap_ci(y, pred, n_boot=1000, seed=0, alpha=0.05)) and ci.index.name == "metric"
    wrong_first = bootstrap_ci([1] + [0] * 19, [0] * 20, n_boot=200)  # only image 0 is misclassified
    assert wrong_first.loc["accuracy", "low"] < 1.0 and wrong_first.loc["accuracy", "estimate"] == 0.95


def test_bootstrap_interval_ends_are_the_alpha_over_two_quantiles_not_nearby_ones(reference_bootstrap):
    y, pred, scores = reference_bootstrap
    alpha = 0.3
    ci = bootstrap_ci(y, pred, n_boot=5000, seed=0, alpha=alpha)
    for metric in ci.index:
        ref = scores[metric]
        for end, right, wrong in (("low", alpha / 2, alpha / 3), ("high", 1 - alpha / 2, 1 - alpha / 3)):
            got = ci.loc[metric, end]
            assert abs(got - np.quantile(ref, right)) < abs(got - np.quantile(ref, wrong)), (metric, end)


def test_region_ids_and_probabilities_may_come_as_columns_and_missing_probabilities_pick_the_first_label():
    coarse = np.array([[EAR], [NOSE], [VC]])  # (N, 1), as an argmax with keepdims gives them
    probs = {"ear": np.array([[0.9], [0.1], [0.1]]), "nose": [0.1, 0.1, 0.1], "vc": [None, 0.2, None]}
    assert names(region_then_fine(coarse, probs)) == ["ear-right", "nose-left", "vc-open"]  # None: as NaN
    assert region_then_fine(coarse, probs).shape == (3,)
    with pytest.raises(ValueError, match=re.escape("coarse ids must be in 0..3 (COARSE_CLASSES order).")):
        region_then_fine([4], {"ear": [0.9], "nose": [0.9], "vc": [0.9]})


def test_coarse_of_names_its_argument_when_an_id_is_out_of_range():
    with pytest.raises(ValueError, match=re.escape("label_ids ids must be in 0..6; got 0..7.")):
        coarse_of([0, 7])


def test_a_negative_id_without_a_class_count_is_reported_as_negative():
    # Known gap (benchmarks/MUTATION.md): with no class count the message claimed the range "0..0".
    with pytest.raises(ValueError) as err:
        batched_scores([-1, 2], [0, 1])
    assert str(err.value) == "y_true ids must be non-negative; got -1..2."


def test_soft_fusion_of_float32_probabilities_is_computed_in_float64():
    # torch hands out float32; a near tie that float32 arithmetic rounds away must still be decided
    proto = np.array([[0.5, 0.5 + 2**-24, 0.0, 0.0]], dtype=np.float32)  # nose ahead by one float32 step
    probs = {"coarse": np.array([[0.5, 0.5, 0.0, 0.0]], dtype=np.float32),
             **{t: np.array([0.9], dtype=np.float32) for t in FINE}}
    assert names(soft_fusion_predict(proto, probs, 0.35)) == ["nose-right"]
