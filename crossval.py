"""The evaluation protocol of entrep-prototypical.ipynb for Track 1: out of fold, and fold ensembles.

Every labelled image is predicted by the models of the one fold that holds it out (utils.make_folds: no
image of its content groups was trained on or chosen with); the predictions of every fold are gathered
into one out-of-fold (OOF) table that every figure and score of the notebook comes from; the test lists
are answered by the fold models together: their prototype and DINOv2 probabilities averaged, then the
hybrid rule with the threshold chosen on the OOF predictions. With cv_folds=1 the one "fold" is the
validation split and everything is as it was before cross-validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from runtime import Runtime
from utils import (COARSE_CLASSES, FINE_TASKS, FUSION_FOLDS, LABELS, FeatureTable, Fold, FusionChoice,
                   PrototypeClassifier, Trained, choose_fusion, coarse_of, comparison_table, dino_labels,
                   grouped_fold_ids, hybrid_predict, predict_dino, soft_fusion_predict, split_groups,
                   summary_metrics)

MODELS: tuple[str, ...] = ("prototypes", "DINOv2", "hybrid", "soft fusion")  # the 7-class predictions compared


@dataclass(frozen=True)
class Reading:
    """How DINOv2 reads images at prediction time: flip TTA and the square (utils.to_square)."""

    tta_flip: bool = True
    resize: str = "crop"


def model_outputs(rows: pd.DataFrame, protos: Mapping[str, PrototypeClassifier], models: Sequence[Trained],
                  clip_feats: FeatureTable, rt: Runtime, content: Mapping[str, str] | None,
                  reading: Reading) -> dict:
    """A fold's models on `rows` (columns path): {"proto_coarse": (N, 4), "proto_fine": (N, 7) prototype
    probabilities, "dino": predict_dino's head probabilities}."""
    feats = clip_feats[rows["path"]]
    return {"proto_coarse": protos["coarse"].predict_proba(feats).numpy(),
            "proto_fine": protos["fine"].predict_proba(feats).numpy(),
            "dino": predict_dino(list(models), rows["path"].tolist(), rt, content, reading.tta_flip, reading.resize)}


def fold_outputs(fold: Fold, protos: Mapping[str, PrototypeClassifier], models: Sequence[Trained],
                 clip_feats: FeatureTable, rt: Runtime, content: Mapping[str, str] | None,
                 reading: Reading) -> tuple[dict, dict]:
    """model_outputs on the fold's choice images and on its out-of-fold images (computed once when they are
    the same images)."""
    choose = model_outputs(fold.choose, protos, models, clip_feats, rt, content, reading)
    same = fold.choose is fold.predict
    return choose, choose if same else model_outputs(fold.predict, protos, models, clip_feats, rt, content, reading)


@dataclass(frozen=True)
class FoldResult:
    """One fold's choices, made on fold.choose, and its predictions of fold.predict (MODELS order)."""

    hybrid: FusionChoice
    soft: FusionChoice
    pred: dict[str, np.ndarray]
    fell_back: np.ndarray
    outputs: dict  # model_outputs on fold.predict


def fit_fold_fusion(fold: Fold, choose: dict, predict: dict, i2i: pd.DataFrame, seed: int) -> FoldResult:
    """The hybrid threshold and the soft-fusion weight chosen on fold.choose (cross-fitted over its grouped
    folds, as utils.choose_fusion does), then fold.predict predicted with them. When choose and predict are
    the same images (one fold), its predictions are the cross-fitted ones: each image with a value chosen
    without it."""
    y = fold.choose["label_id"].to_numpy()
    within = grouped_fold_ids(y, split_groups(fold.choose, i2i), FUSION_FOLDS, seed)
    hybrid, soft = (choose_fusion(rule, choose["proto_coarse"], choose["dino"], y, within)
                    for rule in ("hybrid", "soft"))
    if fold.choose is fold.predict:
        hybrid_pred, fell_back, soft_pred = hybrid.oof_pred, hybrid.oof_fallback, soft.oof_pred
    else:
        hybrid_pred, fell_back = hybrid_predict(predict["proto_coarse"], predict["dino"], hybrid.chosen)
        soft_pred = soft_fusion_predict(predict["proto_coarse"], predict["dino"], soft.chosen)
    dino = predict["dino"]
    pred = {"prototypes": predict["proto_fine"].argmax(1),
            "DINOv2": dino_labels(dino), "hybrid": hybrid_pred, "soft fusion": soft_pred}
    return FoldResult(hybrid, soft, pred, fell_back, predict)


def out_of_fold(folds: Sequence[Fold], results: Sequence[FoldResult]) -> tuple[pd.DataFrame, dict]:
    """Every fold's predictions in one table, one row per labelled image (folds in order): file, path, sha1,
    fold, true, each of MODELS, fell_back; and the OOF model outputs stacked in the same row order."""
    table = pd.concat([f.predict[["file", "path", "sha1"]].assign(
        fold=f.name, true=f.predict["label_id"].to_numpy(), **r.pred, fell_back=r.fell_back)
        for f, r in zip(folds, results)], ignore_index=True)
    outputs = {"proto_coarse": np.concatenate([r.outputs["proto_coarse"] for r in results]),
               "dino": {task: np.concatenate([r.outputs["dino"][task] for r in results])
                        for task in results[0].outputs["dino"]}}
    return table, outputs


def per_fold_scores(oof: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy and macro F1 of each model in each fold, {fold: {model: {accuracy, macro_f1}}}: the spread
    behind the out-of-fold figures."""
    return {fold: {model: {k: v for k, v in summary_metrics(g["true"], g[model]).items() if k != "weighted_f1"}
                   for model in MODELS} for fold, g in oof.groupby("fold", sort=False)}


def ensemble_outputs(protos: Sequence[Mapping[str, PrototypeClassifier]], models: Sequence[Sequence[Trained]],
                     paths: Sequence[str], clip_feats: FeatureTable, rt: Runtime,
                     content: Mapping[str, str] | None, reading: Reading) -> tuple[dict, pd.DataFrame]:
    """The fold models on `paths`, averaged: {"proto_coarse": mean over the folds' coarse prototype
    probabilities, "dino": mean over every DINOv2 model set of its head probabilities}; and each set's
    probabilities as a table (for blending): path, source, then one column per class or head."""
    rows = pd.DataFrame({"path": list(paths)})
    coarse = [p["coarse"].predict_proba(clip_feats[rows["path"]]).numpy() for p in protos]
    dino = [predict_dino(list(m), rows["path"].tolist(), rt, content, reading.tta_flip, reading.resize)
            for m in models]
    mean = {"proto_coarse": np.mean(coarse, axis=0),
            "dino": {task: np.mean([d[task] for d in dino], axis=0) for task in dino[0]}}
    table = pd.concat([_probability_frame(paths, f"prototypes {i + 1}", {"coarse": c}) for i, c in enumerate(coarse)]
                      + [_probability_frame(paths, f"DINOv2 {i + 1}", d) for i, d in enumerate(dino)],
                      ignore_index=True)
    return mean, table


def ensemble_gain(oof: pd.DataFrame, outputs: Mapping, held: np.ndarray, ensemble: Mapping, seed: int,
                  groups=None) -> pd.DataFrame:
    """What averaging the fold models gains, measured without test labels: on the labelled images of the
    retrieval hold-out (`held` (N,) bool over oof's rows), which no fold model trained on or chose with, each
    image's own fold model (its out-of-fold row) against every fold model averaged (`ensemble`:
    ensemble_outputs on those images, in the same order). The ensemble's hybrid threshold is chosen, as the
    test's is, on the out-of-fold predictions, here of the other images only. Rows: DINOv2 and hybrid, one fold
    model and the fold ensemble; accuracy, macro F1, weighted F1 with paired bootstrap bounds (`groups` over
    the held images, as comparison_table)."""
    rest = ~held
    threshold = choose_fusion("hybrid", outputs["proto_coarse"][rest], {t: p[rest] for t, p in outputs["dino"].items()},
                              oof["true"].to_numpy()[rest], pd.factorize(oof["fold"][rest])[0]).chosen
    dino = ensemble["dino"]
    predictions = {"DINOv2, one fold model": oof["DINOv2"].to_numpy()[held],
                   "DINOv2, fold ensemble": dino_labels(dino),
                   "hybrid, one fold model": oof["hybrid"].to_numpy()[held],
                   "hybrid, fold ensemble": hybrid_predict(ensemble["proto_coarse"], dino, threshold)[0]}
    return comparison_table(predictions, oof["true"].to_numpy()[held], seed, groups)


def _probability_frame(paths: Sequence[str], source: str, probs: Mapping[str, np.ndarray]) -> pd.DataFrame:
    columns = {"path": list(paths), "source": source}
    for task, p in probs.items():
        names = [f"p_{c}" for c in COARSE_CLASSES] if task == "coarse" else [f"p_{FINE_TASKS[task][1]}"]
        columns |= dict(zip(names, np.asarray(p).reshape(len(paths), -1).T))
    return pd.DataFrame(columns)


def oof_csv(oof: pd.DataFrame) -> pd.DataFrame:
    """oof_predictions.csv: one row per labelled image: image name, fold, true label, each model's label."""
    names = lambda ids: [LABELS[i] for i in ids]
    return pd.DataFrame({"image": oof["file"], "fold": oof["fold"], "true": names(oof["true"]),
                         **{model: names(oof[model]) for model in MODELS}})


def prototype_metrics(folds: Sequence[Fold], protos: Sequence[Mapping[str, PrototypeClassifier]], oof: pd.DataFrame,
                      oof_outputs: Mapping) -> dict:
    """metrics.json's "prototypes": per level the weight, temperature and prompt set chosen (per fold, with
    several) and the out-of-fold accuracy, macro F1 and weighted F1 (coarse: the 4-way gate)."""
    scores = {"coarse": summary_metrics(coarse_of(oof["true"]), oof_outputs["proto_coarse"].argmax(1)),
              "fine": summary_metrics(oof["true"], oof["prototypes"])}
    out = {}
    for level in scores:
        chosen = [{"weight": p[level].weight, "temperature": p[level].temperature,
                   "with_descriptions": p[level].with_descriptions} for p in protos]
        out[level] = {**(chosen[0] if len(folds) == 1 else {"per_fold": dict(zip((f.name for f in folds), chosen))}),
                      **scores[level]}
    return out


def threshold_selection(results: Sequence[FoldResult], n: int) -> tuple[tuple[float, ...], str]:
    """The hybrid thresholds behind the out-of-fold figures (one per fold; with one fold, one per
    cross-fitting fold of the validation split) and a sentence saying how they were chosen (n images)."""
    if len(results) > 1:
        return tuple(r.hybrid.chosen for r in results), f"chosen in each of {len(results)} folds on its choice images"
    per_fold = results[0].hybrid.fold_values
    return per_fold, (f"{len(per_fold)}-fold cross-fitting on {n} images" if len(per_fold) > 1
                      else f"in-sample on {n} images (too few to cross-fit)")
