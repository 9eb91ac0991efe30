"""training.py: the harness (epoch sampling, schedule, the one training augmentation, fit's run folders,
reuse, resume, gradient accumulation and clipping), DINOv2 fine-tuning (losses, class weights, parameter
groups, validation score, train_dino) and the contrastive fine-tuning of BiomedCLIP (multi-positive
InfoNCE, retrieval_terms and the side rule, TwoViews, make_tunable, train_retrieval). CPU only, no downloads: a toy
linear recipe, the tiny random ViT (build_dino("tiny")), the tiny CLIP, a BiomedCLIP-shaped model built offline,
56x42 and 72x72 PNGs."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pandas as pd
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from conftest import noise_png as _png
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn
from transformers import BertConfig

import runtime
import training
import utils
from runtime import Runtime
from training import (
    DinoConfig,
    EpochSampler,
    RetrievalConfig,
    TwoViews,
    epoch_seed,
    make_tunable,
    multi_positive_nce,
    multitask_loss,
    train_dino,
    train_retrieval,
)
from utils import (
    COARSE_CLASSES,
    DINO_MODEL_SETS,
    DINO_TASKS,
    FINE_TASKS,
    LABEL_TO_ID,
    DinoClassifier,
    build_dino,
    decode_square,
    file_sha1,
    finding_key,
    model_fingerprint,
)

CPU = torch.device("cpu")
NEG_INF = float("-inf")
SIZE = 42  # the tiny DINOv2's input: 3x3 patches of 14 px
EAR_L, EAR_R, NOSE_L, NOSE_R = (LABEL_TO_ID[n] for n in ("ear-left", "ear-right", "nose-left", "nose-right"))
VC_OPEN, VC_CLOSED, THROAT = (LABEL_TO_ID[n] for n in ("vc-open", "vc-closed", "throat"))
FINISHED_RUN_FILES = {"config.json", "best.pt", "done.json"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny models, one thread


def _same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    a, b = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _runtime(checkpoint_dir: Path | None = None, **kw) -> Runtime:
    return Runtime(CPU, checkpoint_dir=checkpoint_dir, progress=False, **kw)


# =============================================================================================
# 1. The harness
# =============================================================================================

# ---- EpochSampler, epoch_seed, warmup_cosine -------------------------------------------------

def test_epoch_sampler_order_and_seeds_depend_on_seed_and_epoch_only():
    sampler = EpochSampler(21, seed=0)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(21))
    sampler.set_epoch(1)
    assert list(sampler) != first
    torch.manual_seed(99)  # the global RNG plays no part
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_every_item_of_an_epoch_gets_its_own_augmentation_seed():
    pairs = list(EpochSampler(500, seed=0))
    assert sorted(i for i, _ in pairs) == list(range(500))
    assert len({s for _, s in pairs}) == 500  # no two items share their flip and crop


def plain_sequence(n: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order, seeds = torch.randperm(n, generator=generator), torch.randint(0, 2**62, (n,), generator=generator)
    return list(zip(order.tolist(), seeds.tolist()))


def epoch_list(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_sampler_with_groups_keeps_each_group_together_in_a_seeded_order():
    groups = ["b", "a", "b", "c", "a", "b", "d", "c", "e", "a", "b", "f", "f", "c"]
    n = len(groups)
    sampler = EpochSampler(n, seed=3, groups=groups)
    assert len(sampler) == n
    orders = []
    for epoch in range(4):
        seq = epoch_list(sampler, epoch)
        indices = [i for i, _ in seq]
        assert sorted(indices) == list(range(n))  # every index once per epoch
        runs = [groups[i] for k, i in enumerate(indices) if k == 0 or groups[indices[k - 1]] != groups[i]]
        assert len(runs) == len(set(groups))  # a group's members come one after another
        assert seq == epoch_list(EpochSampler(n, seed=3, groups=groups), epoch)  # only (seed, epoch) matter
        orders.append(runs)
    assert len({tuple(r) for r in orders}) > 1  # the group order changes with the epoch
    other = EpochSampler(n, seed=4, groups=groups)
    assert any(epoch_list(other, e) != epoch_list(EpochSampler(n, 3, groups=groups), e) for e in range(4))


def test_epoch_sampler_without_groups_is_the_plain_seeded_permutation():
    for epoch in (0, 1, 5):
        assert epoch_list(EpochSampler(9, seed=2), epoch) == plain_sequence(9, 2, epoch)
        assert epoch_list(EpochSampler(9, seed=2, groups=None), epoch) == plain_sequence(9, 2, epoch)
    # singleton groups: still one permutation of every index, in a (seed, epoch)-fixed order
    seq = epoch_list(EpochSampler(9, seed=2, groups=list(range(9))), 1)
    assert sorted(i for i, _ in seq) == list(range(9))
    assert seq == epoch_list(EpochSampler(9, seed=2, groups=list(range(9))), 1)


def test_warmup_cosine_schedule():
    f = [training.warmup_cosine(s, warmup_steps=2, total_steps=6) for s in range(6)]
    assert f[:3] == [0.5, 1.0, 1.0] and np.isclose(f[4], 0.5) and f[5] < f[4]


def test_warmup_cosine_ends_at_zero_and_stays_there():
    assert training.warmup_cosine(3, warmup_steps=3, total_steps=4) == 1.0
    assert training.warmup_cosine(4, warmup_steps=3, total_steps=4) == pytest.approx(0.0, abs=1e-12)  # one decay step
    assert [training.warmup_cosine(s, 2, 6) for s in (6, 7, 9)] == pytest.approx([0.0] * 3, abs=1e-12)  # past the end


# ---- fit on a toy recipe: run folders, reuse, gradient accumulation, clipping -------------------

class KeyedTensors(torch.utils.data.Dataset):
    """(x, y) rows read by EpochSampler's (index, seed) keys."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[key[0]], self.y[key[0]]


class ToyRecipe(training.Recipe):
    """Linear regression in float64 with a mean squared error (a mean over the batch), no randomness in
    the model or the data: what a batch gives does not depend on how the epoch is cut into batches."""

    kind = "toy"

    def __init__(self, cfg: training.TrainConfig, n: int = 20, lr: float = 0.05):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.randn(5, 1, generator=g, dtype=torch.float64) + 3.0
        self.model = runtime.seeded(0, lambda: nn.Linear(5, 1).double())
        self.cfg, self.lr = cfg, lr
        self.identity = {"config": asdict(cfg), "n": n, "lr": lr}

    def loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(KeyedTensors(self.x, self.y), batch_size=self.cfg.batch_size,
                                           sampler=EpochSampler(len(self.x), self.cfg.seed))

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": self.lr, "weight_decay": self.cfg.weight_decay,
                 "name": "all"}]

    def loss(self, net: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(net(x), y)


TOY = training.TrainConfig(epochs=3, batch_size=4, warmup_epochs=0.5, seed=0)


def test_a_finished_run_keeps_only_its_config_best_weights_and_history(tmp_path):
    trained = training.fit(ToyRecipe(TOY), _runtime(tmp_path))
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("toy_") and {p.name for p in run_dir.iterdir()} == FINISHED_RUN_FILES
    assert trained.path == run_dir / "best.pt" and trained.finished
    assert trained.weights_id == file_sha1(run_dir / "best.pt")
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert set(best) == {"model", "epoch"} and best["epoch"] == 3  # no optimizer, scheduler or scaler state
    _same_weights(trained.model, best["model"])
    done = json.loads((run_dir / "done.json").read_text())
    assert set(done) == {"run_id", "history"} and [row["epoch"] for row in done["history"]] == [1, 2, 3]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"] == asdict(TOY) and config["run_id"] == done["run_id"]
    assert list(trained.history.columns) == ["epoch", "train_loss", "lr_all", "seconds"]  # no evaluation


def test_a_rerun_of_a_finished_run_trains_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    calls, real_epoch = [], training._train_epoch
    monkeypatch.setattr(training, "_train_epoch", lambda *a, **k: calls.append(1) or real_epoch(*a, **k))
    first = training.fit(ToyRecipe(TOY), _runtime(tmp_path))
    assert len(calls) == 3
    capsys.readouterr()
    again = training.fit(ToyRecipe(TOY), _runtime(tmp_path))
    assert len(calls) == 3  # not one more epoch
    assert "reusing finished run" in capsys.readouterr().out
    assert again.path == first.path and again.weights_id == first.weights_id and again.finished
    _same_weights(first.model, again.model)
    pd.testing.assert_frame_equal(again.history, first.history)
    assert {p.name for p in first.path.parent.iterdir()} == FINISHED_RUN_FILES


def test_a_spent_time_budget_stops_resumably_and_a_later_session_ends_where_one_run_ends(tmp_path, monkeypatch):
    """No epoch starts that would end after rt.deadline; the unfinished run keeps last.pt, uses its weights so
    far, and a later session (reuse_from: the earlier output attached) resumes to the weights of one run."""
    whole = training.fit(ToyRecipe(TOY), _runtime(tmp_path / "whole" / "checkpoints"))
    clock = iter([0.0, 0.0, 1e9, 1e9])  # epoch 1 starts, epoch 2 starts, then the budget is spent
    monkeypatch.setattr(training.time, "time", lambda: next(clock, 1e9))
    first = training.fit(ToyRecipe(TOY), _runtime(tmp_path / "s1" / "checkpoints", deadline=1e6))
    monkeypatch.undo()
    assert not first.finished and len(first.history) == 2 and first.path.name == "last.pt"
    assert {p.name for p in first.path.parent.iterdir()} == {"config.json", "last.pt"}
    assert first.weights_id == file_sha1(first.path)
    later = training.fit(ToyRecipe(TOY), _runtime(tmp_path / "s2" / "checkpoints", reuse_from=tmp_path / "s1"))
    assert later.finished and [r["epoch"] for r in later.history.to_dict("records")] == [1, 2, 3]
    _same_weights(later.model, whole.model)
    assert not (tmp_path / "s1" / "checkpoints" / first.path.parent.name / "done.json").exists()  # only read


def test_reuse_from_copies_a_finished_run_in_and_says_when_it_holds_none(tmp_path, monkeypatch, capsys):
    training.fit(ToyRecipe(TOY), _runtime(tmp_path / "earlier" / "checkpoints"))
    calls, real_epoch = [], training._train_epoch
    monkeypatch.setattr(training, "_train_epoch", lambda *a, **k: calls.append(1) or real_epoch(*a, **k))
    capsys.readouterr()
    reused = training.fit(ToyRecipe(TOY), _runtime(tmp_path / "now" / "checkpoints", reuse_from=tmp_path / "earlier"))
    log = capsys.readouterr().out
    assert calls == [] and "copied toy_" in log and "reusing finished run" in log and reused.finished
    other = replace(TOY, seed=1)
    training.fit(ToyRecipe(other), _runtime(tmp_path / "now" / "checkpoints", reuse_from=tmp_path / "earlier"))
    assert "holds no run toy_" in capsys.readouterr().out and len(calls) == 3


def test_keep_runs_prunes_run_folders_this_run_does_not_use_before_training(tmp_path, capsys):
    old = [training.fit(ToyRecipe(replace(TOY, seed=s)), _runtime(tmp_path)).path.parent for s in (1, 2)]
    for age, folder in enumerate(old):
        os.utime(folder, (time.time() - 100 * (2 - age),) * 2)  # seed 1's the oldest
    started = time.time() - 1
    reused = training.fit(ToyRecipe(replace(TOY, seed=2)), _runtime(tmp_path, keep_runs=0, started=started))
    assert reused.path.parent.exists()  # reused by this run: in use, never pruned
    training.fit(ToyRecipe(TOY), _runtime(tmp_path, keep_runs=0, started=started))
    assert "pruned" in capsys.readouterr().out
    assert not old[0].exists() and old[1].exists() and len(list(tmp_path.iterdir())) == 2


def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    """grad_accum=2 at batch 4 = batch 8: the same items in the same order, each step's gradient the mean
    over the same 8 items (the last step's over its 4, in both); 20 items: steps of 8, 8, 4."""
    for epochs in (1, 3):
        small = training.fit(ToyRecipe(replace(TOY, epochs=epochs, batch_size=4, grad_accum=2)),
                             _runtime(tmp_path / f"accum{epochs}"))
        large = training.fit(ToyRecipe(replace(TOY, epochs=epochs, batch_size=8, grad_accum=1)),
                             _runtime(tmp_path / f"large{epochs}"))
        for key, value in large.model.state_dict().items():
            torch.testing.assert_close(small.model.state_dict()[key], value, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(small.history["lr_all"], large.history["lr_all"], rtol=1e-12)
        # not a vacuous equality: batch 4 without accumulation ends elsewhere
        plain = training.fit(ToyRecipe(replace(TOY, epochs=epochs, batch_size=4)),
                             _runtime(tmp_path / f"plain{epochs}"))
        assert not torch.allclose(plain.model.weight, small.model.weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("n", "grad_accum", "steps"), [(20, 1, 5), (20, 2, 3), (20, 3, 2), (16, 2, 2), (4, 4, 1)])
def test_the_optimizer_steps_once_per_grad_accum_batches_and_after_the_last(tmp_path, monkeypatch, n, grad_accum,
                                                                          steps):
    taken, real_step = [], training.optimizer_step
    monkeypatch.setattr(training, "optimizer_step", lambda *a, **k: taken.append(1) or real_step(*a, **k))
    made, real_opt = [], training._Optimization
    monkeypatch.setattr(training, "_Optimization", lambda *a: made.append(real_opt(*a)) or made[-1])
    training.fit(ToyRecipe(replace(TOY, epochs=2, grad_accum=grad_accum), n=n), _runtime(tmp_path))
    assert len(taken) == 2 * steps == 2 * math.ceil(math.ceil(n / 4) / grad_accum)
    assert made[0].scheduler.last_epoch == 2 * steps  # the schedule counts optimizer steps, not batches


@pytest.mark.parametrize("max_grad_norm", [0.01, None])
def test_gradient_clipping_is_applied_at_max_grad_norm_before_each_step_and_only_when_set(tmp_path, monkeypatch,
                                                                                       max_grad_norm):
    clipped, real_clip = [], torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        clipped.append((len(parameters), max_norm, float(total), float(after)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    recipe = ToyRecipe(replace(TOY, epochs=2, max_grad_norm=max_grad_norm))
    training.fit(recipe, _runtime(tmp_path))
    if max_grad_norm is None:
        assert clipped == []
        return
    assert len(clipped) == 2 * 5  # 20 items, batch 4: every optimizer step
    assert all(n == 2 and max_norm == max_grad_norm for n, max_norm, _, _ in clipped)  # weight and bias
    assert all(total > max_grad_norm and after == pytest.approx(max_grad_norm, rel=1e-4) for _, _, total, after in
               clipped)  # the gradient the optimizer steps with is the clipped one


# ---- the one training augmentation (tested with DINOv2's and retrieval's recipes below) ---------

def _expected_train_transform(size: int, mean, std, interpolation: str) -> T.Compose:
    """The documented recipe, written out: +-15 deg bilinear rotation on black, then timm's training
    transform with a 70-100% crop at aspect 3/4-4/3, colour jitter 0.2 and no flip."""
    return T.Compose([T.RandomRotation(15.0, interpolation=T.InterpolationMode.BILINEAR, fill=0),
                      timm.data.create_transform((3, size, size), is_training=True, hflip=0.0, scale=(0.7, 1.0),
                                                 ratio=(3 / 4, 4 / 3), color_jitter=0.2, interpolation=interpolation,
                                                 mean=tuple(mean), std=tuple(std))])


def _normalize(transform) -> T.Normalize:
    (norm,) = [t for t in transform.transforms[-1].transforms if isinstance(t, T.Normalize)]
    return norm


# =============================================================================================
# 2. DINOv2 fine-tuning
# =============================================================================================

def _tiny(tasks=tuple(DINO_TASKS), image_size=SIZE) -> DinoClassifier:
    return DinoClassifier(build_dino("tiny", "", image_size), tasks)


def _batch(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), 3, SIZE, SIZE, generator=g), torch.tensor(labels)


TRAIN_LABELS = [i for i in range(7) for _ in range(3)]  # 21 images
VAL_LABELS = [i for i in range(7) for _ in range(2)]  # 14 images


def _frame(paths, labels) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "label_id": labels, "sha1": [file_sha1(p) for p in paths]})


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("dino_images")
    rng = np.random.default_rng(0)
    train = [_png(root / "train" / f"t{i:02d}.png", rng, y) for i, y in enumerate(TRAIN_LABELS)]
    val = [_png(root / "val" / f"v{i:02d}.png", rng, y) for i, y in enumerate(VAL_LABELS)]
    return _frame(train, TRAIN_LABELS), _frame(val, VAL_LABELS)


# ---- losses, class weights, the images a model trains on -------------------------------------

def test_forward_backward_reaches_every_head_and_the_backbone():
    model = _tiny()
    x, y = _batch(list(range(7)))
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"coarse": (7, 4), "ear": (7, 2), "nose": (7, 2),
                                                           "vc": (7, 2)}
    multitask_loss(out, y, training.class_weights(y.tolist())).backward()
    for name, head in model.heads.items():
        assert head.weight.grad.abs().sum() > 0, name
    bb = model.backbone
    for name, param in [("patch_embed", bb.patch_embed.proj.weight), ("cls_token", bb.cls_token),
                        ("pos_embed", bb.pos_embed), ("block 0", bb.blocks[0].attn.qkv.weight),
                        ("final norm", bb.norm.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_task_subsets_build_only_their_heads_and_train_only_on_their_region():
    coarse_only, ear_only = _tiny(("coarse",)), _tiny(("ear",))
    x, y = _batch([EAR_L, EAR_R, NOSE_L, VC_OPEN, THROAT])
    out = coarse_only(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"coarse": (5, 4)}
    expected = F.cross_entropy(out["coarse"], torch.tensor([0, 0, 1, 2, 3]))
    torch.testing.assert_close(multitask_loss(out, y), expected)
    out = ear_only(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"ear": (5, 2)}
    loss = multitask_loss(out, y)
    torch.testing.assert_close(loss, F.cross_entropy(out["ear"][:2], torch.tensor([0, 1])))  # ear images only
    loss.backward()
    assert ear_only.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # a batch without any ear image: zero loss, but a whole graph (backward works, gradients are zero)
    x, y = _batch([NOSE_L, THROAT])
    ear_only.zero_grad()
    loss = multitask_loss(ear_only(x), y)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(ear_only.heads["ear"].weight.grad) == 0


def test_ear_sample_contributes_nothing_to_nose_and_vc_losses():
    model = _tiny()
    x, y = _batch([EAR_L, EAR_R, EAR_L])
    out = model(x)
    loss = multitask_loss(out, y)
    loss.backward()
    for task in ("nose", "vc"):  # the term is in the graph (gradients exist) and exactly zero
        assert model.heads[task].weight.grad is not None
        assert torch.count_nonzero(model.heads[task].weight.grad) == 0
        assert torch.count_nonzero(model.heads[task].bias.grad) == 0
    assert model.heads["ear"].weight.grad.abs().sum() > 0
    expected = F.cross_entropy(out["coarse"], torch.zeros(3, dtype=torch.long)) + \
        F.cross_entropy(out["ear"], torch.tensor([0, 1, 0]))  # coarse CE + ear CE, nothing else
    torch.testing.assert_close(loss, expected)
    # in a mixed batch, each binary term is its region's mean only
    x, y = _batch([EAR_L, NOSE_R, NOSE_L, VC_CLOSED, THROAT])
    out = model(x)
    expected = (F.cross_entropy(out["coarse"], torch.tensor([0, 1, 1, 2, 3]))
                + F.cross_entropy(out["ear"][[0]], torch.tensor([0]))
                + F.cross_entropy(out["nose"][[1, 2]], torch.tensor([1, 0]))
                + F.cross_entropy(out["vc"][[3]], torch.tensor([1])))
    torch.testing.assert_close(multitask_loss(out, y), expected)


def test_class_weights_weigh_each_heads_loss_and_targets_outside_a_region_are_minus_one():
    torch.manual_seed(0)
    out = {"coarse": torch.randn(4, 4), "nose": torch.randn(4, 2)}
    y = torch.tensor([NOSE_L, NOSE_R, NOSE_R, THROAT])
    weights = {"coarse": torch.tensor([1.0, 0.5, 3.0, 2.0]), "nose": torch.tensor([4.0, 1.0])}
    expected = (F.cross_entropy(out["coarse"], torch.tensor([1, 1, 1, 3]), weight=weights["coarse"])
                + F.cross_entropy(out["nose"][:3], torch.tensor([0, 1, 1]), weight=weights["nose"]))
    torch.testing.assert_close(multitask_loss(out, y, weights), expected)
    assert not torch.allclose(multitask_loss(out, y), expected)
    coarse, fine = training.region_targets(torch.tensor([EAR_L, EAR_R, NOSE_R, VC_CLOSED, THROAT]))
    assert coarse.tolist() == [0, 0, 1, 2, 3]
    assert {t: (m.tolist(), target.tolist()) for t, (m, target) in fine.items()} == {
        "ear": ([True, True, False, False, False], [0, 1, -1, -1, -1]),
        "nose": ([False, False, True, False, False], [-1, -1, 1, -1, -1]),
        "vc": ([False, False, False, True, False], [-1, -1, -1, 1, -1])}
    assert training.task_images(("ear",), []).shape == (0,)


def test_targets_stay_on_the_device_of_their_labels():
    """On a GPU the labels live on cuda: the targets must be built there. PyTorch's meta device (shapes
    without data) stands in for a second device on a CPU."""
    meta = torch.device("meta")
    coarse, fine = training.region_targets(torch.tensor([EAR_L, NOSE_R, THROAT], device=meta))
    assert coarse.device == meta and all(m.device == t.device == meta for m, t in fine.values())


def test_class_weights_are_balanced_per_head():
    labels = [NOSE_L] * 3 + [NOSE_R] + [THROAT] * 4 + [EAR_L] * 2
    w = training.class_weights(labels)
    # coarse over 3 present regions of 10 images: ear 2 -> 10/(3*2), nose 4 -> 10/12, throat 4; vc absent -> 1
    torch.testing.assert_close(w["coarse"], torch.tensor([10 / 6, 10 / 12, 1.0, 10 / 12]))
    torch.testing.assert_close(w["nose"], torch.tensor([2 / 3, 2.0]))  # left 3, right 1 of 4 nose images
    torch.testing.assert_close(w["ear"], torch.tensor([1.0, 1.0]))  # only ear-left present: 2/(1*2) and absent 1
    torch.testing.assert_close(w["vc"], torch.ones(2))  # no vc image at all
    assert set(training.class_weights(labels, ("nose",))) == {"nose"}


def test_class_weights_of_no_labels_are_ones():
    weights = training.class_weights([])
    assert {t: w.tolist() for t, w in weights.items()} == {t: [1.0] * n for t, n in DINO_TASKS.items()}


def test_task_images_all_for_the_coarse_head_and_the_region_for_a_binary_one():
    labels = [EAR_L, NOSE_R, VC_OPEN, THROAT, EAR_R, VC_CLOSED, NOSE_L]
    assert training.task_images(("coarse",), labels).all()
    assert training.task_images(tuple(DINO_TASKS), labels).all()
    assert training.task_images(("ear",), labels).tolist() == [True, False, False, False, True, False, False]
    assert training.task_images(("nose",), labels).tolist() == [False, True, False, False, False, False, True]
    assert training.task_images(("vc",), labels).tolist() == [False, False, True, False, False, True, False]


# ---- DINOv2's training augmentation ------------------------------------------------------------

CFG = DinoConfig(epochs=3, batch_size=8, lr_head=1e-2, lr_backbone=1e-3, warmup_epochs=1, patience=None, seed=0)


def _dino_training_transform(model: DinoClassifier, split) -> T.Compose:
    """The transform DINOv2 fine-tuning applies to its training images (DinoTraining's loader)."""
    return training.DinoTraining(model, *split, CFG, _runtime(), "dino").loader().dataset.transform


def test_dino_training_augmentation_is_timms_training_transform_after_the_rotation(split):
    """TRAIN_AUGMENT: +-15 deg bilinear rotation on black, then timm's create_transform(is_training=True) with
    a 70-100% crop at aspect 3/4-4/3, colour jitter 0.2, no flip, and the model's mean, std and interpolation."""
    model = _tiny()
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    model.backbone.pretrained_cfg = {**model.backbone.pretrained_cfg, "mean": mean, "std": std,
                                     "interpolation": "bilinear"}
    tf = _dino_training_transform(model, split)
    assert repr(tf) == repr(_expected_train_transform(SIZE, mean, std, "bilinear"))
    assert np.allclose(_normalize(tf).mean, mean) and np.allclose(_normalize(tf).std, std)
    default = _tiny()
    data = utils.dino_data_config(default, SIZE)
    assert repr(_dino_training_transform(default, split)) == repr(_expected_train_transform(
        SIZE, data["mean"], data["std"], data["interpolation"]))
    assert training.train_square_side(SIZE) == math.ceil(SIZE * 1.15)  # room for the crop


def test_dino_training_transform_takes_mean_and_std_from_the_model_and_never_flips(split):
    model = _tiny()
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    model.backbone.pretrained_cfg = {**model.backbone.pretrained_cfg, "mean": mean, "std": std}
    tf = _dino_training_transform(model, split)
    assert "Flip" not in repr(tf)  # flips come with the label swap, in SquareImages
    norms = [t for t in tf.transforms[-1].transforms if type(t).__name__ == "Normalize"]
    assert len(norms) == 1 and np.allclose(norms[0].mean, mean) and np.allclose(norms[0].std, std)
    x = tf(Image.new("RGB", (SIZE, SIZE), (255, 0, 0)))
    assert tuple(x.shape) == (3, SIZE, SIZE)
    assert "RandomRotation" in repr(tf)


def test_training_augmentation_is_the_documented_one(split):
    """TRAIN_AUGMENT: +-15 deg bilinear rotation on black, a crop keeping 70-100% of the square at aspect
    3/4-4/3, colour jitter 0.2, no flip (SquareImages flips with the label swap); evaluation: none of it."""
    model = _tiny()
    rotate, timm_tf = _dino_training_transform(model, split).transforms
    assert type(rotate).__name__ == "RandomRotation" and list(rotate.degrees) == [-15.0, 15.0]
    assert rotate.interpolation == T.InterpolationMode.BILINEAR and rotate.fill == 0
    by_type = {type(t).__name__: t for t in timm_tf.transforms}
    crop = next(t for name, t in by_type.items() if "ResizedCrop" in name)
    assert tuple(crop.scale) == (0.7, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
    jitter = by_type["ColorJitter"]
    assert [tuple(getattr(jitter, k)) for k in ("brightness", "contrast", "saturation")] == [(0.8, 1.2)] * 3
    assert not any("Flip" in name for name in by_type)
    eval_names = [type(t).__name__ for t in utils.dino_transform(model, SIZE).transforms]
    assert not any("Random" in name or "Jitter" in name for name in eval_names)


# ---- the recipe's configuration and parameter groups --------------------------------------------

def test_dino_and_retrieval_configs_share_the_train_config_and_leave_precision_to_the_runtime():
    shared = {f: getattr(training.TrainConfig(), f) for f in asdict(training.TrainConfig())}
    assert set(shared) == {"epochs", "batch_size", "weight_decay", "warmup_epochs", "grad_accum", "max_grad_norm",
                           "patience", "seed"}
    assert shared["max_grad_norm"] is None and shared["patience"] is None and shared["grad_accum"] == 1
    dino, retrieval = DinoConfig(), RetrievalConfig()
    assert isinstance(dino, training.TrainConfig) and isinstance(retrieval, training.TrainConfig)
    assert dino.max_grad_norm == 1.0 and dino.patience == 5  # the DINOv2 recipe clips at 1 and stops after 5
    assert retrieval.max_grad_norm is None and retrieval.patience is None  # no held-out epoch choice
    assert "amp" not in asdict(dino) and "amp" not in asdict(retrieval)  # precision: Runtime.amp
    with pytest.raises(TypeError):
        DinoConfig(amp="fp32")



def test_layer_decay_lowers_the_backbone_lr_by_depth_and_skips_decay_on_norms_and_tokens():
    model = _tiny()
    cfg = DinoConfig(lr_head=1e-3, lr_backbone=1e-4, weight_decay=0.05, layer_decay=0.5)
    groups = training.param_groups(model, cfg)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    bb = model.backbone
    assert lr_of[id(model.heads["ear"].weight)] == (1e-3, 0.05) and lr_of[id(model.heads["ear"].bias)] == (1e-3, 0.0)
    depth = len(bb.blocks)  # timm's layer map: stem, block 0, ..., last block + final norm (full lr_backbone)
    assert lr_of[id(bb.norm.weight)] == (1e-4, 0.0)
    assert lr_of[id(bb.blocks[-1].attn.qkv.weight)] == (1e-4, 0.05)
    assert lr_of[id(bb.blocks[-2].attn.qkv.weight)] == (1e-4 * 0.5, 0.05)
    assert lr_of[id(bb.patch_embed.proj.weight)] == pytest.approx((1e-4 * 0.5 ** depth, 0.05))
    assert lr_of[id(bb.cls_token)][1] == 0.0 and lr_of[id(bb.pos_embed)][1] == 0.0
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter in exactly one group
    plain = {id(p): g["lr"] for g in training.param_groups(model, DinoConfig(lr_backbone=1e-4)) for p in g["params"]}
    assert plain[id(bb.patch_embed.proj.weight)] == 1e-4


def test_param_groups_without_layer_decay_name_their_part_and_skip_decay_on_norms_and_tokens():
    model = _tiny()
    groups = training.param_groups(model, DinoConfig(lr_head=1e-3, lr_backbone=1e-4, weight_decay=0.07))
    assert {g["name"] for g in groups} == {"backbone", "heads"}
    of = {id(p): (g["name"], g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    bb = model.backbone
    assert of[id(bb.blocks[0].attn.qkv.weight)] == ("backbone", 1e-4, 0.07)
    assert of[id(bb.cls_token)] == of[id(bb.pos_embed)] == of[id(bb.norm.weight)] == ("backbone", 1e-4, 0.0)
    assert of[id(model.heads["coarse"].weight)] == ("heads", 1e-3, 0.07)
    layered = training.param_groups(model, DinoConfig(weight_decay=0.07, layer_decay=0.5))
    assert {g["weight_decay"] for g in layered if g["name"] == "backbone"} == {0.0, 0.07}


def test_param_groups_accept_a_backbone_without_a_no_weight_decay_list():
    backbone = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    backbone.num_features = 6
    groups = training.param_groups(DinoClassifier(backbone, ("coarse",)), DinoConfig(weight_decay=0.05))
    assert sum(len(g["params"]) for g in groups) == 4 + 2  # two Linear and one LayerNorm in the backbone, one head


# ---- the validation score ---------------------------------------------------------------------

def _region_then_fine_by_hand(coarse: np.ndarray, probs: dict) -> list[int]:
    out = []
    for i, region in enumerate(coarse.argmax(1)):
        name = COARSE_CLASSES[region]
        out.append(THROAT if name == "throat" else LABEL_TO_ID[FINE_TASKS[name][int(probs[name][i] > 0.5)]])
    return out


def test_val_score_of_four_heads_is_the_reported_seven_label_rule():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 40)
    probs = {"coarse": rng.dirichlet(np.ones(4), 40), **{t: rng.random(40) for t in FINE_TASKS}}
    probs["ear"][:3] = 0.5  # exactly 0.5 picks the first label (ear-left)
    expected = f1_score(y, _region_then_fine_by_hand(probs["coarse"], probs), average="macro")
    assert training.dino_val_score(probs, y) == pytest.approx(expected)
    # a perfect model scores 1
    perfect = {"coarse": np.eye(4)[np.asarray(utils.LABEL_ID_TO_COARSE_ID)[y]],
               **{t: (y == LABEL_TO_ID[FINE_TASKS[t][1]]).astype(float) for t in FINE_TASKS}}
    assert training.dino_val_score(perfect, y) == 1.0


def test_val_score_of_a_coarse_only_model_is_region_macro_f1():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 30)
    coarse = rng.dirichlet(np.ones(4), 30)
    expected = f1_score(np.asarray(utils.LABEL_ID_TO_COARSE_ID)[y], coarse.argmax(1), average="macro")
    assert training.dino_val_score({"coarse": coarse}, y) == pytest.approx(expected)


@pytest.mark.parametrize("task", list(FINE_TASKS))
def test_val_score_of_a_binary_model_is_its_macro_f1_on_its_regions_images(task):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 7, 50)
    p = rng.random(50)
    mine = np.isin(y, [LABEL_TO_ID[n] for n in FINE_TASKS[task]])
    p[np.flatnonzero(mine)[:3]] = 0.5  # exactly 0.5 picks the first label
    truth = (y[mine] == LABEL_TO_ID[FINE_TASKS[task][1]]).astype(int)
    expected = f1_score(truth, (p[mine] > 0.5).astype(int), average="macro")
    assert training.dino_val_score({task: p}, y) == pytest.approx(expected)
    p_outside = p.copy()
    p_outside[~mine] = 1 - p_outside[~mine]  # other regions' images do not count
    assert training.dino_val_score({task: p_outside}, y) == pytest.approx(expected)


# ---- train_dino -------------------------------------------------------------------------------

def _train(split, checkpoint_dir, tasks=tuple(DINO_TASKS), name="dino", num_workers=0, progress=False,
           drop_path=0.0, amp=None, **cfg):
    train, val = split
    cfg = DinoConfig(**{**CFG.__dict__, **cfg})
    model = _tiny(tasks) if not drop_path else DinoClassifier(_stochastic_depth_backbone(drop_path), tasks)
    rt = Runtime(CPU, amp, num_workers=num_workers, checkpoint_dir=checkpoint_dir, progress=progress)
    return train_dino(model, train, val, cfg, rt, name=name)


def _stochastic_depth_backbone(drop_path: float) -> torch.nn.Module:
    """The tiny ViT with stochastic depth: training then draws from the global RNG."""
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=SIZE, num_classes=0,
                             drop_path_rate=drop_path, **utils.DINO_TINY_KWARGS)


def _crash_after_first_epoch(monkeypatch) -> None:
    """training.atomic_save that raises (as a crash would) once last.pt of epoch 1 is written."""
    real_save = runtime.atomic_save

    def crash(obj, path):
        real_save(obj, path)
        if path.name == "last.pt":
            raise KeyboardInterrupt("simulated crash after epoch 1")

    monkeypatch.setattr(training, "atomic_save", crash)


@pytest.fixture(scope="module")
def full_run(split, tmp_path_factory):
    """An uninterrupted 3-epoch run: the reference for resumed and redone runs."""
    return _train(split, tmp_path_factory.mktemp("full"))


def _history(h: pd.DataFrame) -> pd.DataFrame:
    return h.drop(columns="seconds")


def test_a_run_writes_its_checkpoints_and_leaves_the_best_weights_in_the_model(full_run):
    trained = full_run
    run_dir = trained.path.parent
    assert run_dir.name.startswith("dino_") and {p.name for p in run_dir.iterdir()} == FINISHED_RUN_FILES
    assert trained.path.name == "best.pt" and trained.finished
    assert trained.weights_id == utils.file_sha1(trained.path)
    assert list(trained.history.columns) == ["epoch", "train_loss", "val_loss", "val_score", "lr_backbone", "lr_heads",
                                             "seconds"]
    assert list(trained.history["epoch"]) == [1, 2, 3]
    assert np.isfinite(trained.history[["train_loss", "val_loss", "val_score"]].to_numpy()).all()
    best = torch.load(trained.path, weights_only=True)
    assert set(best) == {"model", "epoch", "val_score"}  # no optimizer state on disk
    assert best["epoch"] == trained.history["epoch"][trained.history["val_score"].idxmax()]
    _same_weights(trained.model, best["model"])
    assert not torch.equal(best["model"]["heads.coarse.weight"], _tiny().state_dict()["heads.coarse.weight"])
    assert trained.history["lr_heads"].iloc[-1] < trained.history["lr_heads"].max()  # cosine decays
    np.testing.assert_allclose(trained.history["lr_backbone"],  # one schedule, each group at its own lr
                               trained.history["lr_heads"] * CFG.lr_backbone / CFG.lr_head, rtol=1e-12)
    done = json.loads((run_dir / "done.json").read_text())
    pd.testing.assert_frame_equal(pd.DataFrame(done["history"]), trained.history)


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(split, full_run, tmp_path, monkeypatch, capsys,
                                                               drop_path):
    """Data order and augmentation come from (seed, epoch); stochastic depth from the global RNG, which each
    epoch seeds from (seed, epoch) too."""
    if drop_path:
        full_run = _train(split, tmp_path / "full", drop_path=drop_path)
    tmp_path = tmp_path / "interrupted"
    _crash_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _train(split, tmp_path, drop_path=drop_path)
    monkeypatch.setattr(training, "atomic_save", runtime.atomic_save)
    (run_dir,) = tmp_path.iterdir()
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    capsys.readouterr()
    resumed = _train(split, tmp_path, drop_path=drop_path)
    assert "resuming" in capsys.readouterr().out
    assert resumed.path.parent == run_dir and run_dir.name == full_run.path.parent.name
    _same_weights(full_run.model, resumed.model)  # the same computation on the same batches: exact
    _same_weights(torch.load(full_run.path, weights_only=True)["model"],
                  torch.load(resumed.path, weights_only=True)["model"])
    assert {p.name for p in run_dir.iterdir()} == FINISHED_RUN_FILES  # last.pt gone once finished
    pd.testing.assert_frame_equal(_history(full_run.history), _history(resumed.history))


def test_finished_run_is_reused_and_a_changed_config_trains_afresh(split, tmp_path, monkeypatch, capsys):
    first = _train(split, tmp_path, epochs=2)
    real_epoch = training._train_epoch

    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(training, "_train_epoch", no_training)
    capsys.readouterr()
    reused = _train(split, tmp_path, epochs=2)
    assert "reusing finished run" in capsys.readouterr().out
    assert reused.path == first.path and reused.weights_id == first.weights_id
    pd.testing.assert_frame_equal(reused.history, first.history)
    _same_weights(first.model, reused.model)
    with pytest.raises(AssertionError, match="a training step ran"):
        _train(split, tmp_path, epochs=2, lr_head=5e-3)
    monkeypatch.setattr(training, "_train_epoch", real_epoch)
    assert len(list(tmp_path.iterdir())) == 2  # the new config has its own folder


def test_changed_image_content_or_label_under_the_same_path_gives_a_new_run(split, tmp_path):
    train, val = split
    _train(split, tmp_path / "runs", epochs=1)

    def runs() -> set[str]:
        return {p.name for p in (tmp_path / "runs").iterdir()}

    (base,) = runs()
    # a table whose sha1 changed for one row (the file was replaced by another image)
    changed = train.copy()
    changed.loc[4, "sha1"] = "0" * 40
    _train((changed, val), tmp_path / "runs", epochs=1)
    relabelled = train.copy()
    relabelled.loc[4, "label_id"] = utils.flip_label_id(int(relabelled.loc[4, "label_id"]))
    _train((relabelled, val), tmp_path / "runs", epochs=1)
    assert len(runs()) == 3
    # end to end: rewrite one PNG of a copy of the data, hash it again
    copy_dir = tmp_path / "copy"
    shutil.copytree(Path(train["path"][0]).parent, copy_dir / "train")
    moved = train.assign(path=[str(copy_dir / "train" / Path(p).name) for p in train["path"]])
    same = moved.assign(sha1=[utils.file_sha1(p) for p in moved["path"]])
    _train((same, val), tmp_path / "runs", epochs=1)
    assert len(runs()) == 3  # the same contents elsewhere: the same run, reused
    _png(Path(moved["path"][4]), np.random.default_rng(7), int(moved["label_id"][4]))
    rehashed = moved.assign(sha1=[utils.file_sha1(p) for p in moved["path"]])
    assert (rehashed["sha1"] != same["sha1"]).tolist() == [i == 4 for i in range(len(train))]
    _train((rehashed, val), tmp_path / "runs", epochs=1)
    assert len(runs()) == 4 and base in runs()


def test_zero_epochs_is_a_value_error(split, tmp_path):
    with pytest.raises(ValueError, match="epochs=0"):
        _train(split, tmp_path, epochs=0)
    assert not any(tmp_path.iterdir())


def test_early_stopping_ends_a_run_and_the_progress_bar_at_100_percent(split, tmp_path, capsys):
    trained = _train(split, tmp_path, epochs=5, patience=1, lr_head=0.0, lr_backbone=0.0, progress=True)
    assert list(trained.history["epoch"]) == [1, 2]  # epoch 2 did not beat epoch 1
    assert torch.load(trained.path, weights_only=True)["epoch"] == 1
    assert trained.finished and {p.name for p in trained.path.parent.iterdir()} == FINISHED_RUN_FILES
    assert len(json.loads((trained.path.parent / "done.json").read_text())["history"]) == 2  # finished after 2
    final = capsys.readouterr().err.replace("\n", "\r").strip("\r").split("\r")[-1]
    assert "100%" in final and "2/2" in final, final


def test_progress_bar_is_complete_after_an_early_stop(split, tmp_path, monkeypatch):
    bars = []

    class RecordingBar(runtime.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(runtime, "tqdm", RecordingBar)
    _train(split, tmp_path, epochs=4, patience=1, lr_head=0.0, lr_backbone=0.0, progress=True)
    assert bars and set(bars) == {(2, 2)}  # (tqdm may close a bar twice)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(split, tmp_path, monkeypatch, amp):
    model = _tiny()
    dtype = runtime.resolve_amp(amp, CPU)
    with runtime.autocast(CPU, dtype):
        assert model(_batch([0, 1])[0])["coarse"].dtype == dtype
    before = model.heads["coarse"].weight.detach().clone()
    train, val = split
    cfg = DinoConfig(**{**CFG.__dict__, "grad_accum": 2})
    made, real_opt = [], training._Optimization
    monkeypatch.setattr(training, "_Optimization", lambda *a: made.append(real_opt(*a)) or made[-1])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trained = train_dino(model, train, val, cfg, Runtime(CPU, dtype, checkpoint_dir=tmp_path, progress=False))
    assert not [str(w.message) for w in record if "lr_scheduler" in str(w.message)]  # no step before optimizer.step
    assert np.isfinite(trained.history[["train_loss", "val_loss"]].to_numpy()).all()
    assert not torch.equal(before, trained.model.heads["coarse"].weight.detach())  # the weights moved
    (opt,) = made
    state = opt.state_dict()
    assert bool(state["scaler"]) == (dtype == torch.float16)  # fp16 runs with a GradScaler
    # the schedule advanced once per optimizer step taken: 21 images, batch 8 -> 3 batches, 2 steps an epoch
    skipped = round(np.log2(65536.0 / state["scaler"]["scale"])) if dtype == torch.float16 else 0
    assert state["scheduler"]["last_epoch"] == 3 * 2 - skipped
    assert str(dtype) in (trained.path.parent / "config.json").read_text()


def test_worker_count_does_not_change_the_result(split, tmp_path):
    in_process = _train(split, tmp_path / "w0", epochs=1)
    two_workers = _train(split, tmp_path / "w2", epochs=1, num_workers=2)
    _same_weights(in_process.model, two_workers.model)


@pytest.mark.parametrize("damaged", ["best.pt", "done.json"])
def test_a_truncated_file_of_a_finished_run_is_reported_and_the_run_redone(split, tmp_path, damaged):
    run = _train(split, tmp_path, epochs=1)  # a finished 1-epoch run...
    path = run.path.parent / damaged
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # ...one of whose files a crash (or a full disk) cut short
    with pytest.warns(UserWarning, match="cannot be loaded"):
        redone = _train(split, tmp_path, epochs=1)
    assert len(redone.history) == 1 and redone.path == run.path  # trained again, not reused
    _same_weights(run.model, redone.model)
    assert torch.load(run.path, weights_only=True)["epoch"] == 1  # a whole file again
    assert json.loads((run.path.parent / "done.json").read_text())["history"][0]["epoch"] == 1
    assert {p.name for p in run.path.parent.iterdir()} == FINISHED_RUN_FILES


@pytest.mark.parametrize("damaged", ["last.pt", "best.pt"])
def test_a_truncated_checkpoint_of_an_unfinished_run_is_reported_and_the_run_redone(split, tmp_path, monkeypatch,
                                                                                   capsys, damaged):
    reference = _train(split, tmp_path / "reference", epochs=2)
    _crash_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _train(split, tmp_path / "runs", epochs=2)
    monkeypatch.setattr(training, "atomic_save", runtime.atomic_save)
    (run_dir,) = (tmp_path / "runs").iterdir()
    path = run_dir / damaged
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    epochs, real_epoch = [], training._train_epoch
    monkeypatch.setattr(training, "_train_epoch", lambda *a, **k: epochs.append(1) or real_epoch(*a, **k))
    capsys.readouterr()
    with pytest.warns(UserWarning, match="cannot be loaded"):
        redone = _train(split, tmp_path / "runs", epochs=2)
    assert "resuming" not in capsys.readouterr().out and len(epochs) == 2  # from the start, not resumed
    assert redone.path.parent == run_dir and list(redone.history["epoch"]) == [1, 2]
    _same_weights(reference.model, redone.model)
    assert {p.name for p in run_dir.iterdir()} == FINISHED_RUN_FILES


def test_separate_models_train_on_their_own_images_in_their_own_folders(split, tmp_path):
    train, val = split
    folders = {}
    for name, tasks in DINO_MODEL_SETS["separate"].items():
        trained = _train(split, tmp_path, tasks=tasks, name=name, epochs=1)
        assert trained.model.tasks == tasks and set(trained.model.heads) == set(tasks)
        config = json.loads((trained.path.parent / "config.json").read_text())
        mine = training.task_images(tasks, train["label_id"])
        assert config["train"] == [[s, int(y)] for s, y in zip(train["sha1"][mine], train["label_id"][mine],
                                                                strict=True)]
        mine = training.task_images(tasks, val["label_id"])
        assert [s for s, _ in config["val"]] == val["sha1"][mine].tolist()
        folders[name] = trained.path.parent
    assert {f.name.split("_")[0] for f in folders.values()} == set(DINO_TASKS)
    assert len(set(folders.values())) == 4 and all(f.parent == tmp_path for f in folders.values())
    assert len(json.loads((folders["ear"] / "config.json").read_text())["train"]) == 6


def test_no_images_for_a_models_heads_is_a_value_error(split, tmp_path):
    train, val = split
    no_ears = train[~training.task_images(("ear",), train["label_id"])]
    with pytest.raises(ValueError, match="no training or validation images"):
        _train((no_ears, val), tmp_path, tasks=("ear",))


# =============================================================================================
# 3. Learned retrieval: contrastive fine-tuning of BiomedCLIP
# =============================================================================================

# ---- multi_positive_nce ---------------------------------------------------------------------

def naive_nce(sim: torch.Tensor, positive: torch.Tensor) -> float:
    """-log(sum over positives of exp / sum over the row of exp), averaged over rows with a positive."""
    losses = []
    for s, p in zip(sim.double().tolist(), positive.tolist()):
        if not any(p):
            continue
        num = sum(math.exp(v) for v, q in zip(s, p) if q and v != NEG_INF)
        den = sum(math.exp(v) for v in s if v != NEG_INF)
        losses.append(-math.log(num / den))
    return sum(losses) / len(losses)


def test_multi_positive_nce_equals_a_naive_loop_with_excluded_pairs_and_rows_without_positives():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 7, generator=g) * 3
    positive = torch.rand(6, 7, generator=g) < 0.35
    positive[2] = False  # a row without positives: ignored
    positive[0] = torch.tensor([1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)  # several positives
    positive[1] = torch.tensor([0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    sim[0, 3] = sim[1, 0] = sim[4, 6] = NEG_INF  # excluded pairs
    sim[0, 4] = NEG_INF  # an excluded positive counts in neither sum
    got = multi_positive_nce(sim, positive)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(naive_nce(sim, positive), rel=1e-5)
    # ignoring a row: the loss over rows 0, 1 only equals the loss with every other row emptied
    only = positive.clone()
    only[2:] = False
    assert multi_positive_nce(sim, only).item() == pytest.approx(naive_nce(sim[:2], positive[:2]), rel=1e-5)


def test_multi_positive_nce_single_positive_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(5, 5, generator=g)
    target = torch.tensor([3, 0, 4, 1, 1])
    positive = F.one_hot(target, 5).bool()
    assert multi_positive_nce(sim, positive).item() == pytest.approx(F.cross_entropy(sim, target).item(), rel=1e-5)


def test_multi_positive_nce_without_any_positive_is_zero_and_keeps_a_gradient_path():
    sim = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    sim[0, 1] = NEG_INF
    sim.requires_grad_(True)
    loss = multi_positive_nce(sim, torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert sim.grad is not None and torch.equal(sim.grad, torch.zeros(3, 4))  # no NaN from the -inf entry


def test_a_line_carried_by_two_images_is_a_positive_for_both():
    """Mirrored positives: a line two images carry pulls both (never pushes the second away), so its
    loss is lower than if the second image were a negative, and the gradient raises both scores."""
    sim = torch.tensor([[2.0, 1.5, -0.5, 0.3]], requires_grad=True)
    both = torch.tensor([[True, True, False, False]])
    one = torch.tensor([[True, False, False, False]])
    loss_both, loss_one = multi_positive_nce(sim, both), multi_positive_nce(sim, one)
    assert loss_both.item() < loss_one.item()
    loss_both.backward()
    assert (sim.grad[0, :2] < 0).all() and (sim.grad[0, 2:] > 0).all()  # descent raises both positives


# ---- retrieval_terms --------------------------------------------------------------------------

class StubCLIP(nn.Module):
    """encode_image: a linear map of the flattened pixels; encode_text: a row of a fixed table per token id."""

    def __init__(self, pixels: int, dim: int, n_texts: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.proj = nn.Parameter(torch.randn(pixels, dim, generator=g))
        self.words = nn.Parameter(torch.randn(n_texts, dim, generator=g))
        self.text_calls = 0

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.proj

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.text_calls += 1
        return self.words[tokens[:, 0]]


class StubTokenizer:
    """One token per text: the index of its finding_key in `keys` (so any spelling of a line is one token)."""

    def __init__(self, keys: list[str]):
        self.keys, self.seen = keys, []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen.append(list(texts))
        return torch.tensor([[self.keys.index(finding_key(t))] for t in texts])


def stub_batch():
    g = torch.Generator().manual_seed(4)
    first, second = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    model = StubCLIP(12, 5, 3)
    tokenizer = StubTokenizer(["a polyp", "mucus", "unused"])
    groups = torch.tensor([7, 2, 7, 5])  # images 0 and 2: one group
    return model, tokenizer, first, second, groups


def test_retrieval_terms_match_a_hand_computation_with_multi_positive_nce():
    model, tokenizer, first, second, groups = stub_batch()
    temperature = 0.1
    chosen = ["A polyp.", "mucus", None, "a  POLYP"]  # two spellings of one line, one image without a line
    carried = [["A polyp."], ["Mucus;"], ["a polyp", "other"], ["a polyp", "mucus"]]
    terms = training.retrieval_terms(model, tokenizer, (first, second), groups, chosen, carried, temperature)
    loss = terms["image"] + terms["text"]

    views = F.normalize(torch.cat([first, second]).flatten(1) @ model.proj, dim=-1)  # rows 0-3 view 1, 4-7 view 2
    sim = views @ views.T / temperature
    sim.fill_diagonal_(NEG_INF)
    # image -> image positives by hand: the other view of the same image and both views of the group partner
    pos = torch.zeros(8, 8, dtype=torch.bool)
    for a, b in [(0, 4), (1, 5), (2, 6), (3, 7), (0, 2), (0, 6), (4, 2), (4, 6)]:
        pos[a, b] = pos[b, a] = True
    text = F.normalize(model.words[[0, 1]], dim=-1)  # the batch's distinct lines: "a polyp", "mucus"
    sim_t = text @ views[:4].T / temperature
    carries = torch.tensor([[True, False, True, True], [False, True, False, True]])  # finding_key comparison
    assert terms["image"].item() == pytest.approx(multi_positive_nce(sim, pos).item(), rel=1e-5)
    expected = multi_positive_nce(sim_t, carries) + multi_positive_nce(sim_t.T, carries.T)
    assert terms["text"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert [finding_key(t) for t in tokenizer.seen[0]] == ["a polyp", "mucus"]  # each line embedded once
    loss.backward()
    assert model.proj.grad.abs().sum() > 0 and model.words.grad[:2].abs().sum() > 0


def test_retrieval_image_term_never_takes_a_view_as_its_own_positive_and_uses_groups():
    model, tokenizer, first, second, groups = stub_batch()
    terms = training.retrieval_terms(model, tokenizer, (first, second), groups, [None] * 4, [[]] * 4, 0.1)
    assert model.text_calls == 0 and tokenizer.seen == [] and terms["text"].item() == 0  # no chosen line: no text term
    loss = terms["image"]
    views = F.normalize(torch.cat([first, second]).flatten(1) @ model.proj, dim=-1)
    sim = views @ views.T / 0.1
    g = groups.repeat(2)
    eye = torch.eye(8, dtype=torch.bool)
    expected = multi_positive_nce(sim.masked_fill(eye, NEG_INF), (g[:, None] == g[None, :]) & ~eye)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a loss counting the view itself, or ignoring the group partner, is another number
    with_self = multi_positive_nce(sim, g[:, None] == g[None, :])
    pairs_only = multi_positive_nce(sim.masked_fill(eye, NEG_INF), torch.eye(8, dtype=torch.bool).roll(4, 1))
    assert abs(loss.item() - with_self.item()) > 1e-3 and abs(loss.item() - pairs_only.item()) > 1e-3
    # identical views of images in separate groups: each view's only positive is its own other view
    same = training.retrieval_terms(model, tokenizer, (first, first.clone()), torch.arange(4), [None] * 4,
                                    [[]] * 4, 0.1)["image"]
    v = F.normalize(first.flatten(1) @ model.proj, dim=-1)
    s = (torch.cat([v, v]) @ torch.cat([v, v]).T / 0.1).masked_fill(eye, NEG_INF)
    assert same.item() == pytest.approx(multi_positive_nce(s, eye.roll(4, 1)).item(), rel=1e-5)


# ---- TwoViews ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def asymmetric_images(tmp_path_factory) -> list[Path]:
    """Three 40 x 30 images whose left and right halves differ (a mirror is visible)."""
    folder = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(5)
    paths = []
    for i in range(3):
        a = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        a[:, :10] = 255 * (i % 2)
        paths.append(folder / f"v{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def test_two_views_mirror_the_second_view_at_mirror_one_and_never_the_first(asymmetric_images):
    identity = T.Compose([T.PILToTensor()])  # deterministic: views are the (mirrored) cached squares
    mirrored = TwoViews(asymmetric_images, None, identity, 16, 1.0)
    plain = TwoViews(asymmetric_images, None, identity, 16, 0.0)
    for index, path in enumerate(asymmetric_images):
        square = decode_square(path, 16)
        assert not torch.equal(square, square.flip(-1))
        for seed in (0, 11, 2**40):
            v1, v2, i, s = mirrored[(index, seed)]
            assert (i, s) == (index, seed)
            assert torch.equal(v1, square) and torch.equal(v2, square.flip(-1))  # the first: never mirrored
            p1, p2, i, s = plain[(index, seed)]
            assert (i, s) == (index, seed)
            assert torch.equal(p1, square) and torch.equal(p2, square)


def test_two_views_come_from_the_key_reproducibly_and_are_drawn_independently(asymmetric_images):
    identity = T.Compose([T.PILToTensor()])
    half = TwoViews(asymmetric_images, None, identity, 16, 0.5)
    square = decode_square(asymmetric_images[0], 16)
    kinds = set()
    for seed in range(40):
        v1, v2, _, _ = half[(0, seed)]
        again = half[(0, seed)]
        assert torch.equal(v1, again[0]) and torch.equal(v2, again[1])
        kinds.add((torch.equal(v1, square.flip(-1)), torch.equal(v2, square.flip(-1))))
    assert kinds == {(False, False), (False, True)}  # the second view mirrored half the time, the first never
    crop = T.Compose([T.RandomResizedCrop(12, scale=(0.3, 1.0)), T.PILToTensor()])
    augmented = TwoViews(asymmetric_images, None, crop, 16, 0.0)
    a1, a2, _, _ = augmented[(1, 123)]
    b1, b2, _, _ = augmented[(1, 123)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # whatever the global RNG did in between
    assert any(not torch.equal(*augmented[(1, s)][:2]) for s in range(5))  # two different augmentations


# ---- make_tunable -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip() -> utils.Clip:
    return utils.load_clip("tiny", CPU)


@pytest.fixture(scope="module")
def biomed_shaped(tmp_path_factory) -> nn.Module:
    """BiomedCLIP's layout at toy size, offline: open_clip's CustomTextCLIP with a timm ViT (visual.trunk.blocks,
    visual.head) and a Hugging Face BERT text tower (text.transformer.encoder.layer, text.proj)."""
    folder = tmp_path_factory.mktemp("bert")
    BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.CustomTextCLIP(
            embed_dim=16,
            vision_cfg={"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                        "timm_proj": "linear", "image_size": 32},
            text_cfg={"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "mlp",
                      "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16,
                      "hf_model_pretrained": False}).eval()


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_make_tunable_tail_on_the_tiny_clip_trains_the_last_blocks_and_the_final_norms_and_projections(tiny_clip):
    model = copy.deepcopy(tiny_clip.model)
    names = make_tunable(model, RetrievalConfig(tuning="tail", blocks=1))
    assert set(names) == trainable(model)
    tail = ("visual.transformer.resblocks.1.", "transformer.resblocks.1.", "visual.ln_post.", "ln_final.")
    expected = {n for n, _ in model.named_parameters() if n.startswith(tail)} | {"visual.proj", "text_projection"}
    assert trainable(model) == expected
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" not in expected and "token_embedding.weight" not in expected
    everything = copy.deepcopy(tiny_clip.model)
    make_tunable(everything, RetrievalConfig(tuning="tail", blocks=5))  # more blocks than a tower has: all of them
    assert {n for n in trainable(everything) if "resblocks" in n} == \
        {n for n, _ in everything.named_parameters() if "resblocks" in n}


def biomed_blocks(model: nn.Module, n: int) -> tuple[str, ...]:
    """Prefixes of the last n blocks of BiomedCLIP's two towers."""
    v, t = len(model.visual.trunk.blocks), len(model.text.transformer.encoder.layer)
    return tuple([f"visual.trunk.blocks.{i}." for i in range(v - n, v)]
                 + [f"text.transformer.encoder.layer.{i}." for i in range(t - n, t)])


def test_make_tunable_tail_on_biomedclip_layout_trains_both_towers_last_blocks(biomed_shaped):
    model = copy.deepcopy(biomed_shaped)
    names = make_tunable(model, RetrievalConfig(tuning="tail", blocks=2))
    tail = biomed_blocks(model, 2) + ("visual.trunk.norm.", "visual.head.", "text.proj.")
    expected = {n for n, _ in model.named_parameters() if n.startswith(tail)}
    assert any(n.startswith("visual.trunk.blocks.") for n in expected)
    assert set(names) == trainable(model)
    assert {n for n in trainable(model) if n.startswith("visual.")} == {n for n in expected if n.startswith("visual.")}
    assert trainable(model) == expected


def lora_layers(model: nn.Module) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_make_tunable_lora_on_the_tiny_clip_adapts_last_blocks_linears_only(tiny_clip):
    original, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    model = copy.deepcopy(original)
    names = make_tunable(model, RetrievalConfig(tuning="lora", blocks=1, lora_rank=2))
    assert set(names) == trainable(model) and names and all("lora_" in n for n in names)
    assert lora_layers(model) == {f"{t}resblocks.1.mlp.{m}" for t in ("visual.transformer.", "transformer.")
                                  for m in ("c_fc", "c_proj")}
    assert not any("out_proj" in n for n in lora_layers(model))  # nn.MultiheadAttention reads it directly
    assert all(isinstance(m, nn.MultiheadAttention) for n, m in model.named_modules() if n.endswith(".attn"))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    tokens = tokenizer(["a polyp", "the left ear"])
    with torch.no_grad():  # LoRA starts as the identity: the adapted model encodes as the original
        assert torch.allclose(model.encode_image(images), original.encode_image(images), atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), original.encode_text(tokens), atol=1e-5)
    loss = model.encode_image(images).sum() + model.encode_text(tokens).sum()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_make_tunable_lora_on_biomedclip_layout_adapts_both_towers(biomed_shaped):
    model = copy.deepcopy(biomed_shaped)
    names = make_tunable(model, RetrievalConfig(tuning="lora", blocks=1, lora_rank=2))
    assert set(names) == trainable(model) and all("lora_" in n for n in names)
    blocks = biomed_blocks(model, 1)
    expected = {n for n, m in biomed_shaped.named_modules() if isinstance(m, nn.Linear) and n.startswith(blocks)}
    assert any(n.startswith("visual.") for n in expected) and any(n.startswith("text.") for n in expected)
    assert lora_layers(model) == expected
    with torch.no_grad():
        out = model.encode_image(torch.randn(2, 3, 32, 32))
        text = model.encode_text(torch.tensor([[2, 5, 6, 3] + [0] * 12]))
    assert out.shape == (2, 16) and text.shape == (1, 16) and torch.isfinite(out).all()


def test_make_tunable_unknown_tuning_raises(tiny_clip):
    with pytest.raises(ValueError, match="tuning"):
        make_tunable(copy.deepcopy(tiny_clip.model), RetrievalConfig(tuning="full"))


# ---- train_retrieval --------------------------------------------------------------------------

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (200, 60, 200), (40, 210, 210)]
WORDS = ["red", "green", "blue", "yellow", "purple", "cyan"]
FAST = RetrievalConfig(tuning="tail", blocks=1, epochs=4, batch_size=8, lr=5e-3, warmup_epochs=0.0, temperature=0.1)


def draw(path: Path, colour: tuple[int, int, int], corner: int, shift: int) -> None:
    a = np.full((72, 72, 3), 20, dtype=np.uint8)
    y, x = divmod(corner, 2)
    a[8 + 30 * y + shift:30 + 30 * y + shift, 8 + 30 * x:30 + 30 * x] = colour
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def train_frame(tmp_path_factory) -> pd.DataFrame:
    """24 images in 12 groups of two (a coloured square at one of four corners), each image carrying its
    colour's line and half of them a second, corner line."""
    folder = tmp_path_factory.mktemp("train_images")
    rows = []
    for g in range(12):
        colour, corner = g % 6, g // 6 * 2 + g % 2
        for k in range(2):
            path = folder / f"g{g}_{k}.png"
            draw(path, COLOURS[colour], corner, 3 * k)
            texts = [f"a {WORDS[colour]} square"] + ([f"a mark at corner {corner}"] if k else [])
            rows.append({"path": str(path), "sha1": file_sha1(path), "group": g, "texts": sorted(texts)})
    return pd.DataFrame(rows)


def fixed_loss(model: nn.Module, frame: pd.DataFrame, clip: utils.Clip) -> float:
    """The training loss without augmentation or batching: every image (eval preprocessing) and its mirror
    as the two views, each image's first line chosen."""
    x = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in frame["path"]])
    with torch.no_grad():
        terms = training.retrieval_terms(model.eval(), clip.tokenizer, (x, x.flip(-1)),
                                         torch.tensor(frame["group"].to_numpy()), [t[0] for t in frame["texts"]],
                                         list(frame["texts"]), 0.1)
        return sum(terms.values()).item()


def trainable_state(tuned) -> dict[str, torch.Tensor]:
    names = trainable(tuned.model)
    return {k: v for k, v in tuned.model.state_dict().items() if k in names}


@pytest.fixture(scope="module")
def trained(tiny_clip, train_frame, tmp_path_factory):
    before = model_fingerprint(tiny_clip.model)
    checkpoints = tmp_path_factory.mktemp("retrieval_runs")
    tuned = train_retrieval(tiny_clip, train_frame, FAST, _runtime(checkpoints))
    return SimpleNamespace(tuned=tuned, dir=checkpoints, before=before)


def test_train_retrieval_trains_a_copy_and_the_loss_goes_down(tiny_clip, train_frame, trained):
    model = tiny_clip.model
    assert model_fingerprint(model) == trained.before  # the original's weights are unchanged
    tuned = trained.tuned
    assert tuned.model is not model and not tuned.model.training
    history = tuned.history
    assert list(history["epoch"]) == [1, 2, 3, 4] and np.isfinite(history["train_loss"]).all()
    assert list(history.columns) == ["epoch", "train_loss", "lr_tuned", "seconds"]  # no evaluation
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert fixed_loss(tuned.model, train_frame, tiny_clip) < fixed_loss(model, train_frame, tiny_clip) - 0.05
    assert tuned.path.name == "best.pt" and tuned.path.is_file() and tuned.path.parent.name.startswith("retrieval_")
    assert {p.name for p in tuned.path.parent.iterdir()} == FINISHED_RUN_FILES and tuned.finished
    best = torch.load(tuned.path, weights_only=True)
    assert set(best) == {"model", "epoch"} and best["epoch"] == 4  # the last epoch's; no optimizer state
    assert set(best["model"]) == trainable(tuned.model)  # the trained tensors only
    original = dict(model.state_dict())
    changed = {k for k, v in tuned.model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and changed <= trainable(tuned.model)  # only what make_tunable left trainable moved
    assert torch.equal(tuned.model.token_embedding.weight, model.token_embedding.weight)


def test_train_retrieval_off_trains_nothing(tiny_clip, train_frame, tmp_path):
    assert train_retrieval(tiny_clip, train_frame, replace(FAST, tuning="off"), _runtime(tmp_path)) is None
    assert not list(tmp_path.iterdir())


def test_train_retrieval_reuses_a_finished_run(tiny_clip, train_frame, trained, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(training, "_train_epoch", no_training)
    capsys.readouterr()
    again = train_retrieval(tiny_clip, train_frame, FAST, _runtime(trained.dir))
    assert "reusing finished run" in capsys.readouterr().out
    assert again.path == trained.tuned.path
    pd.testing.assert_frame_equal(again.history, trained.tuned.history)
    for k, v in trainable_state(trained.tuned).items():
        assert torch.equal(again.model.state_dict()[k], v)
    assert len(list(trained.dir.glob("retrieval_*"))) == 1


def test_train_retrieval_resumed_run_ends_with_the_uninterrupted_weights(tiny_clip, train_frame, trained, tmp_path,
                                                                          monkeypatch, capsys):
    real, calls = training.retrieval_terms, []

    def interrupt_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # 3 batches an epoch: the second batch of epoch 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "retrieval_terms", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_retrieval(tiny_clip, train_frame, FAST, _runtime(tmp_path))
    monkeypatch.setattr(training, "retrieval_terms", real)
    capsys.readouterr()
    resumed = train_retrieval(tiny_clip, train_frame, FAST, _runtime(tmp_path))
    assert "after epoch 1/4" in capsys.readouterr().out  # the interrupted run's epoch 1 is kept
    assert resumed.path.parent.name == trained.tuned.path.parent.name  # the same identity, another folder
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4]
    assert resumed.history["train_loss"].tolist() == trained.tuned.history["train_loss"].tolist()
    reference = trainable_state(trained.tuned)
    got = trainable_state(resumed)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k  # the very same computation: bit-equal
    assert {p.name for p in resumed.path.parent.iterdir()} == FINISHED_RUN_FILES


def test_train_retrieval_run_identity_follows_image_content_and_config(tiny_clip, train_frame, trained, tmp_path,
                                                                       monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "retrieval_terms", stop)  # no need to train: a run's folder is made first

    def run_folder(frame: pd.DataFrame, cfg: RetrievalConfig, where: str) -> str:
        with pytest.raises(KeyboardInterrupt):
            train_retrieval(tiny_clip, frame, cfg, _runtime(tmp_path / where))
        (folder,) = (tmp_path / where).glob("retrieval_*")
        return folder.name

    assert run_folder(train_frame, FAST, "same") == trained.tuned.path.parent.name  # one identity anywhere
    changed = train_frame.copy()
    path = tmp_path / "changed.png"
    draw(path, (255, 255, 255), 3, 0)
    changed.loc[5, ["path", "sha1"]] = [str(path), file_sha1(path)]
    assert run_folder(changed, FAST, "content") != trained.tuned.path.parent.name  # one image's content: a new run
    (tmp_path / "copies").mkdir()
    moved = [shutil.copy(p, tmp_path / "copies" / f"renamed_{i}.png") for i, p in enumerate(train_frame["path"])]
    assert run_folder(train_frame.assign(path=moved), FAST, "moved") == trained.tuned.path.parent.name  # by content
    other_cfg = RetrievalConfig(**{**FAST.__dict__, "lr": 1e-3})
    assert run_folder(train_frame, other_cfg, "config") != trained.tuned.path.parent.name


def test_train_retrieval_refuses_no_epochs_and_fewer_than_two_images(tiny_clip, train_frame, tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        train_retrieval(tiny_clip, train_frame, RetrievalConfig(epochs=0), _runtime(tmp_path))
    with pytest.raises(ValueError, match="two or more images"):
        train_retrieval(tiny_clip, train_frame.iloc[:1], FAST, _runtime(tmp_path))
    assert not list(tmp_path.iterdir())


def test_retrieval_training_transform_is_the_dino_recipe_with_the_clip_preprocessing(tiny_clip, train_frame):
    """The same TRAIN_AUGMENT as DINOv2, with the CLIP preprocess's own mean, std and interpolation."""
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    preprocess = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(64), T.ToTensor(),
                            T.Normalize(mean, std)])
    clip = utils.Clip(tiny_clip.model, preprocess, tiny_clip.tokenizer)
    tf = training.RetrievalTraining(clip, train_frame, FAST, _runtime()).loader().dataset.transform
    assert repr(tf) == repr(_expected_train_transform(64, mean, std, "bilinear"))
    assert np.allclose(_normalize(tf).mean, mean) and np.allclose(_normalize(tf).std, std)
    norm = next(t for t in tiny_clip.preprocess.transforms if isinstance(t, T.Normalize))
    default = training.RetrievalTraining(tiny_clip, train_frame, FAST, _runtime()).loader().dataset.transform
    assert repr(default) == repr(_expected_train_transform(64, norm.mean, norm.std, "bicubic"))
    assert np.allclose(_normalize(default).mean, norm.mean) and np.allclose(_normalize(default).std, norm.std)


def test_fp16_tuning_steps_the_schedule_only_with_the_optimizer(tiny_clip, train_frame, tmp_path, monkeypatch):
    """fp16 (a T4's autocast) trains through a GradScaler; a step it skips on inf/NaN gradients must not
    advance the schedule (torch warns "lr_scheduler.step() before optimizer.step()" when it does)."""
    made, real_opt = [], training._Optimization
    monkeypatch.setattr(training, "_Optimization", lambda *a: made.append(real_opt(*a)) or made[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the scheduler warning is a UserWarning
        tuned = train_retrieval(tiny_clip, train_frame, replace(FAST, epochs=2),
                                _runtime(tmp_path, amp=torch.float16))
    assert np.isfinite(tuned.history["train_loss"]).all()
    state = made[0].state_dict()
    assert state["scaler"] and state["scheduler"]["last_epoch"] <= 2 * math.ceil(len(train_frame) / FAST.batch_size)


def test_side_rule_the_text_term_is_the_same_whatever_mirror_p_and_the_image_term_keeps_its_mirrors(
        tiny_clip, train_frame):
    """Lines that name a side ("... on the left") meet the never-mirrored first view: for the same batch and
    seed, the recipe's text term at mirror_p=1 equals its value at mirror_p=0, while the image-to-image term
    sees mirrored second views. Fed the mirrored views, the text term would change: the rule has teeth."""
    side = lambda corner: "left" if corner % 2 == 0 else "right"  # the square's side in the image (draw)
    sided = train_frame.assign(texts=[[f"a {WORDS[g % 6]} square on the {side(g // 6 * 2 + g % 2)}"]
                                      for g in train_frame["group"]])
    recipes = {p: training.RetrievalTraining(tiny_clip, sided, replace(FAST, mirror_p=p), _runtime())
               for p in (0.0, 1.0)}
    keys = [(i, 1000 + 7 * i) for i in range(0, 24, 3)]  # one batch, both sides named
    batch = {p: torch.utils.data.default_collate([r.loader().dataset[k] for k in keys]) for p, r in recipes.items()}
    assert torch.equal(batch[0.0][0], batch[1.0][0]) and not torch.equal(batch[0.0][1], batch[1.0][1])
    with torch.no_grad():
        terms = {p: r.terms(batch[p]) for p, r in recipes.items()}
        swapped = {p: r.terms((batch[p][1], batch[p][0], *batch[p][2:])) for p, r in recipes.items()}
    assert terms[1.0]["text"].item() == terms[0.0]["text"].item() > 0
    assert abs(terms[1.0]["image"].item() - terms[0.0]["image"].item()) > 1e-4  # the mirrors stay in that term
    assert abs(swapped[1.0]["text"].item() - swapped[0.0]["text"].item()) > 1e-4
