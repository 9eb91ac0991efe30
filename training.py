"""Fine-tuning for entrep-prototypical.ipynb: one training harness and the two things trained with it.

1. Harness    a resumable, content-keyed epoch runner (fit): run identity, resume, reuse of a finished
              run, checkpoints, AMP and its scaler, warmup + cosine, per-epoch seeding, one progress
              bar, evaluation with patience; and the one training augmentation
2. DINOv2     the coarse head and the three binary decisions, flips with label swap (the paper's models)
3. Retrieval  contrastive fine-tuning of BiomedCLIP for Tracks 2 and 3 (beyond the paper)

As nanoGPT keeps train.py apart from model.py: utils.py holds the models and what they predict, this file
how they are trained. A recipe (DinoTraining, RetrievalTraining) states only what is its own (its data,
its loss, its evaluation); fit() does the rest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import timm.data
import timm.optim
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T
from tqdm import tqdm

from runtime import Runtime, atomic_save, autocast, data_parallel, prune_runs, save_json, seed_everything
from runtime import progress as progress_bar
from utils import (COARSE_TO_ID, DINO_TASKS, FINE_DECISION_THRESHOLD, FINE_TASKS, LABEL_ID_TO_COARSE_ID, LABEL_TO_ID,
                   LABELS, MIXES, RETRIEVAL_TUNINGS, Clip, DinoClassifier, PadToSquare, SquareImages, Trained,
                   coarse_of, collect_logits, dino_data_config, dino_image_size, dino_labels, dino_transform,
                   file_sha1, finding_key, make_loader, model_fingerprint, seeded_rng, task_probs)

# =============================================================================================
# 1. The harness: one resumable, content-keyed epoch runner
# =============================================================================================

# The training augmentation of DINOv2 and of BiomedCLIP (project's choice): the crop keeps >= 70% of the
# field of view, +-15 deg mimics scope roll, black fill matches the endoscope background. Horizontal
# flips come with the label swap (SquareImages), never from timm.
TRAIN_AUGMENT: Mapping[str, object] = {"scale": (0.7, 1.0), "ratio": (3 / 4, 4 / 3), "rotate_degrees": 15.0,
                                       "color_jitter": 0.2}
TRAIN_CACHE_SCALE: float = 1.15  # training squares are cached this much larger than the input, for crops


def train_square_side(image_size: int) -> int:
    """Side of the uint8 squares a training set caches: TRAIN_CACHE_SCALE larger than the input, for crops."""
    return math.ceil(image_size * TRAIN_CACHE_SCALE)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    interpolation: str = "bicubic") -> T.Compose:
    """TRAIN_AUGMENT with the model's own mean, std and interpolation: rotation with black fill, then
    timm's random-resized crop and colour jitter (create_transform), never a flip."""
    aug = TRAIN_AUGMENT
    rotate = T.RandomRotation(aug["rotate_degrees"], interpolation=T.InterpolationMode.BILINEAR, fill=0)
    return T.Compose([rotate, timm.data.create_transform(
        (3, image_size, image_size), is_training=True, hflip=0.0, scale=aug["scale"], ratio=aug["ratio"],
        color_jitter=aug["color_jitter"], interpolation=interpolation, mean=tuple(mean), std=tuple(std))])


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed that depends only on (seed, epoch): what each epoch of a resumable run draws from."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])  # uint32: fits every seeder


class EpochSampler(Sampler):
    """Yields (index, sample seed) pairs whose order and seeds depend only on (seed, epoch): a run resumed
    at epoch e sees exactly the batches and augmentations of an uninterrupted run. set_epoch first.
    With `groups` (one id per item), the members of a group come one after another (groups in random
    order), so contrastive batches hold positives."""

    def __init__(self, n: int, seed: int, groups: Sequence | None = None):
        self.n, self.seed, self.epoch = n, seed, 0
        self.groups = None if groups is None else torch.as_tensor(np.unique(np.asarray(groups), return_inverse=True)[1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=generator)
        seeds = torch.randint(0, 2**62, (self.n,), generator=generator)
        if self.groups is not None:
            group_rank = torch.randperm(int(self.groups.max()) + 1, generator=generator)[self.groups[order]]
            order = order[torch.sort(group_rank, stable=True).indices]
        return iter(zip(order.tolist(), seeds.tolist()))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps` optimizer steps, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   scaler: torch.amp.GradScaler, max_grad_norm: float | None = None) -> None:
    """Clip (optional), step and zero the gradients through the GradScaler, then the schedule, unless fp16
    skipped the step on inf/NaN gradients (the scale then drops): the schedule waits for the optimizer, as
    transformers' Trainer does, and torch never warns of a scheduler step before the optimizer's."""
    if max_grad_norm:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scaler.get_scale() >= scale:
        scheduler.step()


@dataclass(frozen=True)
class TrainConfig:
    """What every fine-tuning here shares; saved in each run's config.json and part of its identity.
    AdamW with linear warmup then cosine per optimizer step; grad_accum batches per step; gradient-norm
    clipping at max_grad_norm (None: off); early stopping after `patience` epochs without a better
    validation score (None: off; recipes that evaluate only); data order, augmentation and the global RNGs
    of each epoch drawn from (seed, epoch)."""

    epochs: int = 20
    batch_size: int = 32
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_accum: int = 1
    max_grad_norm: float | None = None
    patience: int | None = None
    seed: int = 0


class Recipe:
    """One training run as fit() needs it. A recipe sets kind (the run folder's prefix), identity (what the
    run is made of, hashed into its id), model (trained in place), cfg and saved_keys (the state_dict keys a
    checkpoint holds; None: all), and implements loader() (over an EpochSampler), param_groups() and
    loss(net, batch); evaluate() -> {"val_score": higher is better, ...} is optional."""

    kind: str
    identity: dict
    model: nn.Module
    cfg: TrainConfig
    saved_keys: frozenset[str] | None = None
    data_parallel: bool = True  # whether each batch may be split over rt.gpus (the loss calls net(x))
    evaluates: bool = False  # whether evaluate() scores each epoch (the best epoch is kept), else the last

    def loader(self) -> DataLoader:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def loss(self, net: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the model."""
        state = self.model.state_dict()
        return state if self.saved_keys is None else {k: v for k, v in state.items() if k in self.saved_keys}

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights, strict=self.saved_keys is None)


def _read(path: Path) -> dict | None:
    """A checkpoint (torch.load, weights only) or a JSON record; None when absent or unreadable (reported)."""
    if not path.exists():
        return None
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle / zip / JSON errors of several kinds
        warnings.warn(f"{path} cannot be loaded ({type(e).__name__}: {e}); that run is trained again.")
        return None


class RunFolder:
    """checkpoint_dir/<kind>_<id>/, the files of one training run; <id> hashes the recipe's identity.

    config.json  the identity, written when training starts
    last.pt      model, optimizer, scheduler, scaler and progress after each epoch, only while unfinished
    best.pt      the weights to use: the best epoch's when the recipe evaluates, else the last epoch's
    done.json    the history of a finished run; with best.pt all that a finished run keeps on disk
    """

    def __init__(self, checkpoint_dir: str | Path | None, kind: str, identity: dict):
        if checkpoint_dir is None:
            raise ValueError("training needs a Runtime with checkpoint_dir (e.g. output_dir/checkpoints).")
        self.identity = identity
        self.run_id = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        self.dir = Path(checkpoint_dir) / f"{kind}_{self.run_id[:12]}"
        self.best, self.last, self.done = self.dir / "best.pt", self.dir / "last.pt", self.dir / "done.json"

    def finished(self) -> tuple[list[dict], dict] | None:
        """(history, best.pt) of a finished run of this identity, when both can be read."""
        done = _read(self.done)
        best = _read(self.best) if done is not None and done.get("run_id") == self.run_id else None
        return (done["history"], best) if best is not None else None

    def progress(self, needs_best: bool) -> dict | None:
        """last.pt of an unfinished run of this identity (and its best.pt loads, when the recipe evaluates)."""
        last = _read(self.last)
        if last is None or last.get("run_id") != self.run_id or (needs_best and _read(self.best) is None):
            return None
        return last

    def start(self) -> None:
        save_json({"run_id": self.run_id, **self.identity}, self.dir / "config.json")

    def save_progress(self, progress: dict) -> None:
        atomic_save({"run_id": self.run_id, **progress}, self.last)

    def finish(self, history: list[dict], weights: dict | None) -> None:
        """Write best.pt from `weights` (None: the best epoch's is already there) and done.json; drop last.pt."""
        if weights is not None:
            atomic_save({"model": weights, "epoch": len(history)}, self.best)
        save_json({"run_id": self.run_id, "history": history}, self.done)
        self.last.unlink(missing_ok=True)


class _Optimization:
    """AdamW over a recipe's parameter groups, warmup + cosine per optimizer step, and a GradScaler (on
    for fp16 autocast only), saved and restored together."""

    def __init__(self, recipe: Recipe, batches: int, rt: Runtime):
        cfg = recipe.cfg
        steps = math.ceil(batches / cfg.grad_accum)
        self.optimizer = torch.optim.AdamW(recipe.param_groups())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: warmup_cosine(
            step, round(cfg.warmup_epochs * steps), cfg.epochs * steps))
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == torch.float16)
        self.max_grad_norm = cfg.max_grad_norm

    def step(self) -> None:
        optimizer_step(self.optimizer, self.scheduler, self.scaler, self.max_grad_norm)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, dict]) -> None:
        for key, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("scaler", self.scaler)):
            if state[key]:  # the scaler's is empty unless fp16
                obj.load_state_dict(state[key])

    def learning_rates(self) -> dict[str, float]:
        """The largest learning rate of each named parameter group now: {"lr_<name>": lr}."""
        out: dict[str, float] = {}
        for g in self.optimizer.param_groups:
            out[f"lr_{g.get('name', 'all')}"] = max(out.get(f"lr_{g.get('name', 'all')}", 0.0), g["lr"])
        return out


def _train_epoch(net: nn.Module, loader: DataLoader, recipe: Recipe, opt: _Optimization, rt: Runtime) -> float:
    """One pass; an optimizer + scheduler step every cfg.grad_accum batches (the last group may be
    shorter and is averaged over its own size). Returns the mean batch loss."""
    net.train()
    n, total, accum = len(loader), 0.0, recipe.cfg.grad_accum
    for i, batch in enumerate(loader):
        group = min(accum, n - (i // accum) * accum)
        with autocast(rt.device, rt.amp):
            loss = recipe.loss(net, batch)
        opt.scaler.scale(loss / group).backward()
        if (i + 1) % accum == 0 or i + 1 == n:
            opt.step()
        total += loss.item()
    return total / max(n, 1)


def fit(recipe: Recipe, rt: Runtime) -> Trained:
    """Train `recipe` in its RunFolder under rt.checkpoint_dir, or reuse it: a finished run of the same
    identity (here, or copied in from rt.reuse_from) is loaded, an unfinished one resumed. Each epoch seeds
    its data order, augmentation and the global RNGs (drop-path, dropout) from (seed, epoch), so a resumed
    run ends with the weights of an uninterrupted one. rt.gpus > 1 splits each batch over that many GPUs
    (DataParallel: the same loss as one GPU). No epoch starts that would end after rt.deadline: the run then
    stops resumable, with the best weights so far (Trained.finished False). One progress bar, over epochs.
    The model ends in eval mode holding the weights to use."""
    run, model, cfg = RunFolder(rt.checkpoint_dir, recipe.kind, recipe.identity), recipe.model, recipe.cfg
    if (reused := _open(run, recipe, rt)) is not None:
        return reused
    model.to(rt.device)
    loader = recipe.loader()
    opt = _Optimization(recipe, len(loader), rt)
    evaluates = recipe.evaluates
    progress = run.progress(needs_best=evaluates) or {"epoch": 0, "history": [], "best_score": -math.inf,
                                                       "best_epoch": 0}
    if "model" in progress:
        recipe.load(progress["model"])
        opt.load_state_dict(progress)
        tqdm.write(f"{recipe.kind}: resuming {run.dir} after epoch {progress['epoch']}/{cfg.epochs}.")
    net = data_parallel(model, rt) if recipe.data_parallel else model
    bar = progress_bar(total=cfg.epochs, initial=progress["epoch"], desc=recipe.kind, disable=not rt.progress)
    finished = False
    for epoch in range(progress["epoch"], cfg.epochs):
        if rt.deadline and time.time() + (progress["history"] or [{"seconds": 0.0}])[-1]["seconds"] > rt.deadline:
            break
        finished = _epoch(epoch, net, loader, recipe, opt, progress, run, rt)
        row = progress["history"][-1]
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_score") if k in row}, refresh=False)
        bar.update(1)  # one line per epoch in a saved notebook
        if finished:
            break
    bar.total = bar.n  # an early stop ends the bar at 100% too
    bar.close()
    return _result(run, recipe, progress["history"], finished, evaluates, rt)


def _open(run: RunFolder, recipe: Recipe, rt: Runtime) -> Trained | None:
    """A finished run of the recipe's identity, loaded (copied in from rt.reuse_from first when it is only
    there); else None, with the run folder started and the run folders this run does not use pruned to
    rt.keep_runs (said so)."""
    if rt.copy_in(run.dir, rt.checkpoint_dir):
        tqdm.write(f"{recipe.kind}: copied {run.dir.name} from reuse_from={rt.reuse_from}.")
    elif rt.reuse_from is not None:
        tqdm.write(f"{recipe.kind}: reuse_from={rt.reuse_from} holds no run {run.dir.name}; it runs here.")
    if (found := run.finished()) is not None:
        os.utime(run.dir)  # in use: never pruned by this run
        tqdm.write(f"{recipe.kind}: reusing finished run {run.dir} ({len(found[0])} epochs), no training.")
        recipe.load(found[1]["model"])
        return Trained(recipe.model.to(rt.device).eval(), run.best, pd.DataFrame(found[0]), file_sha1(run.best))
    run.start()
    for folder in prune_runs(rt.checkpoint_dir, rt.keep_runs, rt.started) if rt.keep_runs is not None else []:
        tqdm.write(f"pruned {folder}: a run folder this run does not use (keep_runs={rt.keep_runs}).")
    return None


def _result(run: RunFolder, recipe: Recipe, history: list[dict], finished: bool, evaluates: bool,
            rt: Runtime) -> Trained:
    """The model with the weights to use: a finished run writes best.pt (unless the best epoch's is there)
    and done.json; a run stopped by the deadline keeps last.pt to resume from, and uses its best epoch so far
    (or its last, when it does not evaluate; its initial weights, when no epoch ran)."""
    if finished:
        run.finish(history, None if evaluates else recipe.weights())
    else:
        tqdm.write(f"{recipe.kind}: time budget spent after {len(history)}/{recipe.cfg.epochs} epochs; the run "
                   f"resumes from {run.last} (reuse_from, in a later session).")
    path = run.best if (finished or evaluates) and run.best.exists() else run.last
    if path.exists():
        recipe.load(torch.load(path, map_location="cpu", weights_only=True)["model"])
    weights_id = file_sha1(path) if path.exists() else model_fingerprint(recipe.model)
    return Trained(recipe.model.eval(), path, pd.DataFrame(history), weights_id, finished)


def _epoch(epoch: int, net: nn.Module, loader: DataLoader, recipe: Recipe, opt: _Optimization, progress: dict,
           run: RunFolder, rt: Runtime) -> bool:
    """Train and evaluate one epoch, record it in `progress`, write best.pt when it is the best so far and
    last.pt unless the run is finished (the last epoch, or `patience` epochs without a better score)."""
    started, cfg = time.perf_counter(), recipe.cfg
    loader.sampler.set_epoch(epoch)  # the data order and augmentations come from (seed, epoch) ...
    seed_everything(epoch_seed(cfg.seed, epoch))  # ... and drop-path's
    row = {"epoch": epoch + 1, "train_loss": _train_epoch(net, loader, recipe, opt, rt)}
    row |= recipe.evaluate() | opt.learning_rates()
    progress["history"].append(row | {"seconds": time.perf_counter() - started})
    score = row.get("val_score")
    if score is not None and score > progress["best_score"]:
        progress["best_score"], progress["best_epoch"] = score, epoch + 1
        atomic_save({"model": recipe.weights(), "epoch": epoch + 1, "val_score": score}, run.best)
    finished = epoch + 1 == cfg.epochs or (score is not None and bool(cfg.patience)
                                           and epoch + 1 - progress["best_epoch"] >= cfg.patience)
    if not finished:
        run.save_progress({**progress, "epoch": epoch + 1, "model": recipe.weights(), **opt.state_dict()})
    return finished


# =============================================================================================
# 2. DINOv2 fine-tuning: the coarse head and the three binary decisions
# =============================================================================================


def region_targets(label_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Official ids (B,) -> coarse ids (B,) and, per fine task, (mask (B,): the image is of that region,
    binary target (B,): index in FINE_TASKS[task], -1 outside the region)."""
    coarse = torch.tensor(LABEL_ID_TO_COARSE_ID, device=label_ids.device)[label_ids]
    fine = {}
    for task, pair in FINE_TASKS.items():
        target_of = torch.tensor([pair.index(n) if n in pair else -1 for n in LABELS], device=label_ids.device)
        fine[task] = (coarse == COARSE_TO_ID[task], target_of[label_ids])
    return coarse, fine


def multitask_loss(outputs: Mapping[str, torch.Tensor], label_ids: torch.Tensor,
                   weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over the heads in `outputs`: coarse cross-entropy over the batch, and each binary head's over
    its region's images only (an ear image adds nothing to the nose and vc terms; an absent region adds 0
    through `logits.sum() * 0`, so the graph stays whole). Class weights (class_weights) as in
    F.cross_entropy."""
    weights = weights or {}
    coarse, fine = region_targets(label_ids)
    loss = torch.zeros((), device=label_ids.device)
    for task, logits in outputs.items():
        mask, target = (torch.ones_like(coarse, dtype=torch.bool), coarse) if task == "coarse" else fine[task]
        loss = loss + (F.cross_entropy(logits[mask].float(), target[mask], weight=weights.get(task)) if mask.any()
                       else logits.sum() * 0.0)
    return loss


def class_weights(label_ids: Sequence[int], tasks: Sequence[str] = tuple(DINO_TASKS)) -> dict[str, torch.Tensor]:
    """Per head, sklearn's "balanced" weights n / (k * count_c) from the training labels (coarse: over the
    4 regions; a binary head: over its 2 labels among its region's images). An absent class gets 1.
    Chosen over a balanced sampler: the data order stays a plain (seed, epoch) permutation."""
    coarse, fine = region_targets(torch.as_tensor(list(label_ids), dtype=torch.long))
    ys = {"coarse": coarse, **{task: target[mask] for task, (mask, target) in fine.items()}}
    out = {}
    for task in tasks:
        counts = torch.bincount(ys[task], minlength=DINO_TASKS[task]).double()
        balanced = len(ys[task]) / (max(int((counts > 0).sum()), 1) * counts.clamp(min=1))
        out[task] = torch.where(counts > 0, balanced, torch.ones_like(balanced)).float()
    return out


def task_images(tasks: Sequence[str], label_ids: Sequence[int]) -> np.ndarray:
    """(N,) bool: the images a model with these heads trains and is scored on: all of them when it has
    the coarse head, else those of its binary heads' regions (the paper's separate binary classifiers)."""
    regions = np.asarray(LABEL_ID_TO_COARSE_ID)[np.asarray(label_ids, dtype=np.int64)]
    return np.ones(len(regions), bool) if "coarse" in tasks else np.isin(regions, [COARSE_TO_ID[t] for t in tasks])


@dataclass(frozen=True)
class DinoConfig(TrainConfig):
    """The DINOv2 fine-tuning recipe (project's choices; the paper gives none): TrainConfig with the heads
    at lr_head and the backbone at lr_backbone (optionally layer-decayed), no decay on norms, biases and
    tokens; class-weighted losses; flips with label swap at flip_p; gradient clipping at 1; early stopping
    after 5 epochs without a better validation score. resize: the square each frame becomes
    (utils.to_square); mix: same-label mixing (same_label_mix) of a batch's images at mix_p."""

    lr_head: float = 1e-3
    lr_backbone: float = 2e-5
    layer_decay: float | None = None
    max_grad_norm: float | None = 1.0
    patience: int | None = 5
    flip_p: float = 0.5
    resize: str = "crop"
    mix: str = "off"
    mix_p: float = 0.5
    mix_alpha: float = 1.0


def same_label_mix(x: torch.Tensor, y: torch.Tensor, mode: str, p: float = 0.5, alpha: float = 1.0) -> torch.Tensor:
    """The Track 1 winner's same-label mixing (ENTREP.md): each image of x (B, 3, H, W), with probability p,
    mixed with another image of the same label y (B,) in the batch ("mixup": lam * x + (1 - lam) * partner;
    "cutmix": a box of area 1 - lam of the partner pasted in), lam ~ Beta(alpha, alpha). Every label stays
    true, so the loss needs no soft targets. Draws from torch's global RNG, which the harness seeds per
    epoch: a resumed run mixes alike. "off": x itself."""
    if mode == "off":
        return x
    if mode not in MIXES:
        raise ValueError(f"mix={mode!r}: use one of {MIXES}.")
    b, (h, w), labels = len(y), x.shape[-2:], y.cpu()
    partner = torch.arange(b)
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        partner[members] = members[torch.randperm(len(members))]
    apply = (torch.rand(b) < p) & (partner != torch.arange(b))
    lam = torch.distributions.Beta(alpha, alpha).sample((b,))
    if mode == "mixup":
        keep = lam.view(b, 1, 1, 1).to(x)
    else:  # a box of side sqrt(1 - lam) of each side, centred anywhere, clipped at the border
        cy, cx, half = torch.rand(b) * h, torch.rand(b) * w, (1 - lam).sqrt() / 2
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        box = ((rows - cy.view(b, 1, 1)).abs() < half.view(b, 1, 1) * h) & \
              ((cols - cx.view(b, 1, 1)).abs() < half.view(b, 1, 1) * w)
        keep = (~box).unsqueeze(1).to(x)
    mixed = keep * x + (1 - keep) * x[partner.to(x.device)]
    return torch.where(apply.view(b, 1, 1, 1).to(x.device), mixed, x)


def param_groups(model: DinoClassifier, cfg: DinoConfig) -> list[dict]:
    """AdamW groups: heads at cfg.lr_head; backbone at cfg.lr_backbone (x layer_decay ** depth-from-top
    when set, timm's layer decay); no weight decay on biases, norms, tokens, pos-embed (timm's helpers)."""
    skip = model.backbone.no_weight_decay() if hasattr(model.backbone, "no_weight_decay") else ()
    if cfg.layer_decay is None:
        backbone = timm.optim.param_groups_weight_decay(model.backbone, cfg.weight_decay, no_weight_decay_list=skip)
    else:
        backbone = timm.optim.param_groups_layer_decay(model.backbone, cfg.weight_decay, no_weight_decay_list=skip,
                                                       layer_decay=cfg.layer_decay)
    for group in backbone:
        group["lr"] = cfg.lr_backbone * group.pop("lr_scale", 1.0)
    heads = [{**g, "lr": cfg.lr_head} for g in timm.optim.param_groups_weight_decay(model.heads, cfg.weight_decay)]
    groups = [{**g, "name": "backbone"} for g in backbone] + [{**g, "name": "heads"} for g in heads]
    return [g for g in groups if len(g["params"])]


def dino_val_score(probs: Mapping[str, np.ndarray], label_ids: np.ndarray) -> float:
    """Validation macro F1 of the decision a model's heads are reported with: all four heads -> 7 labels by
    region argmax then that region's binary head (dino_labels), as DINOv2 and the hybrid are scored;
    the coarse head alone -> 4 regions; one binary head -> its two labels on its region's images."""
    label_ids = np.asarray(label_ids)
    if set(DINO_TASKS) <= set(probs):
        truth, pred = label_ids, dino_labels(probs)
    elif "coarse" in probs:
        truth, pred = coarse_of(label_ids), probs["coarse"].argmax(1)
    else:
        (task,) = [t for t in probs if t in FINE_TASKS]
        mine = task_images((task,), label_ids)
        truth = (label_ids[mine] == LABEL_TO_ID[FINE_TASKS[task][1]]).astype(int)
        pred = (probs[task][mine] > FINE_DECISION_THRESHOLD).astype(int)
    return float(f1_score(truth, pred, average="macro", zero_division=0))


class DinoTraining(Recipe):
    """train_dino's recipe: a DinoClassifier on the images its heads are for (task_images), flips with label
    swap, class-weighted multi-task loss; each epoch scored by dino_val_score on the validation images (none:
    every epoch runs and the last one's weights are kept)."""

    def __init__(self, model: DinoClassifier, train: pd.DataFrame, val: pd.DataFrame | None, cfg: DinoConfig,
                 rt: Runtime, kind: str):
        if cfg.epochs < 1:
            raise ValueError(f"epochs={cfg.epochs}: fine-tuning needs at least 1 epoch.")
        self.evaluates = val is not None
        val = train.iloc[:0] if val is None else val
        self.train, self.val = (d[task_images(model.tasks, d["label_id"])] for d in (train, val))
        if self.train.empty or (self.evaluates and self.val.empty):
            raise ValueError(f"{kind}: no training or validation images for heads {model.tasks}; add labelled images.")
        self.model, self.cfg, self.rt, self.kind, self.size = model, cfg, rt, kind, dino_image_size(model)
        self.identity = {"initial_weights": model_fingerprint(model), "image_size": self.size, "tasks": model.tasks,
                         "train": [[s, int(y)] for s, y in zip(self.train["sha1"], self.train["label_id"])],
                         "val": [[s, int(y)] for s, y in zip(self.val["sha1"], self.val["label_id"])],
                         "config": {**asdict(cfg), "amp": str(rt.amp)},
                         "augment": {k: str(v) for k, v in TRAIN_AUGMENT.items()}}
        self.class_weights = {k: v.to(rt.device) for k, v in class_weights(self.train["label_id"], model.tasks).items()}

    def loader(self) -> DataLoader:
        data = dino_data_config(self.model, self.size)
        transform = train_transform(self.size, data["mean"], data["std"], data["interpolation"])
        images = SquareImages(self.train["path"].tolist(), self.train["label_id"].tolist(), transform,
                              train_square_side(self.size), self.cfg.flip_p, self.cfg.resize)
        return make_loader(images, self.cfg.batch_size, self.rt.num_workers, self.rt.device,
                           sampler=EpochSampler(len(images), self.cfg.seed))

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.cfg)

    def loss(self, net: nn.Module, batch) -> torch.Tensor:
        x, y = (t.to(self.rt.device, non_blocking=True) for t in batch)
        x = same_label_mix(x, y, self.cfg.mix, self.cfg.mix_p, self.cfg.mix_alpha)
        return multitask_loss(net(x), y, self.class_weights)

    @cached_property
    def val_loader(self) -> DataLoader:
        images = SquareImages(self.val["path"].tolist(), self.val["label_id"].tolist(),
                              dino_transform(self.model, self.size), self.size, resize=self.cfg.resize)
        return make_loader(images, self.cfg.batch_size, self.rt.num_workers, self.rt.device)

    def evaluate(self) -> dict[str, float]:
        if not self.evaluates:
            return {}
        logits, labels = collect_logits(self.model, self.val_loader, self.rt.device, self.rt.amp)
        cpu_weights = {k: v.cpu() for k, v in self.class_weights.items()}
        return {"val_loss": multitask_loss(logits, labels, cpu_weights).item(),
                "val_score": dino_val_score(task_probs(logits), labels.numpy())}


def train_dino(model: DinoClassifier, train: pd.DataFrame, val: pd.DataFrame, cfg: DinoConfig, rt: Runtime,
               name: str = "dino") -> Trained:
    """Fine-tune `model` (freshly built) on the `train` images its heads are for (columns path, label_id,
    sha1) with cfg, keeping the epoch that scores best on `val` (dino_val_score), in
    rt.checkpoint_dir/<name>_<id>/ (fit: <id> hashes the initial weights, image size, heads, every training
    and validation image's content and label, cfg, precision and the augmentation)."""
    return fit(DinoTraining(model, train, val, cfg, rt, name), rt)


def refit_dino(folds: Sequence[Mapping[str, Trained]], images: pd.DataFrame, cfg: DinoConfig, rt: Runtime,
               build: Callable[[tuple[str, ...]], DinoClassifier]) -> dict[str, Trained]:
    """One more model per model of the folds ({name: Trained} each), built by build(tasks) and trained on
    `images` for the folds' median best epoch with no early stopping: nothing is held out to choose an epoch
    on, so its last epoch's weights are kept (refit_full)."""
    out = {}
    for name, first in folds[0].items():
        epochs = int(np.median([fold[name].history["val_score"].idxmax() + 1 for fold in folds]))
        recipe = DinoTraining(build(first.model.tasks), images, None, replace(cfg, epochs=epochs, patience=None),
                              rt, f"dino_{name}_refit")
        out[name] = fit(recipe, rt)
    return out


# =============================================================================================
# 3. Learned retrieval (beyond the paper): contrastive fine-tuning of BiomedCLIP
# =============================================================================================

# What follows a tower's blocks (final norms, projections) in open_clip's two layouts: its own CLIP
# (the tiny model) and timm + Hugging Face towers (BiomedCLIP). Trained with the last blocks by "tail".
_TOWER_TAIL = re.compile(r"^(visual\.(proj|ln_post|trunk\.norm|trunk\.fc_norm|head)"
                         r"|text_projection|ln_final|text\.proj)")


@dataclass(frozen=True)
class RetrievalConfig(TrainConfig):
    """Contrastive fine-tuning of BiomedCLIP for retrieval (the project's recipe: the paper froze its
    embeddings). tuning "tail" trains the last `blocks` blocks of each tower with the final norms and
    projections; "lora" trains LoRA adapters of rank `lora_rank` (peft) on those blocks' linear layers;
    "off" trains nothing. The loss is multi-positive InfoNCE at `temperature`: text -> image and
    image -> text over the batch's finding lines (a line is positive for every image carrying it, never a
    negative), and image -> image over two augmented views per image (TRAIN_AUGMENT; the second mirrored at
    mirror_p: a mirrored view shows the same site, though another class), whose positives are the views of
    its group (i2i partners, one examination's images). The text terms see only the first view, never
    mirrored, because lines and prompts name sides (TwoViews). AdamW at lr; a fixed number of epochs, no
    epoch chosen on held-out data (it stays untouched for the evaluation)."""

    tuning: str = "tail"
    blocks: int = 2
    lora_rank: int = 8
    epochs: int = 10
    lr: float = 1e-5
    temperature: float = 0.05
    mirror_p: float = 0.5


def multi_positive_nce(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """InfoNCE where a row may have several positives: the mean, over rows with any, of
    -log(sum exp(sim) over the row's positives / sum exp(sim) over the row). sim [A, B] (already divided by
    the temperature; -inf excludes a pair), positive [A, B] bool."""
    rows = positive.any(1)
    if not rows.any():
        return sim.masked_fill(torch.isinf(sim), 0).sum() * 0.0  # keeps the graph whole
    sim, positive = sim[rows].float(), positive[rows]
    return (torch.logsumexp(sim, 1) - torch.logsumexp(sim.masked_fill(~positive, float("-inf")), 1)).mean()


class TwoViews(SquareImages):
    """SquareImages giving two augmented views of each image: key (index, seed) -> (view, view, index, seed).
    The first view is never mirrored: the text term pairs it with lines and prompts that name a side ("left
    ear"). The second is mirrored at flip_p (RetrievalConfig.mirror_p): for image-to-image, a mirrored view
    shows the same site. The first view's augmentation depends on (index, seed) only, never on flip_p."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        index, seed = key
        with seeded_rng(seed):
            first = self.transform(Image.fromarray(self.images[index].permute(1, 2, 0).numpy()))
        return first, super().__getitem__((index, seed + 1))[0], index, seed


def _tower_blocks(model: nn.Module, n: int) -> list[str]:
    """Names of the last n blocks of each tower (open_clip: resblocks; timm: blocks, an nn.Sequential;
    Hugging Face: layer)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))
             and name.rsplit(".", 1)[-1] in ("resblocks", "blocks", "layer")]
    return [f"{name}.{i}" for name, m in lists for i in range(max(len(m) - n, 0), len(m))]


def make_tunable(model: nn.Module, cfg: RetrievalConfig) -> list[str]:
    """Freeze `model` except what cfg.tuning trains; returns the trainable parameter names. "lora" wraps the
    last blocks' linear layers with peft's LoRA (an attention's packed out_proj, read directly by
    nn.MultiheadAttention, is left alone)."""
    blocks = tuple(f"{b}." for b in _tower_blocks(model, cfg.blocks))
    if cfg.tuning == "lora":
        from peft import LoraConfig, inject_adapter_in_model  # only this tuning needs peft

        targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(blocks)
                   and not isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.MultiheadAttention)]
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets),
                                model)
    elif cfg.tuning != "tail":
        raise ValueError(f"retrieval tuning {cfg.tuning!r}: use one of {RETRIEVAL_TUNINGS}.")
    for name, p in model.named_parameters():
        p.requires_grad = ("lora_" in name) if cfg.tuning == "lora" else (name.startswith(blocks)
                                                                          or bool(_TOWER_TAIL.match(name)))
    return [name for name, p in model.named_parameters() if p.requires_grad]


def retrieval_terms(model: nn.Module, tokenizer: Callable, views: tuple[torch.Tensor, torch.Tensor],
                    groups: torch.Tensor, chosen: Sequence[str | None], carried: Sequence[Sequence[str]],
                    temperature: float) -> dict[str, torch.Tensor]:
    """One batch's two loss terms (RetrievalConfig) through model.encode_image / encode_text; their sum is the
    loss. "image": image -> image over the two views of B images, positives = the other views of the same group.
    "text": text <-> image between the FIRST views (TwoViews never mirrors them: a mirrored right ear must
    not learn "left ear") and the distinct finding lines chosen for the batch (`chosen`: one per image, or
    None), an image positive for every line it carries (`carried`); 0 when no line is chosen."""
    first, second = views
    device = groups.device
    images = F.normalize(model.encode_image(torch.cat([first, second])).float(), dim=-1)  # (2B, D)
    g = groups.repeat(2)
    eye = torch.eye(len(g), dtype=torch.bool, device=device)
    sim = (images @ images.T / temperature).masked_fill(eye, float("-inf"))
    terms = {"image": multi_positive_nce(sim, (g[:, None] == g[None, :]) & ~eye), "text": images.new_zeros(())}
    spelling = {finding_key(t): t for t in chosen if t}  # one query per key (its last spelling), in first-seen order
    if spelling:
        keys = list(spelling)
        text = F.normalize(model.encode_text(tokenizer([spelling[k] for k in keys]).to(device)).float(), dim=-1)
        carried_keys = [{finding_key(t) for t in mine} for mine in carried]
        carries = torch.tensor([[k in mine for mine in carried_keys] for k in keys], device=device)
        sim_t = text @ images[:len(first)].T / temperature  # (K, B): the unmirrored first views only
        terms["text"] = multi_positive_nce(sim_t, carries) + multi_positive_nce(sim_t.T, carries.T)
    return terms


class RetrievalTraining(Recipe):
    """train_retrieval's recipe: a copy of the CLIP model, made tunable by cfg.tuning, trained on two views
    of each image (retrieval.retrieval_training_set) with retrieval_loss; its checkpoints hold only the
    trained tensors. No evaluation: the held-out pairs stay untouched."""

    kind, data_parallel = "retrieval", False  # not forward: the loss spreads encode_image / encode_text itself

    def __init__(self, clip: Clip, train: pd.DataFrame, cfg: RetrievalConfig, rt: Runtime):
        if cfg.epochs < 1 or len(train) < 2:
            raise ValueError(f"retrieval fine-tuning needs epochs >= 1 and two or more images; got {cfg.epochs} "
                             f"and {len(train)}.")
        size = clip.model.visual.image_size  # open_clip keeps an int or a (height, width) pair
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.identity = {"model": model_fingerprint(clip.model), "config": {**asdict(cfg), "amp": str(rt.amp)},
                         "train": [[s, int(g), t] for s, g, t in zip(train["sha1"], train["group"], train["texts"])],
                         "augment": {k: str(v) for k, v in TRAIN_AUGMENT.items()}}
        self.clip, self.train, self.cfg, self.rt = clip, train, cfg, rt
        self.model = copy.deepcopy(clip.model).to(rt.device)  # the original is left as it is
        self.saved_keys = frozenset(make_tunable(self.model, cfg))
        self.groups, self.texts = torch.tensor(train["group"].to_numpy()), [list(t) for t in train["texts"]]

    def loader(self) -> DataLoader:
        steps = _steps(self.clip.preprocess)
        normalize = next(t for t in steps if isinstance(t, T.Normalize))  # the model's own mean, std ...
        resize = next(t for t in steps if isinstance(t, T.Resize))  # ... and interpolation
        transform = train_transform(self.size, normalize.mean, normalize.std, resize.interpolation.value)
        square = "pad" if any(isinstance(t, PadToSquare) for t in steps) else "crop"  # as the model reads frames
        views = TwoViews(self.train["path"].tolist(), None, transform, train_square_side(self.size), self.cfg.mirror_p,
                         square)
        sampler = EpochSampler(len(views), self.cfg.seed, groups=self.train["group"].tolist())
        return make_loader(views, self.cfg.batch_size, self.rt.num_workers, self.rt.device, sampler=sampler,
                           drop_last=len(views) > self.cfg.batch_size)

    def param_groups(self) -> list[dict]:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": trainable, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay, "name": "tuned"}]

    @cached_property
    def encoders(self) -> SimpleNamespace:
        """The model's encode_image and encode_text, each spread over rt.gpus (runtime.data_parallel)."""
        return SimpleNamespace(encode_image=data_parallel(self.model, self.rt, "encode_image"),
                               encode_text=data_parallel(self.model, self.rt, "encode_text"))

    def terms(self, batch) -> dict[str, torch.Tensor]:
        """retrieval_terms of one batch from loader(): each image's line for this sample seed."""
        first, second, index, seed = batch
        device, texts = self.rt.device, self.texts
        chosen = [texts[i][s % len(texts[i])] if texts[i] else None for i, s in zip(index.tolist(), seed.tolist())]
        return retrieval_terms(self.encoders, self.clip.tokenizer, (first.to(device), second.to(device)),
                               self.groups[index].to(device), chosen, [texts[i] for i in index.tolist()],
                               self.cfg.temperature)

    def loss(self, net: nn.Module, batch) -> torch.Tensor:
        terms = self.terms(batch)
        return terms["image"] + terms["text"]


def _steps(transform: Callable) -> list[Callable]:
    """The steps of a preprocessing pipeline, nested Compose flattened (utils.square_clip nests one)."""
    inner = getattr(transform, "transforms", None)
    return [step for t in inner for step in _steps(t)] if inner is not None else [transform]


def train_retrieval(clip: Clip, train: pd.DataFrame, cfg: RetrievalConfig, rt: Runtime) -> Trained | None:
    """Fine-tune a copy of clip's model for retrieval with cfg on `train` (retrieval.retrieval_training_set):
    the tuned model, or None for cfg.tuning "off" (frozen, as the paper). Runs in
    rt.checkpoint_dir/retrieval_<id>/ (fit: <id> hashes the model's weights, the images' content, groups
    and texts, cfg, precision and the augmentation); best.pt holds the trained tensors of the last epoch."""
    if cfg.tuning == "off":
        return None
    return fit(RetrievalTraining(clip, train, cfg, rt), rt)
