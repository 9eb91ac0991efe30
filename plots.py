"""What entrep-prototypical.ipynb shows: figures and the closing report. Each figure helper takes arrays or
paths and returns a matplotlib Figure (never pyplot's global state); save_figure writes it under
output_dir/figures; run_report turns metrics.json's content into the text a saved notebook ends with.
Compute lives in utils.py, training.py and retrieval.py; this file only presents."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.metrics import confusion_matrix

from utils import SUBMISSIONS, ImageDecodeError, load_rgb


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a Figure, creating the folder; returns the path (the notebook shows the PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def load_thumbnail(path: str | os.PathLike, px: int = 256) -> np.ndarray:
    """load_rgb shrunk to fit px x px, (H, W, 3) uint8: what the figures draw."""
    im = load_rgb(path)
    im.thumbnail((px, px))
    return np.asarray(im)


def plot_image_grid(paths: Sequence[str | os.PathLike], titles: Sequence[str], title: str = "", ncols: int = 4,
                    px: int = 256) -> Figure:
    """Thumbnails (px on their long side, about as large on screen) with a title each; an image that
    cannot be read shows why instead."""
    if not len(paths):
        fig = Figure(figsize=(4, 1.5), layout="constrained")
        ax = fig.subplots()
        ax.text(0.5, 0.5, f"{title}: none", ha="center", va="center")
        ax.axis("off")
        return fig
    ncols = min(ncols, len(paths))
    nrows = -(-len(paths) // ncols)
    fig = Figure(figsize=(ncols * px / 80, nrows * px / 95), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, path, text in zip(axes, paths, titles):
        try:
            ax.imshow(load_thumbnail(path, px))
        except (ImageDecodeError, FileNotFoundError) as e:
            ax.text(0.5, 0.5, f"cannot load\n{Path(path).name}\n{type(e).__name__}", ha="center", va="center",
                    fontsize=7)
        ax.set_title(text, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def plot_embedding_projection(feats: torch.Tensor, labels: Sequence[int], names: Sequence[str],
                              protos: torch.Tensor | None = None, seed: int = 0) -> Figure:
    """PCA of embeddings coloured by class, with the prototypes (one per name) as labelled stars."""
    x = np.asarray(feats, dtype=np.float64)
    p = np.zeros((0, x.shape[1])) if protos is None else np.asarray(protos, dtype=np.float64)
    pca = PCA(n_components=2, random_state=seed).fit(x)
    xy, pxy = pca.transform(x), pca.transform(p) if len(p) else np.zeros((0, 2))
    palette, labels = sns.color_palette("tab10", len(names)), np.asarray(labels)
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    for c, name in enumerate(names):
        ax.scatter(*xy[labels == c].T, s=12, alpha=0.7, color=palette[c], label=f"{name} (n={(labels == c).sum()})")
    for c, (px, py) in enumerate(pxy):
        ax.scatter(px, py, marker="*", s=320, color=palette[c], edgecolor="black", linewidth=1.0, zorder=3)
        ax.annotate(names[c], (px, py), xytext=(5, 5), textcoords="offset points", fontsize=8, weight="bold")
    ax.set(xlabel="PCA 1", ylabel="PCA 2")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return fig


def plot_learning_curve(histories: pd.DataFrame | Mapping[str, pd.DataFrame], title: str = "") -> Figure:
    """Train / validation loss and the validation score per epoch of one run's history, or of several
    ({fold name: history}, one colour each), each run's best epoch marked."""
    runs = {"": histories} if isinstance(histories, pd.DataFrame) else dict(histories)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_score = fig.subplots(1, 2)
    for (name, h), color in zip(runs.items(), sns.color_palette("tab10", len(runs))):
        tag = f" {name}" if name else ""
        ax_loss.plot(h["epoch"], h["train_loss"], marker="o", color=color, label=f"train{tag}")
        ax_loss.plot(h["epoch"], h["val_loss"], marker="o", linestyle=":", color=color, label=f"validation{tag}")
        ax_score.plot(h["epoch"], h["val_score"], marker="o", color=color, label=f"validation macro F1{tag}")
        best = h.loc[h["val_score"].idxmax(), "epoch"]
        for ax in (ax_loss, ax_score):
            ax.axvline(best, color=color if name else "grey", linestyle="--", linewidth=1,
                       label=f"best epoch {int(best)}{tag}")
    ax_loss.set(xlabel="epoch", ylabel="multi-task loss", title="Loss")
    ax_score.set(xlabel="epoch", ylabel="macro F1 (dino_val_score)", title="Validation", ylim=(0, 1.02))
    for ax in (ax_loss, ax_score):
        ax.legend(fontsize=7 if len(runs) > 1 else 8)
    if title:
        fig.suptitle(title)
    return fig


def plot_threshold_sweep(sweep: pd.DataFrame, chosen: float) -> Figure:
    """Accuracy, macro F1 (and the fraction sent to DINOv2) against the swept value (the sweep's first
    column), with the chosen value marked."""
    param = sweep.columns[0]
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for column, name in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        (line,) = ax.plot(sweep[param], sweep[column], label=name)
        ax.plot([chosen], [np.interp(chosen, sweep[param], sweep[column])], "o", color=line.get_color())
    if "fallback_fraction" in sweep:
        ax.plot(sweep[param], sweep["fallback_fraction"], "--", color="gray", label="fraction to DINOv2")
    ax.axvline(chosen, color="black", linestyle=":", label=f"chosen {param} = {chosen:g}")
    ax.set(xlabel=param, ylabel="validation score (in-sample)", ylim=(0, 1.02), title=f"{param} sweep")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_confusion(y_true, y_pred, names: Sequence[str], title: str = "") -> Figure:
    """Confusion matrices (rows true, columns predicted; ids = positions in names): counts, then
    row-normalised (recall on the diagonal)."""
    side = 1.0 + 0.6 * len(names)
    fig = Figure(figsize=(2 * side, side), layout="constrained")
    for ax, mode in zip(fig.subplots(1, 2), (None, "true")):
        cm = confusion_matrix(y_true, y_pred, labels=range(len(names)), normalize=mode)
        sns.heatmap(cm, annot=True, fmt=".2f" if mode else "d", cmap="Blues", cbar=False, square=True,
                    vmin=0, xticklabels=names, yticklabels=names, ax=ax)
        ax.set(xlabel="predicted", ylabel="true", title="row-normalised" if mode else "counts")
    if title:
        fig.suptitle(title)
    return fig


def plot_retrieval_gallery(query_paths: Sequence[str], ranked_paths: Sequence[Sequence[str]], hits: np.ndarray,
                           k: int = 5, row_labels: Sequence[str] | None = None) -> Figure:
    """One row per query: the query (blue frame), then its top k, relevant ones framed green, others red.
    row_labels title each row's query (e.g. the same query twice, "frozen" then "fine-tuned")."""
    fig = Figure(figsize=(2.0 * (k + 1), 2.1 * len(query_paths)), layout="constrained")
    axes = fig.subplots(max(len(query_paths), 1), k + 1, squeeze=False)
    for q, query in enumerate(query_paths):
        cells = [(query, "tab:blue", row_labels[q] if row_labels else "query")]
        cells += [(ranked_paths[q][j], "tab:green" if hits[q][j] else "tab:red", f"#{j + 1}")
                  for j in range(min(k, len(ranked_paths[q])))]
        for ax, (path, color, title) in zip(axes[q], cells):
            ax.imshow(load_thumbnail(path, 256))
            ax.set(xticks=[], yticks=[])
            ax.set_title(title, fontsize=8)
            for spine in ax.spines.values():
                spine.set(edgecolor=color, linewidth=4)
    return fig


def run_report(metrics: Mapping, out: str | os.PathLike, rows: int = 3) -> str:
    """The summary a saved notebook ends with, from metrics.json's content: validation scores with their
    intervals, the choices frozen for the test, time and peak memory per stage, disk used, and the first
    rows of each submission file."""
    lines = ["Validation, 7 classes (95% bootstrap intervals):"]
    for model, r in metrics.get("comparison_fine", {}).items():
        lines.append(f"  {model:<12} accuracy {r['accuracy']:.3f} [{r['accuracy_low']:.3f}, {r['accuracy_high']:.3f}]"
                     f"  macro F1 {r['macro_f1']:.3f} [{r['macro_f1_low']:.3f}, {r['macro_f1_high']:.3f}]")
    hybrid, ret = metrics.get("hybrid", {}), metrics.get("retrieval", {})
    chosen = {t: ret.get(t, {}).get("selection", {}).get("chosen", "-") for t in ("i2i", "t2i")}
    lines += [f"Choices: hybrid threshold {hybrid.get('threshold', '-')}, soft-fusion weight "
              f"{hybrid.get('soft_weight', '-')}; Track 2 {chosen['i2i']}; Track 3 {chosen['t2i']}",
              "Stages: seconds, peak memory (process / GPU MB):"]
    lines += [f"  {name:<34} {r['seconds']:>9.1f} s  {r['peak_rss_mb']:>8.0f} / {r['peak_gpu_mb']:.0f}"
              for name, r in metrics.get("stages", {}).items()]
    lines.append(f"Total {metrics.get('total_s', 0):.0f} s; output_dir holds "
                 f"{metrics.get('disk_used_bytes', 0) / 2**30:.2f} GB")
    for track, (zip_name, json_name) in SUBMISSIONS.items():
        path = Path(out) / zip_name
        if path.is_file():
            with zipfile.ZipFile(path) as zf:
                answers = json.loads(zf.read(json_name))
            lines.append(f"{zip_name} ({len(answers)} answers): " + ", ".join(
                f"{k!r}: {v!r}" for k, v in list(answers.items())[:rows]))
    return "\n".join(lines)
