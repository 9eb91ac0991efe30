"""DINOv2 in utils.py: SurgeNet checkpoint layouts, the classifier's heads, flip-swap data, the evaluation
transform, inference with flip TTA and caches, Trained's summary. (Its fine-tuning, losses and validation
score are training.py's: tests/test_training.py.) CPU only, no downloads: random tensors in the released
file's layout, the tiny random ViT (build_dino("tiny")) and 56x42 PNGs."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import noise_png as _png
from matplotlib.figure import Figure
from PIL import Image
from timm.layers import resample_abs_pos_embed
from torchvision import transforms as T

import plots
import runtime
import training
import utils
from runtime import Runtime
from utils import (
    DINO_MODEL_SETS,
    DINO_TASKS,
    FINE_TASKS,
    LABEL_TO_ID,
    LABELS,
    DinoClassifier,
    SquareImages,
    Trained,
    build_dino,
    dino_transform,
)

SIZE = 42  # the tiny model's input: 3x3 patches of 14 px
WIDTH = int(utils.DINO_TINY_KWARGS["embed_dim"])
EAR_L, EAR_R, NOSE_L, NOSE_R = (LABEL_TO_ID[n] for n in ("ear-left", "ear-right", "nose-left", "nose-right"))
VC_OPEN, VC_CLOSED, THROAT = (LABEL_TO_ID[n] for n in ("vc-open", "vc-closed", "throat"))
CPU = torch.device("cpu")
# Inference runs at the Runtime's precision: here runtime.autocast_dtype's (bf16 on CPUs with AVX512-BF16/AMX,
# fp32 elsewhere), as the notebook's make_runtime sets it.
INFER_AMP = runtime.autocast_dtype("cpu")
TOL = {"atol": 1e-5, "rtol": 1e-4} if INFER_AMP is None else {"atol": 2e-2, "rtol": 2e-2}


def _rt(**kw) -> Runtime:
    """The Runtime inference runs under: the CPU at INFER_AMP, no cache unless given."""
    return Runtime(CPU, INFER_AMP, **{"progress": False, **kw})


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny models, one thread


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


# ---- heads (their losses: test_training.py) ----------------------------------------------------

def _tiny(tasks=tuple(DINO_TASKS), image_size=SIZE) -> DinoClassifier:
    return DinoClassifier(build_dino("tiny", "", image_size), tasks)


def test_tiny_model_is_the_released_structure_at_toy_size():
    backbone = build_dino("tiny", "", 56)
    assert backbone.reg_token is None and backbone.num_features == WIDTH and utils.dino_image_size(backbone) == 56
    assert torch.equal(backbone.pos_embed, build_dino("tiny", "", 56).pos_embed)  # the same model every call


def test_heads_are_seeded_by_init_seed_not_the_global_rng():
    backbone = build_dino("tiny", "", SIZE)
    torch.manual_seed(1)
    a = DinoClassifier(backbone, init_seed=0)
    torch.manual_seed(2)
    b, c = DinoClassifier(backbone, init_seed=0), DinoClassifier(backbone, init_seed=1)
    assert all(torch.equal(a.heads[t].weight, b.heads[t].weight) for t in DINO_TASKS)
    assert not torch.equal(a.heads["coarse"].weight, c.heads["coarse"].weight)
    assert all(torch.count_nonzero(a.heads[t].bias) == 0 for t in DINO_TASKS)


def test_inference_over_no_images_gives_empty_outputs():
    model = _tiny()
    ds = SquareImages([], None, dino_transform(model, SIZE), SIZE)
    assert len(ds) == 0 and ds.images.shape == (0, 3, SIZE, SIZE) and ds.images.dtype == torch.uint8
    outputs, labels = utils.collect_logits(model, utils.make_loader(ds, 4, 0, CPU), CPU, None)
    assert outputs == {} and labels.dtype == torch.long and labels.shape == (0,)


def test_loaders_pin_memory_only_for_a_gpu_and_keep_any_workers_across_epochs():
    """make_loader's two settings (speed only, so no prediction shows them): pinned memory for cuda
    batches, persistent workers whenever there are workers, even one; other keywords pass through."""
    ds = torch.utils.data.TensorDataset(torch.arange(6))
    gpu = utils.make_loader(ds, 2, 2, torch.device("cuda"), shuffle=False)  # built only: no cuda needed
    one, none = utils.make_loader(ds, 3, 1, CPU), utils.make_loader(ds, 3, 0, CPU, drop_last=True)
    assert (gpu.pin_memory, gpu.persistent_workers, gpu.batch_size, gpu.num_workers) == (True, True, 2, 2)
    assert (one.pin_memory, one.persistent_workers, one.num_workers) == (False, True, 1)
    assert (none.pin_memory, none.persistent_workers, none.drop_last) == (False, False, True)


def test_inference_stays_on_the_device_of_its_inputs():
    """On a GPU the model lives on cuda: each batch must be moved there. PyTorch's meta device (shapes
    without data) stands in for a second device on a CPU. (The training targets: test_training.py.)"""
    meta = torch.device("meta")

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


# ---- images: flip with label swap, seeded items, transforms ---------------------------------------

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
    eval_tf = dino_transform(_tiny(), SIZE)
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


def _training_transform(model: DinoClassifier) -> T.Compose:
    """The random transform SquareImages applies in training (training.train_transform, the model's own
    normalisation)."""
    data = utils.dino_data_config(model, SIZE)
    return training.train_transform(SIZE, data["mean"], data["std"], data["interpolation"])


def test_seeded_items_are_reproducible_and_leave_the_global_rng_alone(split):
    train, _ = split
    tf = _training_transform(_tiny())
    ds = SquareImages(train["path"].tolist(), train["label_id"].tolist(), tf, 49, flip_p=0.5)
    state = torch.get_rng_state()
    a, b, c = ds[(3, 123)], ds[(3, 123)], ds[(3, 124)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])
    flips = {ds[(EAR_L * 3, s)][1] for s in range(12)}  # an ear-left image, flipped about half of the time
    assert flips == {EAR_L, EAR_R}
    # (EpochSampler, which draws the seeds: test_training.py)


def test_items_are_not_flipped_by_default_and_a_seed_drives_the_transform_alone(split):
    train, _ = split
    paths, labels = train["path"].tolist()[:7], list(range(7))
    tf = _training_transform(_tiny())
    assert [SquareImages(paths, labels, tf, SIZE)[i][1] for i in range(7)] == labels  # flip_p 0 by default
    ds = SquareImages(paths, labels, tf, SIZE, flip_p=0.0)
    with utils.seeded_rng(5):  # no flip drawn: the seed's first draws go to the transform
        expected = tf(Image.fromarray(ds.images[2].permute(1, 2, 0).numpy()))
    assert torch.equal(ds[(2, 5)][0], expected)
    head = DinoClassifier(_tiny().backbone, ("coarse",)).heads["coarse"].weight
    assert torch.equal(head, DinoClassifier(_tiny().backbone, ("coarse",), init_seed=0).heads["coarse"].weight)


def test_dino_transform_takes_mean_and_std_from_the_model_and_never_flips():
    """The evaluation transform (the training one, with the same normalisation: test_training.py)."""
    model = _tiny()
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    model.backbone.pretrained_cfg = {**model.backbone.pretrained_cfg, "mean": mean, "std": std}
    tf = dino_transform(model, SIZE)
    text = repr(tf)
    assert "Flip" not in text  # flips come with the label swap, in SquareImages
    norms = [t for t in tf.transforms if type(t).__name__ == "Normalize"]
    assert len(norms) == 1 and np.allclose(norms[0].mean, mean) and np.allclose(norms[0].std, std)
    x = tf(Image.new("RGB", (SIZE, SIZE), (255, 0, 0)))
    assert tuple(x.shape) == (3, SIZE, SIZE)
    assert not any("Random" in type(t).__name__ or "Jitter" in type(t).__name__ for t in tf.transforms)
    x = dino_transform(model, SIZE)(Image.new("RGB", (SIZE, SIZE), (255, 0, 0)))
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([(1 - 0.1) / 0.4, -0.2 / 0.5, -0.3 / 0.6]))


def test_dino_data_config_is_timms_config_of_the_backbone_at_the_image_size():
    """What the training transform is built from: timm's config of the backbone (the same for the classifier
    around it) for 3-channel images of image_size."""
    model = _tiny()
    expected = timm.data.resolve_model_data_config(model.backbone, args={"input_size": (3, 56, 56)})
    assert utils.dino_data_config(model, 56) == utils.dino_data_config(model.backbone, 56) == expected
    assert expected["input_size"] == (3, 56, 56)


# ---- inference ------------------------------------------------------------------------------

def _trained(tasks=tuple(DINO_TASKS), weights_id="ckpt-a") -> Trained:
    """A random tiny model with decisive heads (p far from 0.5), as predict_dino receives it."""
    model = _tiny(tasks)
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.mul_(20.0)
    return Trained(model, Path("never-read") / "best.pt", pd.DataFrame(), weights_id)


def _reference_probs(model: DinoClassifier, paths) -> dict[str, np.ndarray]:
    """Head probabilities computed here, in one batch, at the precision predict_dino uses."""
    ds = SquareImages(paths, None, dino_transform(model, SIZE), SIZE)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.inference_mode(), runtime.autocast(CPU, INFER_AMP):
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
    p = utils.predict_dino([trained], paths, _rt(batch_size=8), tta_flip=False)
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
    p = utils.predict_dino([trained], paths, _rt(), tta_flip=True)
    pm = utils.predict_dino([trained], mirrored, _rt(), tta_flip=True)
    np.testing.assert_allclose(p["coarse"], pm["coarse"], **TOL)
    np.testing.assert_allclose(p["ear"], 1 - pm["ear"], **TOL)  # p(ear-right | x) = p(ear-left | mirror x)
    np.testing.assert_allclose(p["nose"], 1 - pm["nose"], **TOL)
    np.testing.assert_allclose(p["vc"], pm["vc"], **TOL)  # the vocal-cord state does not change in a mirror
    plain = utils.predict_dino([trained], paths, _rt(), tta_flip=False)
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
    with_tta = utils.predict_dino([trained], [symmetric], _rt(), tta_flip=True)
    without = utils.predict_dino([trained], [symmetric], _rt(), tta_flip=False)
    np.testing.assert_allclose(with_tta["coarse"], without["coarse"], **TOL)
    np.testing.assert_allclose(with_tta["vc"], without["vc"], **TOL)
    np.testing.assert_allclose(with_tta["ear"], [0.5], **TOL)
    np.testing.assert_allclose(with_tta["nose"], [0.5], **TOL)


def test_features_are_unit_backbone_embeddings_and_side_blind_with_tta(images):
    paths, mirrored, _ = images
    trained = _trained()
    feats = utils.dino_features(trained, paths, _rt())
    assert feats.shape == (5, WIDTH) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    ds = SquareImages(paths, None, dino_transform(trained.model, SIZE), SIZE)
    with torch.inference_mode(), runtime.autocast(CPU, INFER_AMP):
        ref = trained.model.backbone.eval()(torch.stack([ds[i][0] for i in range(5)])).float()
    torch.testing.assert_close(feats, F.normalize(ref, dim=-1), **TOL)
    tta, tta_mirrored = (utils.dino_features(trained, p, _rt(), tta_flip=True) for p in (paths, mirrored))
    torch.testing.assert_close(tta, tta_mirrored, **TOL)


def test_predictions_and_features_are_cached_per_image_content_and_checkpoint(images, tmp_path, monkeypatch):
    paths = images[0]
    trained = _trained()
    fresh_p = utils.predict_dino([trained], paths, _rt(batch_size=4), tta_flip=True)
    fresh_f = utils.dino_features(trained, paths, _rt(batch_size=4))
    first_p = utils.predict_dino([trained], paths[:3], _rt(batch_size=4, cache_dir=tmp_path), tta_flip=True)
    first_f = utils.dino_features(trained, paths[:3], _rt(batch_size=4, cache_dir=tmp_path))
    seen, real = [], utils.collect_logits
    monkeypatch.setattr(utils, "collect_logits",
                        lambda m, loader, *a, **k: seen.append(len(loader.dataset)) or real(m, loader, *a, **k))
    p = utils.predict_dino([trained], paths, _rt(batch_size=4, cache_dir=tmp_path), tta_flip=True)
    f = utils.dino_features(trained, paths, _rt(batch_size=4, cache_dir=tmp_path))
    assert seen == [2, 2, 2]  # only the 2 new images: probabilities (mirror and image), then features
    # cached rows came from other batches (3 + 2 instead of 4 + 1): equal within a tolerance
    for k in fresh_p:
        np.testing.assert_allclose(p[k], fresh_p[k], **TOL)
        np.testing.assert_array_equal(p[k][:3], first_p[k])  # read back as stored
    torch.testing.assert_close(f, fresh_f, **TOL)
    assert torch.equal(f[:3], first_f)
    seen.clear()
    again = utils.predict_dino([trained], paths, _rt(cache_dir=tmp_path), tta_flip=True)
    copy = tmp_path / "copy_of_first.png"
    shutil.copy(paths[0], copy)
    utils.predict_dino([trained], [str(copy)], _rt(cache_dir=tmp_path), tta_flip=True)
    assert seen == []  # a rerun, and a copy of a known image under another name: nothing computed
    assert all(np.array_equal(again[k], p[k]) for k in p)
    n_files = len(list((tmp_path / "dino").glob("*.safetensors")))
    utils.predict_dino([_trained(weights_id="ckpt-b")], paths, _rt(cache_dir=tmp_path), tta_flip=True)
    assert seen == [5, 5]  # another checkpoint: its own cache
    assert len(list((tmp_path / "dino").glob("*.safetensors"))) == n_files + 1
    seen.clear()
    utils.predict_dino([trained], paths, _rt(cache_dir=tmp_path), tta_flip=False)
    assert seen == [5]  # another TTA setting: its own cache too


def test_feature_caches_are_kept_per_checkpoint_apart_from_the_probabilities(images, tmp_path, monkeypatch):
    paths = images[0][:2]
    a, b = _trained(weights_id="ckpt-a"), _trained(weights_id="ckpt-b")  # the same weights, two checkpoints
    utils.dino_features(a, paths, _rt(cache_dir=tmp_path))
    utils.predict_dino([a], paths, _rt(cache_dir=tmp_path))
    kinds = sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "dino").glob("*.safetensors"))
    assert kinds == ["dino_feats", "dino_probs"]
    seen, real = [], utils.collect_logits
    monkeypatch.setattr(utils, "collect_logits",
                        lambda m, loader, *a, **k: seen.append(len(loader.dataset)) or real(m, loader, *a, **k))
    utils.dino_features(a, paths, _rt(cache_dir=tmp_path))
    assert seen == []  # read back
    utils.dino_features(b, paths, _rt(cache_dir=tmp_path))
    assert seen == [2]  # another checkpoint is another cache, whatever its weights look like
    assert len(list((tmp_path / "dino").glob("dino_feats_*.safetensors"))) == 2


def test_predictions_flip_by_default_and_run_at_the_runtimes_precision(images, monkeypatch):
    paths = images[0][:2]
    trained = _trained()
    default = utils.predict_dino([trained], paths, _rt())
    for k, v in utils.predict_dino([trained], paths, _rt(), tta_flip=True).items():
        np.testing.assert_array_equal(default[k], v)  # the same computation: flip TTA is the default
    used, real = [], runtime.autocast
    monkeypatch.setattr(utils, "autocast", lambda device, dtype: used.append(dtype) or real(device, dtype))
    bf16 = Runtime(CPU, torch.bfloat16, progress=False)  # as make_runtime sets it on a bf16-capable device
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "pin_memory without an accelerator" on a CPU
        utils.predict_dino([trained], paths, bf16, tta_flip=True)
        utils.dino_features(trained, paths, bf16, tta_flip=True)
    assert used == [torch.bfloat16] * 4  # image and mirror, for probabilities and for features


def test_a_cache_without_a_checkpoint_id_is_keyed_by_the_weights_and_the_preprocessing(images, tmp_path, monkeypatch):
    paths = images[0][:2]
    seen, real = [], utils.collect_logits
    monkeypatch.setattr(utils, "collect_logits",
                        lambda m, loader, *a, **k: seen.append(len(loader.dataset)) or real(m, loader, *a, **k))
    a = _trained(weights_id="")
    utils.predict_dino([a], paths, _rt(cache_dir=tmp_path), tta_flip=False)
    utils.predict_dino([a], paths, _rt(cache_dir=tmp_path), tta_flip=False)
    assert seen == [2]  # the weights' fingerprint found the cache
    b = _trained(weights_id="")
    with torch.no_grad():
        b.model.heads["coarse"].bias.add_(1.0)
    utils.predict_dino([b], paths, _rt(cache_dir=tmp_path), tta_flip=False)
    assert seen == [2, 2]  # other weights: computed afresh
    b.model.backbone.pretrained_cfg = {**b.model.backbone.pretrained_cfg, "mean": (0.1, 0.2, 0.3)}
    utils.predict_dino([b], paths, _rt(cache_dir=tmp_path), tta_flip=False)
    assert seen == [2, 2, 2]  # other preprocessing: computed afresh


def test_content_given_by_the_caller_is_the_cache_key(images, tmp_path, monkeypatch):
    paths = images[0]
    trained = _trained()
    content = {p: utils.file_sha1(p) for p in paths}
    utils.predict_dino([trained], paths, _rt(cache_dir=tmp_path), content=content)
    hashed = []
    monkeypatch.setattr(utils, "file_sha1", lambda p: hashed.append(p) or "unused")
    utils.predict_dino([trained], paths, _rt(cache_dir=tmp_path), content=content)
    utils.dino_features(trained, paths, _rt(cache_dir=tmp_path), content=content)
    assert hashed == []  # EntrepData.sha1 given: no file is hashed again


def test_separate_models_merge_their_heads_into_one_dict(images):
    paths = images[0]
    models = [_trained(tasks, weights_id=name) for name, tasks in DINO_MODEL_SETS["separate"].items()]
    merged = utils.predict_dino(models, paths, _rt())
    assert set(merged) == set(DINO_TASKS)
    assert merged["coarse"].shape == (5, 4) and all(merged[t].shape == (5,) for t in FINE_TASKS)
    for trained in models:
        (task,) = trained.model.tasks
        alone = utils.predict_dino([trained], paths, _rt())
        assert set(alone) == {task}
        np.testing.assert_allclose(merged[task], alone[task], **TOL)
    labels = utils.region_then_fine(merged["coarse"].argmax(1), merged)  # the hybrid's input, as is
    assert labels.shape == (5,)


def test_trained_dino_summary_reports_the_first_best_epoch_of_its_history():
    """What metrics.json records: the first epoch of the best validation score (train_dino keeps that
    one: a later equal score is no improvement), its score, the epochs run and where the weights are."""
    history = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "val_score": [0.25, 0.5, 0.75, 0.5, 0.75]})
    trained = Trained(_tiny(("coarse", "ear")), Path("runs") / "dino-1" / "best.pt", history, "id")
    assert trained.summary() == {"tasks": ["coarse", "ear"], "epochs_run": 5, "best_epoch": 3,
                                 "best_val_score_no_tta": 0.75, "checkpoint": str(Path("runs") / "dino-1" / "best.pt"),
                                 "finished": True}
    stopped = Trained(_tiny(("coarse",)), Path("runs") / "dino-1" / "last.pt", history.iloc[:2], "id", finished=False)
    assert stopped.summary()["finished"] is False and stopped.summary()["epochs_run"] == 2


def test_summary_of_a_tuned_model_without_heads_or_validation_score_has_neither():
    """The tuned BiomedCLIP (train_retrieval): no `tasks`, a history without val_score."""
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5]})
    tuned = Trained(torch.nn.Linear(2, 2), Path("runs") / "clip-1" / "best.pt", history, "id")
    assert tuned.summary() == {"epochs_run": 2, "checkpoint": str(Path("runs") / "clip-1" / "best.pt"),
                               "finished": True}


# ---- plots ----------------------------------------------------------------------------------

def test_learning_curve_plots_both_panels():
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.0], "val_loss": [2.1, 1.7, 1.6],
                            "val_score": [0.2, 0.45, 0.4], "lr_heads": [1e-3, 5e-4, 0.0]})
    fig = plots.plot_learning_curve(history, title="tiny")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    loss, score = fig.axes
    assert len(loss.lines) == 3 and len(score.lines) == 2  # train, val, best-epoch marker / val score, marker
    np.testing.assert_array_equal(loss.lines[0].get_ydata(), history["train_loss"])
    np.testing.assert_array_equal(score.lines[0].get_ydata(), history["val_score"])
    assert loss.lines[-1].get_xdata()[0] == 2 and score.lines[-1].get_xdata()[0] == 2  # best score at epoch 2
