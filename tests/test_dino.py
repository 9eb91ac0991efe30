"""DINOv2 (utils section 6): SurgeNet checkpoint layouts, heads and losses, flip-swap data, fine-tuning
with resume, validation score, inference with flip TTA and caches. CPU only, no downloads: random
tensors in the released file's layout, the tiny random ViT (build_dino("tiny")) and 56x42 PNGs."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import f1_score
from timm.layers import resample_abs_pos_embed
from torchvision import transforms as T

import utils
from utils import (
    COARSE_CLASSES,
    DINO_MODEL_SETS,
    DINO_TASKS,
    FINE_TASKS,
    LABEL_TO_ID,
    LABELS,
    DinoClassifier,
    DinoConfig,
    SquareImages,
    TrainedDino,
    build_dino,
    dino_transform,
    multitask_loss,
    train_dino,
)

SIZE = 42  # the tiny model's input: 3x3 patches of 14 px
WIDTH = int(utils.DINO_TINY_KWARGS["embed_dim"])
EAR_L, EAR_R, NOSE_L, NOSE_R = (LABEL_TO_ID[n] for n in ("ear-left", "ear-right", "nose-left", "nose-right"))
VC_OPEN, VC_CLOSED, THROAT = (LABEL_TO_ID[n] for n in ("vc-open", "vc-closed", "throat"))
# Inference runs under utils.autocast_dtype (bf16 on CPUs with AVX512-BF16/AMX, fp32 elsewhere).
INFER_AMP = utils.autocast_dtype("cpu")
TOL = {"atol": 1e-5, "rtol": 1e-4} if INFER_AMP is None else {"atol": 2e-2, "rtol": 2e-2}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CI box OpenMP threads that
    wait on each other make them much slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the released SurgeNet checkpoint layout ------------------------------------------------------

def released_keys(depth: int) -> set[str]:
    """The key set of DINOv2_ViTb14_size336_SurgeNetXL.pth (ENTREP.md "Weights"): timm names, a
    mask_token, no register tokens, no head."""
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]
    return {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", *(f"blocks.{i}.{k}" for i in range(depth) for k in per_block)}


def released_layout(timm_name: str, width: int, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """A flat dict in the released file's layout (timm's plain DINOv2 at 336 px plus a mask_token),
    every tensor random (so that no tensor can pass as timm's own initialisation)."""
    with torch.device(device):
        source = timm.create_model(timm_name, pretrained=False, img_size=336, num_classes=0).state_dict()
    source["mask_token"] = torch.empty(1, width, device=device)
    if device == "meta":
        return source
    g = torch.Generator().manual_seed(seed)
    return {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in source.items()}


@pytest.fixture(scope="module")
def vits_state():
    """ViT-S width, the released ViT-B's structure: 12 blocks, (1, 577, 384) pos_embed, mask_token."""
    return released_layout("vit_small_patch14_dinov2", 384)


def _saved(path: Path, obj):
    torch.save(obj, path)
    yield path
    path.unlink()  # ~90 MB each: not left behind in pytest's temp folders


@pytest.fixture(scope="module")
def plain_file(vits_state, tmp_path_factory):
    yield from _saved(tmp_path_factory.mktemp("surgenet") / "DINOv2_ViTs14_size336_SurgeNetXL.pth", vits_state)


@pytest.fixture(scope="module")
def teacher_file(vits_state, tmp_path_factory):
    """DINOv2 training's own format: {"teacher": {"backbone.*": ..., "dino_head.*": ...}}."""
    g = torch.Generator().manual_seed(1)
    wrapped = {"teacher": {**{f"backbone.{k}": v for k, v in vits_state.items()},
                           "dino_head.mlp.0.weight": torch.randn(64, 384, generator=g),
                           "dino_head.last_layer.weight": torch.randn(128, 64, generator=g)}}
    yield from _saved(tmp_path_factory.mktemp("teacher") / "teacher_checkpoint.pth", wrapped)


@pytest.fixture(scope="module")
def reg4_state():
    """The original DINOv2 format with 4 registers: register_tokens (1, 4, D), mask_token, and a
    pos_embed that keeps the CLS position (1, 1 + 24 * 24, D)."""
    state = released_layout("vit_small_patch14_dinov2", 384, seed=2)
    g = torch.Generator().manual_seed(3)
    state["register_tokens"] = torch.randn(1, 4, 384, generator=g)
    return state


@pytest.fixture(scope="module")
def reg4_file(reg4_state, tmp_path_factory):
    yield from _saved(tmp_path_factory.mktemp("reg4") / "dinov2_vits14_reg4_pretrain.pth", reg4_state)


def test_vitb_fixture_has_the_released_files_keys_shapes_and_size():
    state = released_layout("vit_base_patch14_dinov2", 768, device="meta")  # shapes only, no memory
    assert set(state) == released_keys(12) and len(state) == 175
    assert sum(v.numel() for v in state.values()) == 85_971_456
    shapes = {"pos_embed": (1, 577, 768), "mask_token": (1, 768), "cls_token": (1, 1, 768),
              "patch_embed.proj.weight": (768, 3, 14, 14), "blocks.11.ls1.gamma": (768,),
              "blocks.0.mlp.fc1.weight": (3072, 768), "blocks.0.attn.qkv.weight": (2304, 768)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    arch = utils.dino_arch(state)
    assert (arch.name, arch.width, arch.depth, arch.registers, arch.grid) == ("vit_base_patch14_dinov2", 768, 12, 0, 24)
    assert "no register tokens" in str(arch) and "336 px" in str(arch)


def test_vits_fixture_is_the_released_structure(vits_state):
    assert set(vits_state) == released_keys(12) and len(vits_state) == 175
    assert tuple(vits_state["pos_embed"].shape) == (1, 577, 384) and tuple(vits_state["mask_token"].shape) == (1, 384)
    assert all(v.dtype == torch.float32 for v in vits_state.values())
    arch = utils.dino_arch(vits_state)
    assert (arch.name, arch.depth, arch.registers, arch.grid) == ("vit_small_patch14_dinov2", 12, 0, 24)


@pytest.mark.parametrize("fmt", ["plain", "teacher"])
@pytest.mark.parametrize("image_size", [336, 224])
def test_released_layout_loads_as_a_copy_and_resamples_only_pos_embed(fmt, image_size, vits_state, request):
    path = request.getfixturevalue(f"{fmt}_file")
    model = build_dino("auto", path, image_size)
    assert model.num_features == 384 and model.reg_token is None and len(model.blocks) == 12
    loaded = model.state_dict()
    assert set(loaded) == set(vits_state) - {"mask_token"}  # the head-less backbone, nothing left over
    for key, value in loaded.items():
        if key != "pos_embed" or image_size == 336:
            assert torch.equal(value, vits_state[key]), key  # bit-equal: a load is a copy
    if image_size == 224:
        pos = loaded["pos_embed"]
        assert tuple(pos.shape) == (1, 1 + 16 * 16, 384)
        assert torch.equal(pos[:, 0], vits_state["pos_embed"][:, 0])  # the CLS position is kept as is
        expected = resample_abs_pos_embed(vits_state["pos_embed"], new_size=(16, 16), old_size=(24, 24),
                                          num_prefix_tokens=1)
        torch.testing.assert_close(pos, expected)
        with torch.inference_mode():
            out = model.eval()(torch.randn(1, 3, 224, 224))
        assert tuple(out.shape) == (1, 384) and torch.isfinite(out).all()


@pytest.mark.parametrize("image_size", [336, 224])
def test_reg4_original_format_goes_through_timms_conversion(image_size, reg4_state, reg4_file):
    model = build_dino("auto", reg4_file, image_size)
    assert tuple(model.reg_token.shape) == (1, 4, 384)
    loaded, file = model.state_dict(), reg4_state
    assert torch.equal(loaded["reg_token"], file["register_tokens"])
    assert torch.equal(loaded["cls_token"], file["cls_token"] + file["pos_embed"][:, 0])
    if image_size == 336:
        assert torch.equal(loaded["pos_embed"], file["pos_embed"][:, 1:])
    else:
        torch.testing.assert_close(loaded["pos_embed"], resample_abs_pos_embed(
            file["pos_embed"][:, 1:], new_size=(16, 16), old_size=(24, 24), num_prefix_tokens=0))
    for key in set(loaded) - {"reg_token", "cls_token", "pos_embed"}:
        assert torch.equal(loaded[key], file[key]), key


def test_a_named_model_the_file_fills_is_accepted(plain_file, vits_state):
    for name in ("vit_small_patch14_dinov2", "vit_small_patch14_dinov2.lvd142m"):
        model = build_dino(name, plain_file, 336)
        assert torch.equal(model.blocks[5].mlp.fc1.weight, vits_state["blocks.5.mlp.fc1.weight"])


@pytest.mark.parametrize("dino_model", ["vit_base_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_a_named_model_the_file_cannot_fill_is_refused_with_the_name_to_use(dino_model, plain_file):
    with pytest.raises(ValueError) as err:
        build_dino(dino_model, plain_file, 336)
    msg = str(err.value)
    assert str(plain_file) in msg and dino_model in msg  # which file, which setting
    assert "width 384" in msg and "no register tokens" in msg  # what it holds
    assert "'auto'" in msg and "'vit_small_patch14_dinov2'" in msg  # what to set instead


def test_files_that_are_not_dinov2_backbones_fail_loudly(tmp_path, vits_state, monkeypatch):
    resnet = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)}, resnet)
    with pytest.raises(ValueError, match="not a DINOv2 ViT backbone") as err:
        build_dino("auto", resnet, 336)
    assert str(resnet) in str(err.value)
    with pytest.raises(FileNotFoundError, match="SurgeNetXL"):
        build_dino("auto", tmp_path / "absent.pth", 336)
    # a ViT-S width with 6 blocks, or 2 registers, is no timm DINOv2 model
    six = {k: v for k, v in vits_state.items() if not k.startswith(tuple(f"blocks.{i}." for i in range(6, 12)))}
    with pytest.raises(ValueError, match="match no timm DINOv2"):
        utils.dino_arch(six, "six.pth")
    with pytest.raises(ValueError, match="match no timm DINOv2"):
        utils.dino_arch({**vits_state, "register_tokens": torch.zeros(1, 2, 384)})
    # a DINOv2 file with a tensor missing or of the wrong shape: no silent partial load
    fake_file = tmp_path / "damaged.pth"
    fake_file.touch()
    no_norm = {k: v for k, v in vits_state.items() if k != "norm.weight"}
    monkeypatch.setattr(utils, "read_checkpoint", lambda source: dict(no_norm))
    with pytest.raises(ValueError, match=r"(?s)does not fit.*norm\.weight"):
        build_dino("auto", fake_file, 336)
    wrong = {**vits_state, "blocks.3.mlp.fc1.bias": torch.zeros(100)}
    monkeypatch.setattr(utils, "read_checkpoint", lambda source: dict(wrong))
    with pytest.raises(ValueError, match=r"(?s)does not fit.*blocks\.3\.mlp\.fc1\.bias"):
        build_dino("auto", fake_file, 336)


def test_timm_weights_offline_say_what_to_attach_and_random_builds_a_random_model(monkeypatch):
    calls, real_create = [], timm.create_model

    def offline_create(name, pretrained=False, **kw):
        calls.append((name, pretrained))
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real_create("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0,
                           **utils.DINO_TINY_KWARGS)

    monkeypatch.setattr(utils.timm, "create_model", offline_create)
    with pytest.raises(RuntimeError) as err:
        build_dino("auto", "", 336)
    assert "DINOv2_ViTb14_size336_SurgeNetXL.pth" in str(err.value) and "dino_weights" in str(err.value)
    assert calls == [("vit_base_patch14_dinov2", True)]  # "auto" without a file: the paper's ViT-B/14
    calls.clear()
    build_dino("auto", "random", 336)
    assert calls == [("vit_base_patch14_dinov2", False)]  # random: nothing is downloaded
    monkeypatch.setattr(utils.timm, "create_model", real_create)
    model = build_dino("vit_small_patch14_dinov2", "random", 56)
    again = build_dino("vit_small_patch14_dinov2", "random", 56)
    assert model.num_features == 384 and tuple(model.pos_embed.shape) == (1, 17, 384)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, again.blocks[0].attn.qkv.weight)  # random init


# ---- heads and losses ---------------------------------------------------------------------

def _tiny(tasks=tuple(DINO_TASKS), image_size=SIZE) -> DinoClassifier:
    return DinoClassifier(build_dino("tiny", "", image_size), tasks)


def _batch(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), 3, SIZE, SIZE, generator=g), torch.tensor(labels)


def test_tiny_model_is_the_released_structure_at_toy_size():
    backbone = build_dino("tiny", "", 56)
    assert backbone.reg_token is None and backbone.num_features == WIDTH and utils.dino_image_size(backbone) == 56
    assert torch.equal(backbone.pos_embed, build_dino("tiny", "", 56).pos_embed)  # the same model every call


def test_forward_backward_reaches_every_head_and_the_backbone():
    model = _tiny()
    x, y = _batch(list(range(7)))
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"coarse": (7, 4), "ear": (7, 2), "nose": (7, 2), "vc": (7, 2)}
    multitask_loss(out, y, utils.class_weights(y.tolist())).backward()
    for name, head in model.heads.items():
        assert head.weight.grad.abs().sum() > 0, name
    bb = model.backbone
    for name, param in [("patch_embed", bb.patch_embed.proj.weight), ("cls_token", bb.cls_token),
                        ("pos_embed", bb.pos_embed), ("block 0", bb.blocks[0].attn.qkv.weight),
                        ("final norm", bb.norm.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_heads_are_seeded_by_init_seed_not_the_global_rng():
    backbone = build_dino("tiny", "", SIZE)
    torch.manual_seed(1)
    a = DinoClassifier(backbone, init_seed=0)
    torch.manual_seed(2)
    b, c = DinoClassifier(backbone, init_seed=0), DinoClassifier(backbone, init_seed=1)
    assert all(torch.equal(a.heads[t].weight, b.heads[t].weight) for t in DINO_TASKS)
    assert not torch.equal(a.heads["coarse"].weight, c.heads["coarse"].weight)
    assert all(torch.count_nonzero(a.heads[t].bias) == 0 for t in DINO_TASKS)


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
    coarse, fine = utils.region_targets(torch.tensor([EAR_L, EAR_R, NOSE_R, VC_CLOSED, THROAT]))
    assert coarse.tolist() == [0, 0, 1, 2, 3]
    assert {t: (m.tolist(), target.tolist()) for t, (m, target) in fine.items()} == {
        "ear": ([True, True, False, False, False], [0, 1, -1, -1, -1]),
        "nose": ([False, False, True, False, False], [-1, -1, 1, -1, -1]),
        "vc": ([False, False, False, True, False], [-1, -1, -1, 1, -1])}
    assert utils.task_images(("ear",), []).shape == (0,)


def test_inference_over_no_images_gives_empty_outputs():
    model = _tiny()
    ds = SquareImages([], None, dino_transform(model, SIZE, False), SIZE)
    assert len(ds) == 0 and ds.images.shape == (0, 3, SIZE, SIZE) and ds.images.dtype == torch.uint8
    outputs, labels = utils.collect_logits(model, utils._loader(ds, 4, 0, CPU), CPU, None)
    assert outputs == {} and labels.dtype == torch.long and labels.shape == (0,)


def test_targets_and_inference_stay_on_the_device_of_their_inputs():
    """On a GPU the labels and the model live on cuda: the targets must be built there and each batch
    moved there. PyTorch's meta device (shapes without data) stands in for a second device on a CPU."""
    meta = torch.device("meta")
    coarse, fine = utils.region_targets(torch.tensor([EAR_L, NOSE_R, THROAT], device=meta))
    assert coarse.device == meta and all(m.device == t.device == meta for m, t in fine.values())

    class Recorder(torch.nn.Module):  # the device each batch reaches the model on; CPU logits back
        def __init__(self):
            super().__init__()
            self.devices = []

        def forward(self, x):
            self.devices.append(x.device)
            return {"coarse": torch.zeros(len(x), 4)}

    model, batches = Recorder(), [(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))] * 2
    outputs, labels = utils.collect_logits(model, batches, meta, None)
    assert model.devices == [meta, meta] and outputs["coarse"].shape == (4, 4) and labels.tolist() == [0, 1, 0, 1]


def test_class_weights_are_balanced_per_head():
    labels = [NOSE_L] * 3 + [NOSE_R] + [THROAT] * 4 + [EAR_L] * 2
    w = utils.class_weights(labels)
    # coarse over 3 present regions of 10 images: ear 2 -> 10/(3*2), nose 4 -> 10/12, throat 4; vc absent -> 1
    torch.testing.assert_close(w["coarse"], torch.tensor([10 / 6, 10 / 12, 1.0, 10 / 12]))
    torch.testing.assert_close(w["nose"], torch.tensor([2 / 3, 2.0]))  # left 3, right 1 of 4 nose images
    torch.testing.assert_close(w["ear"], torch.tensor([1.0, 1.0]))  # only ear-left present: 2/(1*2) and absent 1
    torch.testing.assert_close(w["vc"], torch.ones(2))  # no vc image at all
    assert set(utils.class_weights(labels, ("nose",))) == {"nose"}


def test_task_images_all_for_the_coarse_head_and_the_region_for_a_binary_one():
    labels = [EAR_L, NOSE_R, VC_OPEN, THROAT, EAR_R, VC_CLOSED, NOSE_L]
    assert utils.task_images(("coarse",), labels).all()
    assert utils.task_images(tuple(DINO_TASKS), labels).all()
    assert utils.task_images(("ear",), labels).tolist() == [True, False, False, False, True, False, False]
    assert utils.task_images(("nose",), labels).tolist() == [False, True, False, False, False, False, True]
    assert utils.task_images(("vc",), labels).tolist() == [False, False, True, False, False, True, False]


# ---- images: flip with label swap, seeded items, transforms ---------------------------------------

def _png(path: Path, rng: np.random.Generator, label: int = 0) -> Path:
    """56x42 noise, tinted by label (a frame wider than tall: the centre square is cut out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 200, (42, 56, 3)).astype(np.int64)
    pixels[..., label % 3] += 8 * label
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def _mirror(path: Path, out: Path) -> Path:
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
    return out


TRAIN_LABELS = [i for i in range(7) for _ in range(3)]  # 21 images
VAL_LABELS = [i for i in range(7) for _ in range(2)]  # 14 images


def _frame(paths, labels) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "label_id": labels,
                         "sha1": [utils.file_sha1(p) for p in paths]})


def _make_split(root: Path):
    rng = np.random.default_rng(0)
    train = [_png(root / "train" / f"t{i:02d}.png", rng, y) for i, y in enumerate(TRAIN_LABELS)]
    val = [_png(root / "val" / f"v{i:02d}.png", rng, y) for i, y in enumerate(VAL_LABELS)]
    return _frame(train, TRAIN_LABELS), _frame(val, VAL_LABELS)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return _make_split(tmp_path_factory.mktemp("dino_images"))


def test_flip_label_id_maps_every_label_to_its_partner():
    expected = {"nose-right": "nose-left", "nose-left": "nose-right", "ear-right": "ear-left",
                "ear-left": "ear-right", "vc-open": "vc-open", "vc-closed": "vc-closed", "throat": "throat"}
    assert {LABELS[i]: LABELS[utils.flip_label_id(i)] for i in range(7)} == expected
    assert utils.flip_label_id(-1) == -1


def test_flip_swaps_ear_and_nose_sides_keeps_vc_and_throat_and_mirrors_pixels(split):
    train, _ = split
    paths = train["path"].tolist()[:7]
    labels = list(range(7))
    eval_tf = dino_transform(_tiny(), SIZE, train=False)
    plain = SquareImages(paths, labels, eval_tf, SIZE, flip_p=0.0)
    flipped = SquareImages(paths, labels, eval_tf, SIZE, flip_p=1.0)
    assert [LABELS[flipped[i][1]] for i in range(7)] == [LABELS[utils.flip_label_id(i)] for i in range(7)]
    assert [flipped[i][1] for i in range(7)] == [NOSE_L, NOSE_R, EAR_L, EAR_R, VC_OPEN, VC_CLOSED, THROAT]
    assert [plain[i][1] for i in range(7)] == labels
    for i in range(7):
        assert torch.equal(flipped[i][0], plain[i][0].flip(-1))
        assert not torch.equal(flipped[i][0], plain[i][0])  # noise is not mirror-symmetric
    unlabelled = SquareImages(paths[:2], None, eval_tf, SIZE, flip_p=1.0)
    assert [unlabelled[i][1] for i in range(2)] == [-1, -1]
    with pytest.raises(ValueError, match="one label id per image"):
        SquareImages(paths, labels[:3], eval_tf, SIZE)


def test_square_images_take_the_centre_square_of_the_frame(split):
    path = split[0]["path"].iloc[0]
    square = utils.decode_square(path, 42)  # 56x42 frame -> its centre 42x42, no resampling
    assert tuple(square.shape) == (3, 42, 42) and square.dtype == torch.uint8
    frame = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
    assert torch.equal(square, frame[:, :, 7:49])


def test_seeded_items_are_reproducible_and_leave_the_global_rng_alone(split):
    train, _ = split
    tf = dino_transform(_tiny(), SIZE, train=True)
    ds = SquareImages(train["path"].tolist(), train["label_id"].tolist(), tf, 49, flip_p=0.5)
    state = torch.get_rng_state()
    a, b, c = ds[(3, 123)], ds[(3, 123)], ds[(3, 124)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])
    flips = {ds[(EAR_L * 3, s)][1] for s in range(12)}  # an ear-left image, flipped about half of the time
    assert flips == {EAR_L, EAR_R}
    sampler = utils.EpochSampler(len(ds), seed=0)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(len(ds)))
    sampler.set_epoch(1)
    assert list(sampler) != first
    torch.manual_seed(99)  # the global RNG plays no part
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_every_item_of_an_epoch_gets_its_own_augmentation_seed():
    pairs = list(utils.EpochSampler(500, seed=0))
    assert sorted(i for i, _ in pairs) == list(range(500))
    assert len({s for _, s in pairs}) == 500  # no two items share their flip and crop


def test_items_are_not_flipped_by_default_and_a_seed_drives_the_transform_alone(split):
    train, _ = split
    paths, labels = train["path"].tolist()[:7], list(range(7))
    tf = dino_transform(_tiny(), SIZE, train=True)
    assert [SquareImages(paths, labels, tf, SIZE)[i][1] for i in range(7)] == labels  # flip_p 0 by default
    ds = SquareImages(paths, labels, tf, SIZE, flip_p=0.0)
    with utils.seeded_rng(5):  # no flip drawn: the seed's first draws go to the transform
        expected = tf(Image.fromarray(ds.images[2].permute(1, 2, 0).numpy()))
    assert torch.equal(ds[(2, 5)][0], expected)
    head = DinoClassifier(_tiny().backbone, ("coarse",)).heads["coarse"].weight
    assert torch.equal(head, DinoClassifier(_tiny().backbone, ("coarse",), init_seed=0).heads["coarse"].weight)


def test_dino_transform_takes_mean_and_std_from_the_model_and_never_flips():
    model = _tiny()
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    model.backbone.pretrained_cfg = {**model.backbone.pretrained_cfg, "mean": mean, "std": std}
    for train in (True, False):
        tf = dino_transform(model, SIZE, train=train)
        text = repr(tf)
        assert "Flip" not in text  # flips come with the label swap, in SquareImages
        norms = [t for t in (tf.transforms[-1].transforms if train else tf.transforms) if type(t).__name__ == "Normalize"]
        assert len(norms) == 1 and np.allclose(norms[0].mean, mean) and np.allclose(norms[0].std, std)
        x = tf(Image.new("RGB", (SIZE, SIZE), (255, 0, 0)))
        assert tuple(x.shape) == (3, SIZE, SIZE)
    assert "RandomRotation" in repr(dino_transform(model, SIZE, True))
    x = dino_transform(model, SIZE, train=False)(Image.new("RGB", (SIZE, SIZE), (255, 0, 0)))
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([(1 - 0.1) / 0.4, -0.2 / 0.5, -0.3 / 0.6]))


def test_training_augmentation_is_the_documented_one():
    """DINO_TRAIN_AUGMENT: +-15 deg bilinear rotation on black, a crop keeping 70-100% of the square at aspect
    3/4-4/3, colour jitter 0.2, no flip (SquareImages flips with the label swap); evaluation: none of it."""
    model = _tiny()
    rotate, timm_tf = dino_transform(model, SIZE, train=True).transforms
    assert type(rotate).__name__ == "RandomRotation" and list(rotate.degrees) == [-15.0, 15.0]
    assert rotate.interpolation == T.InterpolationMode.BILINEAR and rotate.fill == 0
    by_type = {type(t).__name__: t for t in timm_tf.transforms}
    crop = next(t for name, t in by_type.items() if "ResizedCrop" in name)
    assert tuple(crop.scale) == (0.7, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
    jitter = by_type["ColorJitter"]
    assert [tuple(getattr(jitter, k)) for k in ("brightness", "contrast", "saturation")] == [(0.8, 1.2)] * 3
    assert not any("Flip" in name for name in by_type)
    eval_names = [type(t).__name__ for t in dino_transform(model, SIZE, train=False).transforms]
    assert not any("Random" in name or "Jitter" in name for name in eval_names)


# ---- fine-tuning ----------------------------------------------------------------------------

CFG = DinoConfig(epochs=3, batch_size=8, lr_head=1e-2, lr_backbone=1e-3, warmup_epochs=1, patience=None,
                 amp="fp32", seed=0)
CPU = torch.device("cpu")


def _train(split, checkpoint_dir, tasks=tuple(DINO_TASKS), name="dino", num_workers=0, progress=False,
           drop_path=0.0, **cfg):
    train, val = split
    cfg = DinoConfig(**{**CFG.__dict__, **cfg})
    model = _tiny(tasks) if not drop_path else DinoClassifier(_stochastic_depth_backbone(drop_path), tasks)
    return train_dino(model, train, val, cfg, checkpoint_dir=checkpoint_dir, device=CPU, name=name,
                      num_workers=num_workers, progress=progress)


def _stochastic_depth_backbone(drop_path: float) -> torch.nn.Module:
    """The tiny ViT with stochastic depth: training then draws from the global RNG."""
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=SIZE, num_classes=0,
                             drop_path_rate=drop_path, **utils.DINO_TINY_KWARGS)


def _same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    a, b = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def full_run(split, tmp_path_factory):
    """An uninterrupted 3-epoch run: the reference for resumed and redone runs."""
    return _train(split, tmp_path_factory.mktemp("full"))


def _history(h: pd.DataFrame) -> pd.DataFrame:
    return h.drop(columns="seconds")


def test_a_run_writes_its_checkpoints_and_leaves_the_best_weights_in_the_model(full_run):
    trained = full_run
    run_dir = trained.best_path.parent
    assert run_dir.name.startswith("dino_") and {p.name for p in run_dir.iterdir()} == {"last.pt", "best.pt", "config.json"}
    assert trained.weights_id == utils.file_sha1(trained.best_path)
    assert list(trained.history.columns) == ["epoch", "train_loss", "val_loss", "val_score", "lr_heads", "seconds"]
    assert list(trained.history["epoch"]) == [1, 2, 3]
    assert np.isfinite(trained.history[["train_loss", "val_loss", "val_score"]].to_numpy()).all()
    best = torch.load(trained.best_path, weights_only=True)
    assert best["epoch"] == trained.history["epoch"][trained.history["val_score"].idxmax()]
    _same_weights(trained.model, best["model"])
    assert not torch.equal(best["model"]["heads.coarse.weight"], _tiny().state_dict()["heads.coarse.weight"])
    assert trained.history["lr_heads"].iloc[-1] < trained.history["lr_heads"].max()  # cosine decays


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(split, full_run, tmp_path, monkeypatch, capsys,
                                                               drop_path):
    """Data order and augmentation come from (seed, epoch); stochastic depth from the global RNG, whose
    state last.pt keeps."""
    if drop_path:
        full_run = _train(split, tmp_path / "full", drop_path=drop_path)
    tmp_path = tmp_path / "interrupted"
    real_save = utils.atomic_save

    def crash_after_first_epoch(obj, path):
        real_save(obj, path)
        if path.name == "last.pt":
            raise KeyboardInterrupt("simulated crash after epoch 1")

    monkeypatch.setattr(utils, "atomic_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(split, tmp_path, drop_path=drop_path)
    monkeypatch.setattr(utils, "atomic_save", real_save)
    (run_dir,) = tmp_path.iterdir()
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    capsys.readouterr()
    resumed = _train(split, tmp_path, drop_path=drop_path)
    assert "resuming" in capsys.readouterr().out
    assert resumed.best_path.parent == run_dir and run_dir.name == full_run.best_path.parent.name
    _same_weights(full_run.model, resumed.model)  # the same computation on the same batches: exact
    _same_weights(torch.load(full_run.best_path.parent / "last.pt", weights_only=True)["model"],
                  torch.load(run_dir / "last.pt", weights_only=True)["model"])
    pd.testing.assert_frame_equal(_history(full_run.history), _history(resumed.history))


def test_finished_run_is_reused_and_a_changed_config_trains_afresh(split, tmp_path, monkeypatch, capsys):
    first = _train(split, tmp_path, epochs=2)
    real_epoch = utils._train_epoch

    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(utils, "_train_epoch", no_training)
    capsys.readouterr()
    reused = _train(split, tmp_path, epochs=2)
    assert "reusing finished run" in capsys.readouterr().out
    assert reused.best_path == first.best_path and reused.weights_id == first.weights_id
    pd.testing.assert_frame_equal(reused.history, first.history)
    _same_weights(first.model, reused.model)
    with pytest.raises(AssertionError, match="a training step ran"):
        _train(split, tmp_path, epochs=2, lr_head=5e-3)
    monkeypatch.setattr(utils, "_train_epoch", real_epoch)
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
    copy = tmp_path / "copy"
    shutil.copytree(Path(train["path"][0]).parent, copy / "train")
    moved = train.assign(path=[str(copy / "train" / Path(p).name) for p in train["path"]])
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
    assert torch.load(trained.best_path, weights_only=True)["epoch"] == 1
    assert torch.load(trained.best_path.parent / "last.pt", weights_only=True)["finished"]
    final = capsys.readouterr().err.replace("\n", "\r").strip("\r").split("\r")[-1]
    assert "100%" in final and "2/2" in final, final


def test_progress_bar_is_complete_after_an_early_stop(split, tmp_path, monkeypatch):
    bars = []

    class RecordingBar(utils.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(utils, "tqdm", RecordingBar)
    _train(split, tmp_path, epochs=4, patience=1, lr_head=0.0, lr_backbone=0.0, progress=True)
    assert bars and set(bars) == {(2, 2)}  # (tqdm may close a bar twice)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(split, tmp_path, amp):
    model = _tiny()
    dtype = utils.resolve_amp(amp, CPU)
    with utils.autocast(CPU, dtype):
        assert model(_batch([0, 1])[0])["coarse"].dtype == dtype
    before = model.heads["coarse"].weight.detach().clone()
    train, val = split
    cfg = DinoConfig(**{**CFG.__dict__, "amp": amp, "grad_accum": 2})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trained = train_dino(model, train, val, cfg, checkpoint_dir=tmp_path, device=CPU, progress=False)
    assert not [str(w.message) for w in record if "lr_scheduler" in str(w.message)]  # no step before optimizer.step
    assert np.isfinite(trained.history[["train_loss", "val_loss"]].to_numpy()).all()
    last = torch.load(trained.best_path.parent / "last.pt", weights_only=True)
    assert not torch.equal(before, last["model"]["heads.coarse.weight"])  # the weights moved
    assert bool(last["scaler"]) == (dtype == torch.float16)  # fp16 runs with a GradScaler
    # the schedule advanced once per optimizer step taken: 21 images, batch 8 -> 3 batches, 2 steps an epoch
    skipped = round(np.log2(65536.0 / last["scaler"]["scale"])) if dtype == torch.float16 else 0
    assert last["scheduler"]["last_epoch"] == 3 * 2 - skipped
    assert str(dtype) in (trained.best_path.parent / "config.json").read_text()


def test_worker_count_does_not_change_the_result(split, tmp_path):
    in_process = _train(split, tmp_path / "w0", epochs=1)
    two_workers = _train(split, tmp_path / "w2", epochs=1, num_workers=2)
    _same_weights(in_process.model, two_workers.model)


@pytest.mark.parametrize("damaged", ["last.pt", "best.pt"])
def test_a_truncated_checkpoint_is_reported_and_the_run_redone(split, tmp_path, damaged):
    run = _train(split, tmp_path, epochs=1)  # a finished 1-epoch run...
    path = run.best_path.parent / damaged
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # ...one of whose files a crash (or a full disk) cut short
    with pytest.warns(UserWarning, match="cannot be loaded"):
        redone = _train(split, tmp_path, epochs=1)
    assert len(redone.history) == 1 and redone.best_path == run.best_path  # trained again, not reused
    _same_weights(run.model, redone.model)
    assert torch.load(path, weights_only=True)["epoch"] == 1  # a whole file again


def test_separate_models_train_on_their_own_images_in_their_own_folders(split, tmp_path):
    train, val = split
    folders = {}
    for name, tasks in DINO_MODEL_SETS["separate"].items():
        trained = _train(split, tmp_path, tasks=tasks, name=name, epochs=1)
        assert trained.model.tasks == tasks and set(trained.model.heads) == set(tasks)
        config = json.loads((trained.best_path.parent / "config.json").read_text())
        mine = utils.task_images(tasks, train["label_id"])
        assert config["train"] == [[s, int(y)] for s, y in zip(train["sha1"][mine], train["label_id"][mine], strict=True)]
        mine = utils.task_images(tasks, val["label_id"])
        assert [s for s, _ in config["val"]] == val["sha1"][mine].tolist()
        folders[name] = trained.best_path.parent
    assert {f.name.split("_")[0] for f in folders.values()} == set(DINO_TASKS)
    assert len(set(folders.values())) == 4 and all(f.parent == tmp_path for f in folders.values())
    assert len(json.loads((folders["ear"] / "config.json").read_text())["train"]) == 6


def test_no_images_for_a_models_heads_is_a_value_error(split, tmp_path):
    train, val = split
    no_ears = train[~utils.task_images(("ear",), train["label_id"])]
    with pytest.raises(ValueError, match="no training or validation images"):
        _train((no_ears, val), tmp_path, tasks=("ear",))


def test_layer_decay_lowers_the_backbone_lr_by_depth_and_skips_decay_on_norms_and_tokens():
    model = _tiny()
    cfg = DinoConfig(lr_head=1e-3, lr_backbone=1e-4, weight_decay=0.05, layer_decay=0.5)
    groups = utils.param_groups(model, cfg)
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
    plain = {id(p): g["lr"] for g in utils.param_groups(model, DinoConfig(lr_backbone=1e-4)) for p in g["params"]}
    assert plain[id(bb.patch_embed.proj.weight)] == 1e-4


def test_warmup_cosine_schedule():
    f = [utils.warmup_cosine(s, warmup_steps=2, total_steps=6) for s in range(6)]
    assert f[:3] == [0.5, 1.0, 1.0] and np.isclose(f[4], 0.5) and f[5] < f[4]


def test_param_groups_without_layer_decay_name_their_part_and_skip_decay_on_norms_and_tokens():
    model = _tiny()
    groups = utils.param_groups(model, DinoConfig(lr_head=1e-3, lr_backbone=1e-4, weight_decay=0.07))
    assert {g["name"] for g in groups} == {"backbone", "heads"}
    of = {id(p): (g["name"], g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    bb = model.backbone
    assert of[id(bb.blocks[0].attn.qkv.weight)] == ("backbone", 1e-4, 0.07)
    assert of[id(bb.cls_token)] == of[id(bb.pos_embed)] == of[id(bb.norm.weight)] == ("backbone", 1e-4, 0.0)
    assert of[id(model.heads["coarse"].weight)] == ("heads", 1e-3, 0.07)
    layered = utils.param_groups(model, DinoConfig(weight_decay=0.07, layer_decay=0.5))
    assert {g["weight_decay"] for g in layered if g["name"] == "backbone"} == {0.0, 0.07}


def test_param_groups_accept_a_backbone_without_a_no_weight_decay_list():
    backbone = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    backbone.num_features = 6
    groups = utils.param_groups(DinoClassifier(backbone, ("coarse",)), DinoConfig(weight_decay=0.05))
    assert sum(len(g["params"]) for g in groups) == 4 + 2  # two Linear and one LayerNorm in the backbone, one head


def test_warmup_cosine_ends_at_zero_and_stays_there():
    assert utils.warmup_cosine(3, warmup_steps=3, total_steps=4) == 1.0
    assert utils.warmup_cosine(4, warmup_steps=3, total_steps=4) == pytest.approx(0.0, abs=1e-12)  # one decay step
    assert [utils.warmup_cosine(s, 2, 6) for s in (6, 7, 9)] == pytest.approx([0.0] * 3, abs=1e-12)  # past the end


def test_class_weights_of_no_labels_are_ones():
    assert {t: w.tolist() for t, w in utils.class_weights([]).items()} == {t: [1.0] * n for t, n in DINO_TASKS.items()}


# ---- the validation score --------------------------------------------------------------------

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
    assert utils.dino_val_score(probs, y) == pytest.approx(expected)
    # a perfect model scores 1
    perfect = {"coarse": np.eye(4)[np.asarray(utils.LABEL_ID_TO_COARSE_ID)[y]],
               **{t: (y == LABEL_TO_ID[FINE_TASKS[t][1]]).astype(float) for t in FINE_TASKS}}
    assert utils.dino_val_score(perfect, y) == 1.0


def test_val_score_of_a_coarse_only_model_is_region_macro_f1():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 30)
    coarse = rng.dirichlet(np.ones(4), 30)
    expected = f1_score(np.asarray(utils.LABEL_ID_TO_COARSE_ID)[y], coarse.argmax(1), average="macro")
    assert utils.dino_val_score({"coarse": coarse}, y) == pytest.approx(expected)


@pytest.mark.parametrize("task", list(FINE_TASKS))
def test_val_score_of_a_binary_model_is_its_macro_f1_on_its_regions_images(task):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 7, 50)
    p = rng.random(50)
    mine = np.isin(y, [LABEL_TO_ID[n] for n in FINE_TASKS[task]])
    p[np.flatnonzero(mine)[:3]] = 0.5  # exactly 0.5 picks the first label
    truth = (y[mine] == LABEL_TO_ID[FINE_TASKS[task][1]]).astype(int)
    expected = f1_score(truth, (p[mine] > 0.5).astype(int), average="macro")
    assert utils.dino_val_score({task: p}, y) == pytest.approx(expected)
    p_outside = p.copy()
    p_outside[~mine] = 1 - p_outside[~mine]  # other regions' images do not count
    assert utils.dino_val_score({task: p_outside}, y) == pytest.approx(expected)


# ---- inference ------------------------------------------------------------------------------

def _trained(tasks=tuple(DINO_TASKS), weights_id="ckpt-a") -> TrainedDino:
    """A random tiny model with decisive heads (p far from 0.5), as predict_dino receives it."""
    model = _tiny(tasks)
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.mul_(20.0)
    return TrainedDino(model, Path("never-read") / "best.pt", pd.DataFrame(), weights_id)


def _reference_probs(model: DinoClassifier, paths) -> dict[str, np.ndarray]:
    """Head probabilities computed here, in one batch, at the precision predict_dino uses."""
    ds = SquareImages(paths, None, dino_transform(model, SIZE, False), SIZE)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.inference_mode(), utils.autocast(CPU, INFER_AMP):
        logits = model.eval()(x)
    return {t: v.float().softmax(-1).numpy() for t, v in logits.items()}


@pytest.fixture(scope="module")
def images(split, tmp_path_factory):
    """Five images, their mirrors, and a mirror-symmetric image."""
    folder = tmp_path_factory.mktemp("mirrors")
    paths = split[0]["path"].tolist()[:5]
    mirrored = [str(_mirror(Path(p), folder / f"m_{Path(p).name}")) for p in paths]
    pixels = np.array(Image.open(paths[0]))
    pixels[:, 28:] = pixels[:, :28][:, ::-1]
    Image.fromarray(pixels).save(folder / "symmetric.png")
    return paths, mirrored, str(folder / "symmetric.png")


def test_predictions_are_head_probabilities_of_the_second_label(images):
    paths = images[0]
    trained = _trained()
    p = utils.predict_dino([trained], paths, CPU, tta_flip=False, batch_size=8)
    assert set(p) == set(DINO_TASKS)
    assert p["coarse"].shape == (5, 4) and all(p[t].shape == (5,) for t in FINE_TASKS)
    np.testing.assert_allclose(p["coarse"].sum(1), 1.0, atol=1e-5)
    ref = _reference_probs(trained.model, paths)
    np.testing.assert_allclose(p["coarse"], ref["coarse"], **TOL)
    for t in FINE_TASKS:  # p(FINE_TASKS[t][1]): ear-right, nose-right, vc-closed
        np.testing.assert_allclose(p[t], ref[t][:, 1], **TOL)
        assert not np.allclose(p[t], ref[t][:, 0], atol=0.05)  # decisive heads tell the two apart


def test_flip_tta_is_consistent_with_mirrored_images(images):
    paths, mirrored, _ = images
    trained = _trained()
    p = utils.predict_dino([trained], paths, CPU, tta_flip=True)
    pm = utils.predict_dino([trained], mirrored, CPU, tta_flip=True)
    np.testing.assert_allclose(p["coarse"], pm["coarse"], **TOL)
    np.testing.assert_allclose(p["ear"], 1 - pm["ear"], **TOL)  # p(ear-right | x) = p(ear-left | mirror x)
    np.testing.assert_allclose(p["nose"], 1 - pm["nose"], **TOL)
    np.testing.assert_allclose(p["vc"], pm["vc"], **TOL)  # the vocal-cord state does not change in a mirror
    plain = utils.predict_dino([trained], paths, CPU, tta_flip=False)
    assert not np.allclose(plain["ear"], p["ear"], atol=0.01)  # TTA does something on a random model
    # by hand: the mean of the image's and its mirror's reading
    ref, ref_m = _reference_probs(trained.model, paths), _reference_probs(trained.model, mirrored)
    np.testing.assert_allclose(p["ear"], (ref["ear"][:, 1] + ref_m["ear"][:, 0]) / 2, **TOL)
    np.testing.assert_allclose(p["vc"], (ref["vc"][:, 1] + ref_m["vc"][:, 1]) / 2, **TOL)


def test_a_flip_symmetric_prediction_is_unchanged_by_tta(images):
    probs = {"coarse": np.array([[0.1, 0.2, 0.3, 0.4]]), "ear": np.array([0.8]), "nose": np.array([0.3]),
             "vc": np.array([0.6])}
    mirror = {"coarse": probs["coarse"], "ear": np.array([0.2]), "nose": np.array([0.7]), "vc": np.array([0.6])}
    out = utils.flip_tta_probs(probs, mirror)
    assert all(np.allclose(out[k], probs[k]) for k in probs)
    # a mirror-symmetric image: region and vc state as without TTA, and no side information at all
    trained = _trained()
    symmetric = images[2]
    with_tta = utils.predict_dino([trained], [symmetric], CPU, tta_flip=True)
    without = utils.predict_dino([trained], [symmetric], CPU, tta_flip=False)
    np.testing.assert_allclose(with_tta["coarse"], without["coarse"], **TOL)
    np.testing.assert_allclose(with_tta["vc"], without["vc"], **TOL)
    np.testing.assert_allclose(with_tta["ear"], [0.5], **TOL)
    np.testing.assert_allclose(with_tta["nose"], [0.5], **TOL)


def test_features_are_unit_backbone_embeddings_and_side_blind_with_tta(images):
    paths, mirrored, _ = images
    trained = _trained()
    feats = utils.dino_features(trained, paths, CPU)
    assert feats.shape == (5, WIDTH) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    ds = SquareImages(paths, None, dino_transform(trained.model, SIZE, False), SIZE)
    with torch.inference_mode(), utils.autocast(CPU, INFER_AMP):
        ref = trained.model.backbone.eval()(torch.stack([ds[i][0] for i in range(5)])).float()
    torch.testing.assert_close(feats, F.normalize(ref, dim=-1), **TOL)
    tta, tta_mirrored = (utils.dino_features(trained, p, CPU, tta_flip=True) for p in (paths, mirrored))
    torch.testing.assert_close(tta, tta_mirrored, **TOL)


def test_predictions_and_features_are_cached_per_image_content_and_checkpoint(images, tmp_path, monkeypatch):
    paths = images[0]
    trained = _trained()
    fresh_p = utils.predict_dino([trained], paths, CPU, tta_flip=True, batch_size=4)
    fresh_f = utils.dino_features(trained, paths, CPU, batch_size=4)
    first_p = utils.predict_dino([trained], paths[:3], CPU, tta_flip=True, batch_size=4, cache_dir=tmp_path)
    first_f = utils.dino_features(trained, paths[:3], CPU, batch_size=4, cache_dir=tmp_path)
    seen, real = [], utils.collect_logits
    monkeypatch.setattr(utils, "collect_logits",
                        lambda m, loader, *a, **k: seen.append(len(loader.dataset)) or real(m, loader, *a, **k))
    p = utils.predict_dino([trained], paths, CPU, tta_flip=True, batch_size=4, cache_dir=tmp_path)
    f = utils.dino_features(trained, paths, CPU, batch_size=4, cache_dir=tmp_path)
    assert seen == [2, 2, 2]  # only the 2 new images: probabilities (mirror and image), then features
    # cached rows came from other batches (3 + 2 instead of 4 + 1): equal within a tolerance
    for k in fresh_p:
        np.testing.assert_allclose(p[k], fresh_p[k], **TOL)
        np.testing.assert_array_equal(p[k][:3], first_p[k])  # read back as stored
    torch.testing.assert_close(f, fresh_f, **TOL)
    assert torch.equal(f[:3], first_f)
    seen.clear()
    again = utils.predict_dino([trained], paths, CPU, tta_flip=True, cache_dir=tmp_path)
    copy = tmp_path / "copy_of_first.png"
    shutil.copy(paths[0], copy)
    utils.predict_dino([trained], [str(copy)], CPU, tta_flip=True, cache_dir=tmp_path)
    assert seen == []  # a rerun, and a copy of a known image under another name: nothing computed
    assert all(np.array_equal(again[k], p[k]) for k in p)
    n_files = len(list(tmp_path.glob("*.safetensors")))
    utils.predict_dino([_trained(weights_id="ckpt-b")], paths, CPU, tta_flip=True, cache_dir=tmp_path)
    assert seen == [5, 5]  # another checkpoint: its own cache
    assert len(list(tmp_path.glob("*.safetensors"))) == n_files + 1
    seen.clear()
    utils.predict_dino([trained], paths, CPU, tta_flip=False, cache_dir=tmp_path)
    assert seen == [5]  # another TTA setting: its own cache too


def test_feature_caches_are_kept_per_checkpoint_apart_from_the_probabilities(images, tmp_path, monkeypatch):
    paths = images[0][:2]
    a, b = _trained(weights_id="ckpt-a"), _trained(weights_id="ckpt-b")  # the same weights, two checkpoints
    utils.dino_features(a, paths, CPU, cache_dir=tmp_path)
    utils.predict_dino([a], paths, CPU, cache_dir=tmp_path)
    assert sorted(p.name.rsplit("_", 1)[0] for p in tmp_path.glob("*.safetensors")) == ["dino_feats", "dino_probs"]
    seen, real = [], utils.collect_logits
    monkeypatch.setattr(utils, "collect_logits",
                        lambda m, loader, *a, **k: seen.append(len(loader.dataset)) or real(m, loader, *a, **k))
    utils.dino_features(a, paths, CPU, cache_dir=tmp_path)
    assert seen == []  # read back
    utils.dino_features(b, paths, CPU, cache_dir=tmp_path)
    assert seen == [2]  # another checkpoint is another cache, whatever its weights look like
    assert len(list(tmp_path.glob("dino_feats_*.safetensors"))) == 2


def test_predictions_flip_by_default_and_run_at_the_devices_autocast_precision(images, monkeypatch):
    paths = images[0][:2]
    trained = _trained()
    default = utils.predict_dino([trained], paths, CPU)
    for k, v in utils.predict_dino([trained], paths, CPU, tta_flip=True).items():
        np.testing.assert_array_equal(default[k], v)  # the same computation: flip TTA is the default
    used, real = [], utils.autocast
    monkeypatch.setattr(utils, "autocast_dtype", lambda device: torch.bfloat16)  # as on a bf16-capable device
    monkeypatch.setattr(utils, "autocast", lambda device, dtype: used.append(dtype) or real(device, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "pin_memory without an accelerator" on a CPU
        utils.predict_dino([trained], paths, CPU, tta_flip=True)
        utils.dino_features(trained, paths, CPU, tta_flip=True)
    assert used == [torch.bfloat16] * 4  # image and mirror, for probabilities and for features


def test_a_cache_without_a_checkpoint_id_is_keyed_by_the_weights_and_the_preprocessing(images, tmp_path, monkeypatch):
    paths = images[0][:2]
    seen, real = [], utils.collect_logits
    monkeypatch.setattr(utils, "collect_logits",
                        lambda m, loader, *a, **k: seen.append(len(loader.dataset)) or real(m, loader, *a, **k))
    a = _trained(weights_id="")
    utils.predict_dino([a], paths, CPU, tta_flip=False, cache_dir=tmp_path)
    utils.predict_dino([a], paths, CPU, tta_flip=False, cache_dir=tmp_path)
    assert seen == [2]  # the weights' fingerprint found the cache
    b = _trained(weights_id="")
    with torch.no_grad():
        b.model.heads["coarse"].bias.add_(1.0)
    utils.predict_dino([b], paths, CPU, tta_flip=False, cache_dir=tmp_path)
    assert seen == [2, 2]  # other weights: computed afresh
    b.model.backbone.pretrained_cfg = {**b.model.backbone.pretrained_cfg, "mean": (0.1, 0.2, 0.3)}
    utils.predict_dino([b], paths, CPU, tta_flip=False, cache_dir=tmp_path)
    assert seen == [2, 2, 2]  # other preprocessing: computed afresh


def test_content_given_by_the_caller_is_the_cache_key(images, tmp_path, monkeypatch):
    paths = images[0]
    trained = _trained()
    content = {p: utils.file_sha1(p) for p in paths}
    utils.predict_dino([trained], paths, CPU, content=content, cache_dir=tmp_path)
    hashed = []
    monkeypatch.setattr(utils, "file_sha1", lambda p: hashed.append(p) or "unused")
    utils.predict_dino([trained], paths, CPU, content=content, cache_dir=tmp_path)
    utils.dino_features(trained, paths, CPU, content=content, cache_dir=tmp_path)
    assert hashed == []  # EntrepData.sha1 given: no file is hashed again


def test_separate_models_merge_their_heads_into_one_dict(images):
    paths = images[0]
    models = [_trained(tasks, weights_id=name) for name, tasks in DINO_MODEL_SETS["separate"].items()]
    merged = utils.predict_dino(models, paths, CPU)
    assert set(merged) == set(DINO_TASKS)
    assert merged["coarse"].shape == (5, 4) and all(merged[t].shape == (5,) for t in FINE_TASKS)
    for trained in models:
        (task,) = trained.model.tasks
        alone = utils.predict_dino([trained], paths, CPU)
        assert set(alone) == {task}
        np.testing.assert_allclose(merged[task], alone[task], **TOL)
    labels = utils.region_then_fine(merged["coarse"].argmax(1), merged)  # the hybrid's input, as is
    assert labels.shape == (5,)


def test_trained_dino_summary_reports_the_first_best_epoch_of_its_history():
    """What metrics.json records: the first epoch of the best validation score (train_dino keeps that
    one: a later equal score is no improvement), its score, the epochs run and where the weights are."""
    history = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "val_score": [0.25, 0.5, 0.75, 0.5, 0.75]})
    trained = TrainedDino(_tiny(("coarse", "ear")), Path("runs") / "dino-1" / "best.pt", history, "id")
    assert trained.summary() == {"tasks": ["coarse", "ear"], "epochs_run": 5, "best_epoch": 3,
                                 "best_val_score_no_tta": 0.75, "checkpoint": str(Path("runs") / "dino-1" / "best.pt")}


# ---- plots ----------------------------------------------------------------------------------

def test_learning_curve_plots_both_panels():
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.0], "val_loss": [2.1, 1.7, 1.6],
                            "val_score": [0.2, 0.45, 0.4], "lr_heads": [1e-3, 5e-4, 0.0]})
    fig = utils.plot_learning_curve(history, title="tiny")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    loss, score = fig.axes
    assert len(loss.lines) == 3 and len(score.lines) == 2  # train, val, best-epoch marker / val score, marker
    np.testing.assert_array_equal(loss.lines[0].get_ydata(), history["train_loss"])
    np.testing.assert_array_equal(score.lines[0].get_ydata(), history["val_score"])
    assert loss.lines[-1].get_xdata()[0] == 2 and score.lines[-1].get_xdata()[0] == 2  # best score at epoch 2
