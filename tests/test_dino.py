"""Tests for the DINOv2 part: CPU, the tiny random ViT (DINO_TINY_KWARGS, 4 registers), 28-56 px PNGs."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T
from timm.layers import resample_abs_pos_embed

import utils as ud
from utils import (
    DINO_TINY_ARCH,
    DINO_TINY_KWARGS,
    ENTRepNet,
    FlipSwapDataset,
    build_dino,
    class_weights_from_labels,
    dino_features,
    dino_fine_probs,
    dino_transforms,
    flip_tta_probs,
    load_dino_weights,
    multitask_loss,
    plot_learning_curve,
    predict_dino,
    train_dino,
    warmup_cosine,
)
from utils import FINE_TASKS, LABEL_TO_ID, LABELS

D = int(ud.DINO_TINY_KWARGS["embed_dim"])  # the tiny model's width

SIZE = 28  # 2x2 patches of 14 px


def _write_pngs(folder, n, seed, size=SIZE):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CI box OpenMP threads
    that wait on each other make them ~30x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dino_data")
    train_labels = [0, 1, 2, 3, 4, 5, 6, 3]
    val_labels = [0, 1, 2, 3, 4, 5, 6]
    train = list(zip(_write_pngs(root / "train", len(train_labels), 0), train_labels))
    val = list(zip(_write_pngs(root / "val", len(val_labels), 1), val_labels))
    return train, val


def _tiny_model(image_size=SIZE):
    return ENTRepNet(build_dino("tiny", image_size=image_size))


def _train(data, checkpoint_dir, **overrides):
    train, val = data
    settings = dict(
        checkpoint_dir=checkpoint_dir, epochs=3, batch_size=4, lr_head=1e-2, lr_backbone=1e-3,
        warmup_epochs=1, grad_accum=1, amp_dtype="fp32", device="cpu", seed=0, patience=None,
        num_workers=0, progress=False,
    )
    model = _tiny_model()
    history, best = train_dino(model, train, val, **{**settings, **overrides})
    return model, history, best


def _batch(labels, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), 3, size, size, generator=g), torch.tensor(labels)


# --- heads and loss -------------------------------------------------------------------------


def test_forward_backward_reaches_every_head_and_the_backbone():
    model = _tiny_model()
    x, y = _batch(list(range(7)))
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"coarse": (7, 4), "ear": (7, 2), "nose": (7, 2), "vc": (7, 2)}
    multitask_loss(out, y, class_weights_from_labels(y.tolist())).backward()
    for name, head in model.heads.items():
        assert head.weight.grad.abs().sum() > 0, name
    bb = model.backbone
    for name, param in [("patch_embed", bb.patch_embed.proj.weight), ("registers", bb.reg_token),
                        ("block 0", bb.blocks[0].attn.qkv.weight), ("final norm", bb.norm.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_ear_sample_contributes_nothing_to_nose_and_vc_losses():
    model = _tiny_model()
    x, y = _batch([LABEL_TO_ID["ear-left"], LABEL_TO_ID["ear-right"], LABEL_TO_ID["ear-left"]])
    out = model(x)
    loss = multitask_loss(out, y)
    loss.backward()
    for task in ("nose", "vc"):  # term present in the graph (grad tensors exist) and exactly zero
        assert model.heads[task].weight.grad is not None
        assert torch.count_nonzero(model.heads[task].weight.grad) == 0
        assert torch.count_nonzero(model.heads[task].bias.grad) == 0
    assert model.heads["ear"].weight.grad.abs().sum() > 0
    # closed form: coarse CE + ear CE over the batch, nothing else
    expected = torch.nn.functional.cross_entropy(out["coarse"], torch.zeros(3, dtype=torch.long)) + \
        torch.nn.functional.cross_entropy(out["ear"], torch.tensor([0, 1, 0]))
    assert torch.allclose(loss, expected)


def test_class_weights_are_balanced_per_head():
    labels = [LABEL_TO_ID["nose-left"]] * 3 + [LABEL_TO_ID["nose-right"]] + [LABEL_TO_ID["throat"]] * 4
    w = class_weights_from_labels(labels)
    # coarse: nose 4, throat 4 of 8 over 2 present regions -> 1 each; absent regions -> 1
    assert torch.allclose(w["coarse"], torch.ones(4))
    # nose side among the 4 nose images: left 3 -> 4/(2*3), right 1 -> 4/(2*1)
    assert torch.allclose(w["nose"], torch.tensor([2 / 3, 2.0]))


# --- data pipeline --------------------------------------------------------------------------


def test_flip_swaps_ear_side_keeps_vc_state_and_mirrors_the_image(data):
    (train, _), eval_tf = data, dino_transforms(_tiny_model(), SIZE, train=False)
    paths = [train[3][0], train[4][0], train[6][0]]
    labels = [LABEL_TO_ID["ear-left"], LABEL_TO_ID["vc-open"], LABEL_TO_ID["throat"]]
    plain = FlipSwapDataset(paths, labels, eval_tf, cache_size=SIZE, flip_p=0.0, progress=False)
    flipped = FlipSwapDataset(paths, labels, eval_tf, cache_size=SIZE, flip_p=1.0, progress=False)
    got = [LABELS[flipped[i][1]] for i in range(3)]
    assert got == ["ear-right", "vc-open", "throat"]
    for i in range(3):
        assert torch.equal(flipped[i][0], plain[i][0].flip(-1))
        assert not torch.equal(flipped[i][0], plain[i][0])  # the noise image is not symmetric


def test_train_items_are_reproducible_from_their_seed(data):
    train, _ = data
    tf = dino_transforms(_tiny_model(), SIZE, train=True)
    ds = FlipSwapDataset([p for p, _ in train], [y for _, y in train], tf, cache_size=33, flip_p=0.5, progress=False)
    a, b, c = ds[(3, 123)], ds[(3, 123)], ds[(3, 124)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])
    sampler = ud.EpochSampler(len(ds), seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(i for i, _ in sampler) == list(range(len(ds)))
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_transforms_take_normalisation_from_the_model_and_never_flip():
    model = _tiny_model()
    train_tf = dino_transforms(model, SIZE, train=True)
    text = repr(train_tf)
    assert "HorizontalFlip" not in text and "RandomRotation" in text and "ColorJitter" in text
    norm = [t for t in train_tf.transforms[1].transforms if type(t).__name__ == "Normalize"][0]
    assert np.allclose(norm.mean, model.backbone.pretrained_cfg["mean"])
    x = dino_transforms(model, SIZE, train=False)(Image.new("RGB", (40, 30)))
    assert tuple(x.shape) == (3, SIZE, SIZE)


# --- SurgeNet / DINOv2 checkpoint loading ---------------------------------------------------


def _original_dinov2_checkpoint(seed=0):
    """A tiny checkpoint in the original DINOv2 (facebookresearch / SurgeNet) key format at 336 px."""
    g = torch.Generator().manual_seed(seed)
    source = timm.create_model(DINO_TINY_ARCH, img_size=336, num_classes=0, **DINO_TINY_KWARGS)
    ckpt = {k: torch.randn(v.shape, generator=g) for k, v in source.state_dict().items()
            if k not in ("cls_token", "reg_token", "pos_embed")}
    ckpt["cls_token"] = torch.randn(1, 1, D, generator=g)
    ckpt["register_tokens"] = torch.randn(1, 4, D, generator=g)
    ckpt["mask_token"] = torch.zeros(1, D)
    ckpt["pos_embed"] = torch.randn(1, 24 * 24 + 1, D, generator=g)
    return ckpt


def test_original_dinov2_checkpoint_loads_with_registers_and_resampled_pos_embed(tmp_path):
    ckpt = _original_dinov2_checkpoint()
    path = tmp_path / "DINOv2_tiny_size336.pth"
    torch.save(ckpt, path)
    model = build_dino("tiny", image_size=56)
    load_dino_weights(model, path)
    assert torch.equal(model.reg_token, ckpt["register_tokens"])
    assert torch.equal(model.cls_token, ckpt["cls_token"] + ckpt["pos_embed"][:, :1])
    assert torch.equal(model.blocks[1].mlp.fc2.weight, ckpt["blocks.1.mlp.fc2.weight"])
    expected_pos = resample_abs_pos_embed(ckpt["pos_embed"][:, 1:], new_size=(4, 4), num_prefix_tokens=0)
    assert model.pos_embed.shape == (1, 16, D) and torch.allclose(model.pos_embed, expected_pos)
    # at the pretraining size nothing is resampled
    native = build_dino("tiny", image_size=336)
    load_dino_weights(native, path)
    assert torch.equal(native.pos_embed, ckpt["pos_embed"][:, 1:])
    # a DINOv2 training checkpoint: {"teacher": {"backbone.*", "dino_head.*"}}
    wrapped = {"teacher": {**{f"backbone.{k}": v for k, v in ckpt.items()}, "dino_head.last_layer.weight": torch.ones(3)}}
    other = build_dino("tiny", image_size=56)
    load_dino_weights(other, wrapped)
    assert torch.equal(other.reg_token, ckpt["register_tokens"])


def test_checkpoints_that_do_not_fit_fail_loudly(tmp_path):
    ckpt = _original_dinov2_checkpoint()
    renamed = {k.replace("blocks.", "encoder.layer."): v for k, v in ckpt.items()}
    with pytest.raises(ValueError, match="missing keys.*blocks.0"):
        load_dino_weights(build_dino("tiny", image_size=56), renamed)
    no_norm = {k: v for k, v in ckpt.items() if not k.startswith("norm.")}
    with pytest.raises(ValueError, match="norm.weight"):
        load_dino_weights(build_dino("tiny", image_size=56), no_norm)
    plain = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **DINO_TINY_KWARGS)
    with pytest.raises(ValueError, match="4 register tokens but the model has 0"):
        load_dino_weights(plain, ckpt)
    no_registers = {k: v for k, v in ckpt.items() if k != "register_tokens"}
    with pytest.raises(ValueError, match="0 register tokens but the model has 4"):
        load_dino_weights(build_dino("tiny", image_size=56), no_registers)
    with pytest.raises(FileNotFoundError, match="SurgeNetXL"):
        load_dino_weights(build_dino("tiny", image_size=56), tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="multiple of .* patch size 14"):
        build_dino("tiny", image_size=30)


# --- training, checkpoints, resume ----------------------------------------------------------


def test_interrupted_and_resumed_run_ends_with_the_same_weights(data, tmp_path, monkeypatch):
    full, full_history, _ = _train(data, tmp_path / "full")

    real_save = ud.atomic_torch_save

    def crash_after_first_epoch(obj, path):
        real_save(obj, path)
        if path.name == "last.pt":
            raise KeyboardInterrupt("simulated crash after epoch 1")

    monkeypatch.setattr(ud, "atomic_torch_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "resumed")
    monkeypatch.setattr(ud, "atomic_torch_save", real_save)
    (run_dir,) = (tmp_path / "resumed").iterdir()
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1

    resumed, resumed_history, _ = _train(data, tmp_path / "resumed")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    last_full = torch.load(next((tmp_path / "full").iterdir()) / "last.pt", weights_only=True)["model"]
    last_resumed = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(last_full[k], last_resumed[k]) for k in last_full)
    cols = ["epoch", "train_loss", "val_loss", "val_macro_f1", "lr"]
    pd.testing.assert_frame_equal(full_history[cols], resumed_history[cols])
    assert list(full_history.columns) == ["epoch", "train_loss", "val_loss", "val_acc", "val_macro_f1", "lr",
                                          "lr_backbone", "seconds"]
    assert full_history["lr"].iloc[-1] < full_history["lr"].max()  # cosine decays


def test_finished_run_is_reused_and_a_new_config_trains_afresh(data, tmp_path, monkeypatch):
    model, history, best = _train(data, tmp_path, epochs=2)
    assert best.exists() and len(history) == 2

    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(ud, "dino_train_epoch", no_training)
    reused, reused_history, reused_best = _train(data, tmp_path, epochs=2)
    assert reused_best == best
    pd.testing.assert_frame_equal(reused_history, history)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reused.state_dict().values()))
    with pytest.raises(AssertionError, match="a training step ran"):
        _train(data, tmp_path, epochs=2, lr_head=5e-3)
    assert len(list(tmp_path.iterdir())) == 2  # the new config has its own folder


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, "fp16"])
def test_mixed_precision_trains_on_cpu(data, tmp_path, amp_dtype):
    model = _tiny_model()
    dtype = ud.resolve_amp_dtype(amp_dtype, torch.device("cpu"))
    with ud.amp_autocast(torch.device("cpu"), dtype):
        assert model(_batch([0, 1])[0])["coarse"].dtype == dtype
    before = model.heads["coarse"].weight.detach().clone()
    train, val = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()" on a skipped fp16 step
        history, _ = train_dino(model, train, val, checkpoint_dir=tmp_path, epochs=3, batch_size=4,
                                amp_dtype=amp_dtype, device="cpu", num_workers=0, progress=False, grad_accum=2)
    assert np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all()
    last = torch.load(next(tmp_path.iterdir()) / "last.pt", weights_only=True)
    # the weights moved (fp16: a GradScaler may skip its first steps on overflow, by design)
    assert not torch.equal(before, last["model"]["heads.coarse.weight"])
    assert (last["scaler"].get("scale", 0) > 0) == (dtype == torch.float16)  # fp16 runs with a GradScaler
    # the schedule advanced once per optimizer step actually taken: 8 images, batch 4, grad_accum 2 -> 1 per epoch
    skipped = round(math.log2(65536.0 / last["scaler"]["scale"])) if dtype == torch.float16 else 0
    assert last["scheduler"]["last_epoch"] == 3 - skipped


def test_worker_count_does_not_change_the_result(data, tmp_path):
    in_process, _, _ = _train(data, tmp_path / "w0", epochs=1)
    two_workers, _, _ = _train(data, tmp_path / "w2", epochs=1, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(in_process.state_dict().values(), two_workers.state_dict().values()))


def test_early_stopping_ends_a_run_without_improvement(data, tmp_path):
    _, history, best = _train(data, tmp_path, epochs=5, patience=1, lr_head=0.0, lr_backbone=0.0)
    assert list(history["epoch"]) == [1, 2]  # epoch 2 did not beat epoch 1
    assert torch.load(best, weights_only=True)["epoch"] == 1


def test_backbone_learns_slower_than_heads_with_layer_decay():
    model = _tiny_model()
    groups = ud.dino_param_groups(model, lr_head=1e-3, lr_backbone=1e-4, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    bb = model.backbone
    assert lr_of[id(model.heads["ear"].weight)] == (1e-3, 0.05)
    # timm's layer map: stem, block 0, ..., last block + final norm (top, full lr_backbone)
    depth = len(bb.blocks)
    assert lr_of[id(bb.norm.weight)] == (1e-4, 0.0)  # norms are not weight-decayed
    assert lr_of[id(bb.blocks[-1].attn.qkv.weight)] == (1e-4, 0.05)
    assert lr_of[id(bb.blocks[-2].attn.qkv.weight)] == (1e-4 * 0.5, 0.05)
    assert lr_of[id(bb.patch_embed.proj.weight)] == pytest.approx((1e-4 * 0.5 ** (depth - 1) * 0.5, 0.05))
    assert lr_of[id(bb.reg_token)][1] == 0.0 and lr_of[id(bb.pos_embed)][1] == 0.0
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter in exactly one group


def test_warmup_cosine_schedule():
    f = [warmup_cosine(s, warmup_steps=2, total_steps=6) for s in range(6)]
    assert f[:3] == [0.5, 1.0, 1.0] and math.isclose(f[4], 0.5) and f[5] < f[4]


# --- inference ------------------------------------------------------------------------------


def test_flip_tta_is_consistent_with_mirrored_images(data, tmp_path):
    train, _ = data
    paths = [p for p, _ in train[:5]]
    mirrored = []
    for p in paths:
        q = tmp_path / f"mirror_{p.name}"
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(q)
        mirrored.append(q)
    model = _tiny_model()
    kw = dict(device="cpu", batch_size=4, amp_dtype="fp32", progress=False)
    p, pm = predict_dino(model, paths, tta_flip=True, **kw), predict_dino(model, mirrored, tta_flip=True, **kw)
    assert p["coarse"].shape == (5, 4) and all(p[t].shape == (5,) for t in FINE_TASKS)
    assert np.allclose(p["coarse"], pm["coarse"], atol=1e-6)
    assert np.allclose(p["ear"], 1 - pm["ear"], atol=1e-6)  # p(ear-right | x) = p(ear-left | mirror x)
    assert np.allclose(p["nose"], 1 - pm["nose"], atol=1e-6)
    assert np.allclose(p["vc"], pm["vc"], atol=1e-6)  # vc state does not change in a mirror
    plain = predict_dino(model, paths, tta_flip=False, **kw)
    assert not np.allclose(plain["ear"], p["ear"])  # TTA does something on a random model


def test_flip_tta_of_a_flip_symmetric_prediction_is_unchanged():
    probs = {"coarse": np.array([[0.1, 0.2, 0.3, 0.4]]), "ear": np.array([0.8]), "nose": np.array([0.3]),
             "vc": np.array([0.6])}
    mirror = {"coarse": probs["coarse"], "ear": np.array([0.2]), "nose": np.array([0.7]), "vc": np.array([0.6])}
    out = flip_tta_probs(probs, mirror)
    assert all(np.allclose(out[k], probs[k]) for k in probs)


def test_fine_probs_follow_the_chain_rule_and_sum_to_one():
    rng = np.random.default_rng(0)
    coarse = rng.dirichlet(np.ones(4), size=6)
    probs = {"coarse": coarse, **{t: rng.random(6) for t in FINE_TASKS}}
    p7 = dino_fine_probs(probs)
    assert p7.shape == (6, 7) and np.allclose(p7.sum(1), 1.0)
    assert np.allclose(p7[:, LABEL_TO_ID["ear-right"]], coarse[:, 0] * probs["ear"])
    assert np.allclose(p7[:, LABEL_TO_ID["nose-left"]], coarse[:, 1] * (1 - probs["nose"]))
    assert np.allclose(p7[:, LABEL_TO_ID["vc-closed"]], coarse[:, 2] * probs["vc"])
    assert np.allclose(p7[:, LABEL_TO_ID["throat"]], coarse[:, 3])


def test_features_are_l2_normalised_backbone_embeddings(data):
    train, _ = data
    model = _tiny_model()
    feats = dino_features(model, [p for p, _ in train[:3]], device="cpu", amp_dtype="fp32", progress=False)
    assert feats.shape == (3, D) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)


def test_predictions_and_features_are_cached_per_image_and_model(data, tmp_path, monkeypatch):
    train, _ = data
    paths = [p for p, _ in train[:5]]
    model = _tiny_model()
    kw = dict(device="cpu", batch_size=4, amp_dtype="fp32", progress=False)
    fresh_p, fresh_f = predict_dino(model, paths, tta_flip=True, **kw), dino_features(model, paths, **kw)
    cached = dict(kw, cache_dir=tmp_path, model_id="ckpt-a")
    first_p, first_f = predict_dino(model, paths[:3], tta_flip=True, **cached), dino_features(model, paths[:3], **cached)
    seen = []
    real = ud.collect_outputs
    monkeypatch.setattr(ud, "collect_outputs", lambda m, loader, *a, **k: seen.append(len(loader.dataset)) or real(m, loader, *a, **k))
    p, f = predict_dino(model, paths, tta_flip=True, **cached), dino_features(model, paths, **cached)
    assert seen == [2, 2, 2]  # only the 2 new images: probabilities (image + mirror), then features
    assert all(np.array_equal(p[k], fresh_p[k]) for k in fresh_p) and torch.equal(f, fresh_f)
    assert np.array_equal(p["coarse"][:3], first_p["coarse"]) and torch.equal(f[:3], first_f)
    seen.clear()
    predict_dino(model, paths, tta_flip=True, **cached)
    assert seen == []  # a rerun runs the model on nothing
    predict_dino(model, paths, tta_flip=False, **cached)
    predict_dino(model, paths, tta_flip=True, **dict(cached, model_id="ckpt-b"))
    assert seen == [5, 5, 5]  # other TTA setting, other checkpoint: their own caches
    seen.clear()
    real_transforms = ud.dino_transforms
    monkeypatch.setattr(ud, "dino_transforms",
                        lambda m, size, train: T.Compose([real_transforms(m, size, train), T.Lambda(torch.neg)]))
    predict_dino(model, paths, tta_flip=True, **cached)
    assert seen == [5, 5]  # same checkpoint, other preprocessing: computed again


def test_learning_curve_plots_both_panels():
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.0], "val_loss": [2.1, 1.7, 1.6],
                            "val_acc": [0.3, 0.5, 0.4], "val_macro_f1": [0.2, 0.45, 0.4]})
    fig = plot_learning_curve(history)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3  # train, val, best-epoch marker
    assert fig.axes[1].lines[-1].get_xdata()[0] == 2  # best macro F1 at epoch 2


def test_empty_weights_use_timm_pretrained_and_offline_failure_says_what_to_do(monkeypatch):
    calls = []

    def fake_create(name, pretrained=False, **kw):
        calls.append(pretrained)
        if pretrained:
            raise OSError("We couldn't connect to the hub")
        return real_create(name, pretrained=False, **kw)

    real_create = ud.timm.create_model
    monkeypatch.setattr(ud.timm, "create_model", fake_create)
    with pytest.raises(RuntimeError, match="dino_weights"):
        build_dino("vit_small_patch14_reg4_dinov2", weights="", image_size=56)
    with pytest.warns(UserWarning, match="random"):
        model = build_dino("vit_small_patch14_reg4_dinov2", weights="random", image_size=56)
    assert calls == [True, False] and model.reg_token.shape[1] == 4


# --- runs that die, files that cannot be trusted ----------------------------------------------

def test_a_killed_training_process_resumes_to_the_same_weights(data, tmp_path):
    """SIGKILL after the first epoch's checkpoint, then the same call again: resumed, same result."""
    import signal
    import subprocess
    import sys
    import textwrap

    train, val = data
    script = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
        import torch
        torch.set_num_threads(1)
        import test_dino, utils
        real_save = utils.atomic_torch_save
        def save_then_hang(obj, path):
            real_save(obj, path)
            if path.name == "last.pt":
                print("EPOCH_SAVED", flush=True)
                time.sleep(120)  # killed here by the test
        utils.atomic_torch_save = save_then_hang
        test_dino._train(({[(str(p), y) for p, y in train]!r}, {[(str(p), y) for p, y in val]!r}), {str(tmp_path / "killed")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "EPOCH_SAVED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    (run_dir,) = (tmp_path / "killed").iterdir()
    assert ud.load_torch_checkpoint(run_dir / "last.pt")["epoch"] == 1
    resumed, _, _ = _train(data, tmp_path / "killed")
    full, _, _ = _train(data, tmp_path / "full")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("damage", ["truncate last", "edit best", "no digest"])
def test_damaged_checkpoints_are_detected_and_the_run_redone(data, tmp_path, damage):
    full, _, _ = _train(data, tmp_path / "full")
    _train(data, tmp_path / "run")
    (run_dir,) = (tmp_path / "run").iterdir()
    if damage == "truncate last":
        blob = (run_dir / "last.pt").read_bytes()
        (run_dir / "last.pt").write_bytes(blob[: len(blob) // 2])
    elif damage == "edit best":
        best = torch.load(run_dir / "best.pt", weights_only=True)
        best["model"]["heads.coarse.weight"] += 1.0  # a valid file, but not the one we wrote
        torch.save(best, run_dir / "best.pt")
    else:
        (run_dir / "last.pt.sha256").unlink()
    with pytest.raises(ud.CheckpointError):
        ud.load_torch_checkpoint(run_dir / ("best.pt" if damage == "edit best" else "last.pt"))
    with pytest.warns(UserWarning, match="from the start"):
        redone, history, _ = _train(data, tmp_path / "run")
    assert len(history) == 3  # trained again, not reused
    for (name, a), (_, b) in zip(full.state_dict().items(), redone.state_dict().items()):
        assert torch.equal(a, b), name


# --- two processes (torch DDP, gloo on the CPU) ------------------------------------------------


def test_epoch_shards_are_equal_cover_the_epoch_and_depend_only_on_seed_and_epoch():
    n, seed, epoch = 11, 5, 3
    for world_size in (1, 2, 3, 4):
        shards = [ud.epoch_shard(n, seed, epoch, rank, world_size) for rank in range(world_size)]
        assert {len(shard) for shard in shards} == {math.ceil(n / world_size)}  # same step count on every rank
        assert {index for shard in shards for index, _ in shard} == set(range(n))
        assert len({pair for shard in shards for pair in shard}) == n  # a padded index keeps its sample seed
    torch.manual_seed(123)  # the global RNGs play no part
    assert ud.epoch_shard(n, seed, epoch, 1, 2) == ud.epoch_shard(n, seed, epoch, 1, 2)
    assert ud.epoch_shard(n, seed, epoch + 1, 1, 2) != ud.epoch_shard(n, seed, epoch, 1, 2)
    # with per-rank batches of B / 2, step b's two batches together are the single process's batch b
    single, rank0, rank1 = (ud.epoch_shard(12, seed, epoch, r, w) for r, w in [(0, 1), (0, 2), (1, 2)])
    for b in range(3):
        assert set(single[4 * b: 4 * b + 4]) == set(rank0[2 * b: 2 * b + 2] + rank1[2 * b: 2 * b + 2])
    sampler = ud.EpochSampler(n, seed, rank=1, world_size=2)
    sampler.set_epoch(epoch)
    assert len(sampler) == 6 and list(sampler) == ud.epoch_shard(n, seed, epoch, 1, 2)


def test_world_size_is_resolved_and_checked_before_any_process_starts(data, tmp_path):
    assert ud.resolve_world_size("auto", torch.device("cpu")) == 1
    with pytest.raises(ValueError, match="GPU"):
        ud.resolve_world_size(2, torch.device("cuda"))  # more processes than visible GPUs (none here)
    with pytest.raises(ValueError, match="multiple of 2"):
        _train(data, tmp_path, batch_size=5, world_size=2)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    """One 2-process run (spawn + gloo) accumulating 2 batches per step; ~10 s on 2 cores, most of it
    the workers importing utils."""
    checkpoint_dir = tmp_path_factory.mktemp("ddp")
    model, history, best = _train(data, checkpoint_dir, epochs=2, world_size=2, grad_accum=2)
    return model, history, best, checkpoint_dir


def test_two_process_run_writes_checkpoints_and_leaves_the_best_weights_in_the_model(ddp_run):
    model, history, best, _ = ddp_run
    assert list(history["epoch"]) == [1, 2]
    assert np.isfinite(history[["train_loss", "val_loss", "val_macro_f1"]].to_numpy()).all()
    assert best.is_file() and (best.parent / "last.pt").is_file()
    saved = ud.load_torch_checkpoint(best)["model"]
    assert not any(key.startswith("module.") for key in saved)  # the bare model, loadable as is
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert not torch.equal(saved["heads.coarse.weight"], _tiny_model().state_dict()["heads.coarse.weight"])
    assert json.loads((best.parent / "config.json").read_text())["world_size"] == 2


def _two_rank_reference(data, epochs, grad_accum):
    """What two DDP ranks compute, in one process (the `_train` settings): at every step the mean of
    the two ranks' gradients on their half-batches (DDP's all-reduce), summed over `grad_accum`
    batches, then one clipped AdamW step."""
    (train, val), cpu = data, torch.device("cpu")
    model, train_rows, val_rows = _tiny_model(), ud.dino_items(train), ud.dino_items(val)
    loaders = [ud.dino_loaders(model, train_rows, val_rows, 2, 0, 0.5, 0, cpu, False, rank, 2)[0] for rank in (0, 1)]
    weights = class_weights_from_labels([label for _, label in train_rows])
    optimizer, scheduler = ud.dino_optimizer(model, 1e-2, 1e-3, 0.05, None, 1, epochs,
                                             math.ceil(len(loaders[0]) / grad_accum))
    model.train()
    for epoch in range(epochs):
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        steps = list(zip(*loaders))
        for start in range(0, len(steps), grad_accum):
            group = steps[start:start + grad_accum]
            for rank_batches in group:
                for x, y in rank_batches:
                    (multitask_loss(model(x), y, weights) / 2 / len(group)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    return model


def test_two_process_run_steps_with_the_mean_of_the_ranks_gradients(ddp_run, data):
    _, _, best, _ = ddp_run
    trained = ud.load_torch_checkpoint(best.parent / "last.pt")["model"]
    torch.testing.assert_close(trained, _two_rank_reference(data, epochs=2, grad_accum=2).state_dict())


def test_finished_two_process_run_is_reused_without_spawning(ddp_run, data, monkeypatch):
    model, history, best, checkpoint_dir = ddp_run

    def no_spawn(*args, **kwargs):
        raise AssertionError("worker processes were started")

    monkeypatch.setattr(ud, "_spawn_ranks", no_spawn)
    reused, reused_history, reused_best = _train(data, checkpoint_dir, epochs=2, world_size=2, grad_accum=2)
    assert reused_best == best
    pd.testing.assert_frame_equal(reused_history, history)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reused.state_dict().values()))
    _train(data, checkpoint_dir, epochs=2)  # one process: numerically another run, so its own folder
    assert len(list(checkpoint_dir.iterdir())) == 2


def test_an_error_in_a_worker_process_surfaces_in_the_caller_with_its_cause(data, tmp_path):
    train, val = data
    missing = tmp_path / "missing_image.png"  # passes the caller's checks, fails when a rank decodes it
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="missing_image.png") as failure:
        _train(([*train, (missing, 0)], val), tmp_path, epochs=1, world_size=2)
    assert "FileNotFoundError" in str(failure.value)
