"""BiomedCLIP (utils section 4) and the prototype classifier (section 5): CPU, tiny random models,
no network. The BiomedCLIP folder is built from the hub repository's real open_clip_config.json (a
random ViT-B/16 and a tiny BERT text tower), once per module."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import matplotlib
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import EntryNotFoundError
from matplotlib.figure import Figure
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.metrics import log_loss
from torch import nn
from transformers import BertConfig, BertTokenizer

import biomedclip_offline
import utils
from biomedclip_offline import BIOMEDCLIP_FILES, BIOMEDCLIP_TEXT_HUB_ID
from plots import plot_embedding_projection
from runtime import Runtime
from utils import (
    BIOMEDCLIP_HUB_ID,
    COARSE_CLASS_TEXTS,
    COARSE_CLASSES,
    FINE_CLASS_TEXTS,
    JOINT_WEIGHT_GRID,
    LABEL_TO_COARSE,
    LABEL_TO_ID,
    LABELS,
    LEVELS,
    PROMPT_TEMPLATES,
    TEMPERATURE_GRID,
    Clip,
    FeatureTable,
    Level,
    add_description_prompts,
    choose_prototype_weight,
    class_prompts,
    embed_images,
    embed_texts,
    file_sha1,
    fit_prototype_classifier,
    image_prototypes,
    joint_prototypes,
    load_clip,
    prototype_probs,
    text_prototypes,
)

matplotlib.use("Agg")

CPU = torch.device("cpu")

# The fields of open_clip_config.json in microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, exactly.
BIOMEDCLIP_CONFIG: dict = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}
TEXT_FOLDER = Path(BIOMEDCLIP_TEXT_HUB_ID).name  # the sub-folder export_biomedclip writes
BIOMEDCLIP_REPO = BIOMEDCLIP_HUB_ID.removeprefix("hf-hub:")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "an", "endoscopic", "image", "of", "the", "right", "left",
         "nasal", "passage", "ear", "canal", "tympanic", "membrane", "vocal", "cords", "open", "closed", "throat",
         "this", "is", "a", "photo", "spur", "on", "septum"]
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}


# ----------------------------------------------------------------------------------- helpers, fixtures


def runtime(cache_dir: Path | None = None, **kw) -> Runtime:
    """A CPU Runtime, fp32 unless amp= says otherwise, without progress bars."""
    return Runtime(CPU, cache_dir=cache_dir, progress=False, **kw)


FP32 = runtime()


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def write_tokenizer_files(folder: Path) -> None:
    """A BERT WordPiece tokenizer's hub files: vocab.txt, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json (the names of BiomedCLIP's repository; a small vocabulary)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS), encoding="utf-8")


def write_bert_folder(folder: Path) -> Path:
    """The text tower's repository as export_biomedclip copies it: config.json (a tiny BERT: hidden 32,
    one layer; the real one is BiomedBERT-base) and its tokenizer files."""
    write_tokenizer_files(folder)
    BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=256).save_pretrained(folder)
    return folder


def write_config(folder: Path, text_tower: str | None = None) -> None:
    """BiomedCLIP's open_clip_config.json, or a copy whose text tower names the folder `text_tower`."""
    config = copy.deepcopy(BIOMEDCLIP_CONFIG)
    if text_tower:
        config["model_cfg"]["text_cfg"].update(hf_model_name=text_tower, hf_tokenizer_name=text_tower)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.symlink(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*"))


@dataclass
class BiomedFolder:
    folder: Path  # BiomedCLIP's hub files + the text tower's files in TEXT_FOLDER/
    pixels: torch.Tensor  # (2, 3, 224, 224) fixed model inputs ...
    tokens: torch.Tensor  # (2, 256)
    image_ref: torch.Tensor  # ... and the saved model's encode_image / encode_text of them
    text_ref: torch.Tensor


@pytest.fixture(scope="module")
def biomedclip(tmp_path_factory) -> Iterator[BiomedFolder]:
    """A folder laid out as export_biomedclip writes it, from BiomedCLIP's real config; its weights are
    the state dict of the model open_clip builds from that config (ViT-B/16, ~350 MB; tiny BERT)."""
    root = tmp_path_factory.mktemp("biomedclip")
    write_tokenizer_files(root)
    text_dir = write_bert_folder(root / TEXT_FOLDER)
    write_config(root)
    build = copy.deepcopy(BIOMEDCLIP_CONFIG["model_cfg"])
    build["text_cfg"].update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir), hf_model_pretrained=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CustomTextCLIP(**build).eval()
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(2, 256, dtype=torch.long)
    tokens[0, :6] = torch.tensor([2, VOCAB.index("ear"), VOCAB.index("canal"), VOCAB.index("left"), 5, 3])
    tokens[1, :5] = torch.tensor([2, VOCAB.index("nasal"), VOCAB.index("passage"), 5, 3])
    with torch.inference_mode():
        image_ref, text_ref = model.encode_image(pixels), model.encode_text(tokens)
    yield BiomedFolder(root, pixels, tokens, image_ref, text_ref)
    shutil.rmtree(root, ignore_errors=True)  # pytest keeps recent temp folders: not 350 MB each


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No sockets in this process; an empty Hugging Face cache here and in child interpreters."""
    def no_network(*args, **kwargs):
        raise OSError("network access during an offline test")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


@pytest.fixture(scope="module")
def tiny():
    return load_clip("tiny", CPU)


@pytest.fixture
def image_paths(tmp_path: Path) -> list[Path]:
    """Six small noise images of different contents (one grayscale)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        a = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
        im = Image.fromarray(a).convert("L") if i == 5 else Image.fromarray(a)
        paths.append(tmp_path / f"img{i}.png")
        im.save(paths[-1])
    return paths


def count_encodes(monkeypatch, model) -> list[int]:
    """Wrap model.encode_image; the returned list gets each call's batch size."""
    calls: list[int] = []
    original = model.encode_image

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model, "encode_image", counting)
    return calls


# ----------------------------------------------------------------------------------- tiny CLIP


def test_tiny_clip_embeds_images_and_texts_as_unit_vectors(tiny, image_paths):
    img = embed_images(tiny, image_paths, runtime(batch_size=4))
    with_workers = embed_images(tiny, image_paths, runtime(batch_size=4, num_workers=2))
    assert torch.allclose(img, with_workers, atol=1e-6)  # same order and values through worker processes
    txt = embed_texts(tiny, ["an endoscopic image of the ear.", "nose"], FP32)
    assert img.shape == (6, 32) and txt.shape == (2, 32)
    assert img.dtype == torch.float32 and txt.dtype == torch.float32
    assert torch.allclose(img.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(txt[0], txt[1], atol=1e-3) and not tiny.model.training


def test_tiny_clip_depends_only_on_seed_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = (load_clip("tiny", CPU, seed=s).model.state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_bf16_autocast_embeddings_close_to_fp32(tiny, image_paths):
    fp32 = embed_images(tiny, image_paths, FP32)
    bf16 = embed_images(tiny, image_paths, runtime(amp=torch.bfloat16))
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.norm(dim=1), torch.ones(6), atol=1e-5)
    assert (fp32 * bf16).sum(1).min() > 0.98  # cosine between the two runs
    texts = ["An endoscopic image of the right nasal passage.", "vocal cords"]
    t32, t16 = (embed_texts(tiny, texts, runtime(amp=amp)) for amp in (None, torch.bfloat16))
    assert (t32 * t16).sum(1).min() > 0.98


def test_unknown_clip_name_lists_the_accepted_forms():
    with pytest.raises(ValueError, match="hf-hub:.*local-dir:.*tiny"):
        load_clip("ViT-B-32", CPU)


# ----------------------------------------------------------------------------------- BiomedCLIP offline


def test_biomedclip_folder_loads_in_a_fresh_offline_interpreter(biomedclip, offline, tmp_path):
    before = listing(biomedclip.folder)
    result = biomedclip_offline.check_clip_offline(biomedclip.folder, tmp_path / "cache")
    assert result == {"text_dim": 512, "image_dim": 512, "tokenizer": "HFTokenizer"}
    assert listing(biomedclip.folder) == before  # the folder (a read-only Kaggle dataset) is never written


def test_biomedclip_local_dir_loads_the_saved_weights_in_process(biomedclip, offline, tmp_path):
    before = listing(biomedclip.folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # a model left at its random init would not match the saved one
        clip = load_clip(f"local-dir:{biomedclip.folder}", CPU, cache_dir=tmp_path / "cache")
    model, preprocess, tokenizer = clip.model, clip.preprocess, clip.tokenizer
    assert listing(biomedclip.folder) == before and not model.training
    with torch.inference_mode():
        assert torch.allclose(model.encode_image(biomedclip.pixels), biomedclip.image_ref, atol=1e-4)
        assert torch.allclose(model.encode_text(biomedclip.tokens), biomedclip.text_ref, atol=1e-5)
    texts = ["An endoscopic image of the right nasal passage.", "this is a photo of the left ear canal."]
    tokens = tokenizer(texts)
    assert tokens.shape == (2, 256) and tokens[0, 0].item() == VOCAB.index("[CLS]")  # BERT tokens, context 256
    words = ("an", "endoscopic", "image", "of", "the", "right", "nasal")
    assert tokens[0, 1:8].tolist() == [VOCAB.index(w) for w in words]
    assert not torch.equal(tokens[0], tokens[1])
    txt = embed_texts(clip, texts, FP32)
    with torch.inference_mode():
        assert torch.allclose(txt, F.normalize(model.encode_text(tokens), dim=-1), atol=1e-5)
    x = preprocess(Image.new("RGB", (640, 480), (255, 255, 255)))
    assert x.shape == (3, 224, 224)
    mean, std = (torch.tensor(BIOMEDCLIP_CONFIG["preprocess_cfg"][k])[:, None, None] for k in ("mean", "std"))
    assert torch.allclose(x, ((1 - mean) / std).expand_as(x), atol=1e-5)  # the config's mean/std


def test_text_tower_at_an_absolute_hf_model_name_path(biomedclip, offline, tmp_path):
    bert = write_bert_folder(tmp_path / "bert_elsewhere")
    folder = tmp_path / "biomedclip_abs"
    write_tokenizer_files(folder)
    write_config(folder, text_tower=str(bert.resolve()))
    link_or_copy(biomedclip.folder / "open_clip_pytorch_model.bin", folder / "open_clip_pytorch_model.bin")
    clip = load_clip(f"local-dir:{folder}", CPU, cache_dir=tmp_path / "cache")
    with torch.inference_mode():
        assert torch.allclose(clip.model.encode_text(biomedclip.tokens), biomedclip.text_ref, atol=1e-5)
    assert embed_texts(clip, ["vocal cords open"], FP32).shape == (1, 512)


def test_local_dir_without_text_tower_files_says_what_to_put_where(offline, tmp_path):
    folder = tmp_path / "only_biomedclip_repo"  # what downloading BiomedCLIP's repository alone gives
    write_tokenizer_files(folder)
    write_config(folder)
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(FileNotFoundError) as err:
        load_clip(f"local-dir:{folder}", CPU, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "config.json and vocab.txt" in message and BIOMEDCLIP_TEXT_HUB_ID in message
    assert str(folder / TEXT_FOLDER) in message and "biomedclip_offline.export_biomedclip" in message


def test_folder_without_open_clip_config_names_the_files_needed(tmp_path):
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json") as err:
        load_clip(f"local-dir:{tmp_path}", CPU, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert all(name in message for name in BIOMEDCLIP_FILES) and "biomedclip_offline.export_biomedclip" in message


# ----------------------------------------------------------------------------------- export_biomedclip


def fake_hub(monkeypatch, hub: Path) -> list[tuple[str, str]]:
    """hf_hub_download served from hub/<repo id>/<file>: copies into local_dir, EntryNotFoundError for
    a file the repository lacks. Returns the list of (repo id, file) requested."""
    calls: list[tuple[str, str]] = []

    def download(repo_id, filename, *, local_dir=None, **kwargs):
        calls.append((repo_id, filename))
        src = hub / repo_id / filename
        if not src.is_file():
            raise EntryNotFoundError(f"404: {filename} is not in {repo_id}")
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def stand_in_hub(hub: Path, skip: tuple[str, ...] = ()) -> None:
    """Both repositories with small stand-in files that name their repository; `skip` names are absent."""
    for repo, names in ((BIOMEDCLIP_REPO, BIOMEDCLIP_FILES),
                        (BIOMEDCLIP_TEXT_HUB_ID, biomedclip_offline.HF_TEXT_FILES)):
        (hub / repo).mkdir(parents=True)
        for name in names:
            if name not in skip:
                (hub / repo / name).write_text(f"{repo}/{name}", encoding="utf-8")


def test_export_biomedclip_writes_the_offline_layout(monkeypatch, tmp_path):
    stand_in_hub(tmp_path / "hub", skip=("special_tokens_map.json", "tokenizer.json"))  # optional in both repos
    calls = fake_hub(monkeypatch, tmp_path / "hub")
    out = biomedclip_offline.export_biomedclip(tmp_path / "export")
    assert out == tmp_path / "export"
    assert {repo for repo, _ in calls} == {BIOMEDCLIP_REPO, BIOMEDCLIP_TEXT_HUB_ID}  # no "hf-hub:" prefix
    root = sorted(p.name for p in out.iterdir())
    assert root == sorted([TEXT_FOLDER, "open_clip_config.json", "open_clip_pytorch_model.bin",
                           "tokenizer_config.json", "vocab.txt"])
    assert (out / "vocab.txt").read_text() == f"{BIOMEDCLIP_REPO}/vocab.txt"  # BiomedCLIP's files at the root
    text = out / TEXT_FOLDER
    assert sorted(p.name for p in text.iterdir()) == ["config.json", "tokenizer_config.json", "vocab.txt"]
    assert (text / "config.json").read_text() == f"{BIOMEDCLIP_TEXT_HUB_ID}/config.json"
    assert (text / "vocab.txt").read_text() == f"{BIOMEDCLIP_TEXT_HUB_ID}/vocab.txt"


@pytest.mark.parametrize("missing", ["open_clip_config.json", "open_clip_pytorch_model.bin", "config.json"])
def test_export_biomedclip_raises_for_a_missing_required_file(monkeypatch, tmp_path, missing):
    stand_in_hub(tmp_path / "hub", skip=(missing,))
    fake_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(EntryNotFoundError, match=missing):
        biomedclip_offline.export_biomedclip(tmp_path / "export")


def test_exported_folder_loads_offline(biomedclip, monkeypatch, offline, tmp_path):
    hub = tmp_path / "hub"
    for repo, src in ((BIOMEDCLIP_REPO, biomedclip.folder), (BIOMEDCLIP_TEXT_HUB_ID, biomedclip.folder / TEXT_FOLDER)):
        (hub / repo).mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and not (repo == BIOMEDCLIP_TEXT_HUB_ID and f.name == "tokenizer.json"):
                link_or_copy(f, hub / repo / f.name)
    fake_hub(monkeypatch, hub)
    folder = biomedclip_offline.export_biomedclip(tmp_path / "export")
    assert not (folder / TEXT_FOLDER / "tokenizer.json").exists()  # the text repo without it still loads
    result = biomedclip_offline.check_clip_offline(folder, tmp_path / "cache")
    assert result["text_dim"] == result["image_dim"] == 512
    shutil.rmtree(folder)  # the weights copy


# ----------------------------------------------------------------------------------- embedding cache


def test_cache_second_call_never_calls_the_model(monkeypatch, image_paths, tmp_path):
    clip = load_clip("tiny", CPU)
    copy_of_0 = tmp_path / "copy_of_img0.png"
    shutil.copyfile(image_paths[0], copy_of_0)
    paths = [*image_paths, copy_of_0]
    calls = count_encodes(monkeypatch, clip.model)
    rt = runtime(tmp_path / "cache")
    first = embed_images(clip, paths, rt)
    assert sum(calls) == 6  # one encoding per content: the copy is not encoded again
    assert torch.equal(first[6], first[0])
    calls.clear()
    second = embed_images(clip, paths[::-1], rt)
    assert calls == []
    assert torch.equal(second, first.flip(0))
    content = {str(p): file_sha1(p) for p in paths}
    assert torch.equal(embed_images(clip, paths, rt, content=content), first) and calls == []


@pytest.mark.parametrize("content", ["given", "hashed"])
def test_cache_reencodes_only_the_changed_file(monkeypatch, image_paths, tmp_path, content):
    clip = load_clip("tiny", CPU)
    calls = count_encodes(monkeypatch, clip.model)
    rt = runtime(tmp_path / "cache")

    def keys():
        return {str(p): file_sha1(p) for p in image_paths} if content == "given" else None

    before = embed_images(clip, image_paths, rt, content=keys())
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image_paths[2])  # same path, new content
    calls.clear()
    after = embed_images(clip, image_paths, rt, content=keys())
    assert calls == [1]
    fresh = embed_images(clip, [image_paths[2]], FP32)
    assert torch.allclose(after[2], fresh[0], atol=1e-6)  # the same single-image batch
    assert not torch.allclose(after[2], before[2], atol=1e-2)
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(after[keep], before[keep])


def test_cache_of_another_model_is_another_file(monkeypatch, image_paths, tmp_path):
    rt = runtime(tmp_path / "cache")
    clip0 = load_clip("tiny", CPU, seed=0)
    a = embed_images(clip0, image_paths, rt)
    clip1 = load_clip("tiny", CPU, seed=1)
    calls = count_encodes(monkeypatch, clip1.model)
    b = embed_images(clip1, image_paths, rt)
    assert sum(calls) == 6
    assert not torch.allclose(a, b, atol=1e-2)
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 2  # CLIP rows: cache_dir/features
    calls.clear()
    assert torch.equal(embed_images(clip1, image_paths, rt), b)
    assert calls == []  # each model's rows stay readable next to the other's


def drop_last_row(cache_file: Path) -> None:
    """A readable safetensors file whose keys no longer match its rows."""
    with safe_open(str(cache_file), framework="pt") as f:
        meta, rows = f.metadata(), f.get_tensor("rows")
    save_file({"rows": rows[:-1].contiguous()}, str(cache_file), metadata=meta)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "rows-lost"])
def test_damaged_cache_is_reported_and_rebuilt(monkeypatch, image_paths, tmp_path, damage):
    clip = load_clip("tiny", CPU)
    rt = runtime(tmp_path / "cache")
    good = embed_images(clip, image_paths, rt)
    (cache_file,) = (tmp_path / "cache" / "features").glob("*.safetensors")
    data = cache_file.read_bytes()
    if damage == "rows-lost":
        drop_last_row(cache_file)
    else:
        cache_file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    calls = count_encodes(monkeypatch, clip.model)
    with pytest.warns(UserWarning, match="unusable cache"):
        rebuilt = embed_images(clip, image_paths, rt)
    assert sum(calls) == 6
    assert torch.allclose(rebuilt, good, atol=1e-6)
    calls.clear()
    assert torch.equal(embed_images(clip, image_paths, rt), rebuilt)  # valid again
    assert calls == []


def test_cached_embeddings_equal_uncached_ones(tiny, image_paths, tmp_path):
    plain = embed_images(tiny, image_paths, runtime(batch_size=4))
    cached = embed_images(tiny, image_paths, runtime(tmp_path / "c", batch_size=4))
    assert torch.allclose(cached, plain, atol=1e-6)  # the same batches
    # the first three cached by one call, the rest encoded in another batch by the next one
    partial = runtime(tmp_path / "p", batch_size=4)
    embed_images(tiny, image_paths[:3], partial)
    mixed = embed_images(tiny, image_paths, partial)
    assert torch.allclose(mixed, plain, atol=1e-4)
    assert embed_images(tiny, [], partial).numel() == 0


def test_cache_file_is_named_by_kind_and_identity_hash(tmp_path):
    identity = "clip|abc|transform|None"
    digest = hashlib.sha1(identity.encode()).hexdigest()[:16]
    assert utils.cache_file(tmp_path, identity) == tmp_path / f"clip_{digest}.safetensors"
    assert utils.cache_file(tmp_path, "clip|abc|transform|torch.bfloat16") != utils.cache_file(tmp_path, identity)
    assert utils.cache_file(None, identity) is None  # no folder: no cache


@pytest.mark.parametrize("cached", [False, True])
def test_cached_rows_of_no_keys_are_an_empty_float32_table_and_compute_nothing(tmp_path, cached):
    calls = []

    def compute(todo: list) -> torch.Tensor:
        calls.append(list(todo))
        return torch.ones(len(todo), 4)

    path = utils.cache_file(tmp_path / "features", "clip|x") if cached else None
    rows = utils.cached_rows([], [], compute, path, "clip|x")
    assert rows.dtype == torch.float32 and rows.shape == (0, 0)
    assert calls == []  # nothing to compute, not even an empty batch
    assert path is None or not path.exists()  # and nothing written


def test_encode_batches_of_no_batches_is_an_empty_float32_table():
    def encode(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("no batch to encode")

    out = utils.encode_batches(encode, [], CPU, None)
    assert out.dtype == torch.float32 and tuple(out.shape) == (0, 0)


# ----------------------------------------------------------------------------------- prototypes


def test_image_prototypes_equal_naive_class_means():
    feats, labels = unit(40, 8, 0), torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1))
    protos = image_prototypes(feats, labels, 4)
    assert protos.shape == (4, 8)
    for c in range(4):
        mean = feats[labels == c].mean(0)
        assert torch.allclose(protos[c], mean / mean.norm(), atol=1e-6)
    read_only = labels.numpy().copy()
    read_only.flags.writeable = False  # what pandas may hand out
    assert torch.equal(image_prototypes(feats, read_only, 4), protos)
    assert torch.equal(image_prototypes(feats, labels.tolist(), 4), protos)


def test_empty_class_raises_or_gives_a_zero_prototype():
    feats, labels = unit(6, 8, 0), [0, 0, 1, 1, 3, 3]
    with pytest.raises(ValueError, match=r"class ids \[2\]"):
        image_prototypes(feats, labels, 4)
    protos = image_prototypes(feats, labels, 4, allow_empty=True)
    assert torch.isfinite(protos).all() and protos[2].abs().sum() == 0
    text = unit(4, 8, 5)
    assert torch.allclose(joint_prototypes(protos, text, 0.7)[2], text[2], atol=1e-6)  # its text prototype alone
    with pytest.raises(ValueError, match="class ids 0..3"):
        image_prototypes(feats, [0, 0, 1, 1, 3, 4], 4)


def test_prototype_probs_equal_a_per_class_loop_softmax():
    feats, protos, temperature = unit(10, 8, 0), unit(4, 8, 1), 0.05
    probs = prototype_probs(feats, protos, temperature)
    assert probs.shape == (10, 4)
    for n in range(10):
        logits = np.array([float(feats[n] @ protos[c]) / temperature for c in range(4)])
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert np.allclose(probs[n].numpy(), expected, atol=1e-6)
    assert torch.allclose(prototype_probs(feats, protos), (100.0 * feats @ protos.T).softmax(1), atol=1e-6)


def test_joint_prototypes_are_unit_and_reduce_to_each_side():
    img, txt = unit(4, 8, 0), unit(4, 8, 1)
    assert torch.allclose(joint_prototypes(img, txt, 1.0), img, atol=1e-6)
    assert torch.allclose(joint_prototypes(img, txt, 0.0), txt, atol=1e-6)
    mid = joint_prototypes(img, txt, 0.3)
    assert torch.allclose(mid.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(mid, F.normalize(0.3 * img + 0.7 * txt, dim=-1), atol=1e-6)


def test_text_prototypes_are_renormalised_means_of_prompt_embeddings(tiny):
    prompts = class_prompts(COARSE_CLASSES, COARSE_CLASS_TEXTS)
    protos = text_prototypes(tiny, prompts, COARSE_CLASSES, FP32)
    assert protos.shape == (4, 32)
    flat = embed_texts(tiny, [p for c in COARSE_CLASSES for p in prompts[c]], FP32)  # the same batch
    start = 0
    for i, c in enumerate(COARSE_CLASSES):
        mean = flat[start:start + len(prompts[c])].mean(0)
        start += len(prompts[c])
        assert torch.allclose(protos[i], mean / mean.norm(), atol=1e-5)
    reordered = text_prototypes(tiny, prompts, COARSE_CLASSES[::-1], FP32)  # rows follow class_names
    assert (reordered * protos.flip(0)).sum(1).min() > 0.999  # other batch positions: a tolerance
    fine = text_prototypes(tiny, class_prompts(LABELS, FINE_CLASS_TEXTS), LABELS, FP32)
    assert fine.shape == (7, 32) and torch.allclose(fine.norm(dim=1), torch.ones(7), atol=1e-5)
    with pytest.raises(ValueError, match=r"No prompts.*nose"):
        text_prototypes(tiny, {"ear": ["ear"], "nose": []}, ["ear", "nose"], FP32)


def test_fine_class_texts_name_their_own_side_and_state_never_the_other():
    for label, texts in FINE_CLASS_TEXTS.items():  # every ear / nose text says its side, none the other
        for side, other in (("left", "right"), ("right", "left")):
            if side in label:
                assert all(side in t and other not in t for t in texts), label
    for state, words in (("vc-open", ("closed", "adducted")), ("vc-closed", ("open", "abducted"))):
        assert FINE_CLASS_TEXTS[state][0].startswith(state[3:])  # "open ..." / "closed ..."
        assert not any(w in t for w in words for t in FINE_CLASS_TEXTS[state]), state


def test_class_prompts_cover_both_levels_with_the_paper_template():
    assert set(COARSE_CLASS_TEXTS) == set(COARSE_CLASSES) and set(FINE_CLASS_TEXTS) == set(LABELS)
    for names, texts in ((COARSE_CLASSES, COARSE_CLASS_TEXTS), (LABELS, FINE_CLASS_TEXTS)):
        prompts = class_prompts(names, texts)
        assert list(prompts) == list(names)
        for c in names:
            assert len(prompts[c]) == len(set(prompts[c])) == len(texts[c]) * len(PROMPT_TEMPLATES)
            assert all("{}" not in p for p in prompts[c])
    assert "An endoscopic image of the {}." in PROMPT_TEMPLATES
    assert "An endoscopic image of the right nasal passage." in class_prompts(LABELS, FINE_CLASS_TEXTS)["nose-right"]
    assert "this is a photo of vocal cords." in class_prompts(COARSE_CLASSES, COARSE_CLASS_TEXTS)["vc"]


def test_add_description_prompts_takes_training_lines_deduplicated():
    prompts = class_prompts(COARSE_CLASSES, COARSE_CLASS_TEXTS)
    kept = copy.deepcopy(prompts)
    regions = LEVELS["coarse"].names([LABEL_TO_ID[x] for x in ("ear-left", "ear-right", "nose-left", "ear-left")])
    extended = add_description_prompts(
        prompts, [*regions[:3], "unknown", regions[3]],
        ["the tympanic membrane is intact\r\nno discharge", "no discharge", "a spur on the septum", "x",
         "- no discharge\n\n"],
    )
    assert extended["ear"] == prompts["ear"] + ["the tympanic membrane is intact", "no discharge"]
    assert extended["nose"] == prompts["nose"] + ["a spur on the septum"]
    assert extended["throat"] == prompts["throat"] and all("x" not in p for p in extended.values())
    assert prompts == kept  # the input is not changed
    fine_prompts = class_prompts(LABELS, FINE_CLASS_TEXTS)
    fine = add_description_prompts(fine_prompts, LEVELS["fine"].names([LABEL_TO_ID["vc-open"]]),
                                   ["the glottis is open"])  # the fine level's classes: the labels themselves
    assert fine["vc-open"] == fine_prompts["vc-open"] + ["the glottis is open"]
    assert fine["vc-closed"] == fine_prompts["vc-closed"]


def test_choose_prototype_weight_prefers_the_informative_prototypes():
    g = torch.Generator().manual_seed(0)
    centres = unit(4, 16, 3)
    labels = torch.arange(4).repeat(25)
    feats = F.normalize(centres[labels] + 0.15 * torch.randn(100, 16, generator=g), dim=-1)
    noise = unit(4, 16, 9)  # prototypes unrelated to the classes
    by_image = choose_prototype_weight(feats, labels, centres, noise)
    by_text = choose_prototype_weight(feats, labels, noise, centres)
    assert len(by_image) == len(JOINT_WEIGHT_GRID) * len(TEMPERATURE_GRID)
    assert set(by_image.columns) >= {"weight", "temperature", "accuracy", "macro_f1", "log_loss"}
    f1_image = by_image.groupby("weight")["macro_f1"].first()
    f1_text = by_text.groupby("weight")["macro_f1"].first()
    assert f1_image[1.0] == 1.0 and f1_image[0.0] < 0.6  # image side informative
    assert f1_text[0.0] == 1.0 and f1_text[1.0] < 0.6  # text side informative
    assert (by_image.groupby("weight")["accuracy"].nunique() == 1).all()  # the temperature never moves argmax
    for _, row in by_image.sample(5, random_state=0).iterrows():  # log loss of prototype_probs at that point
        protos = joint_prototypes(centres, noise, row.weight).double()
        probs = prototype_probs(feats.double(), protos, row.temperature).numpy()
        assert row.log_loss == pytest.approx(log_loss(labels.numpy(), probs, labels=range(4)), rel=1e-6)


def test_fit_prototype_classifier_chooses_on_validation_and_predicts_probabilities(tiny):
    g = torch.Generator().manual_seed(0)
    centers = unit(3, 32, 11)
    y = torch.arange(60) % 3
    feats = F.normalize(centers[y] + 0.1 * torch.randn(60, 32, generator=g), dim=1)
    names, texts = ["a", "b", "c"], {"a": ["ear"], "b": ["nose"], "c": ["throat"]}
    clf = fit_prototype_classifier(tiny, FP32, Level("abc", tuple(names), texts), feats[:40], y[:40].tolist(),
                                   feats[40:], y[40:].tolist())
    probs = clf.predict_proba(feats[40:])
    assert probs.shape == (20, 3) and torch.allclose(probs.sum(1), torch.ones(20), atol=1e-5)
    assert (probs.argmax(1) == y[40:]).float().mean() > 0.9
    table = clf.table
    assert clf.weight > 0.0  # random text alone loses
    assert table.loc[table.weight == 0.0, "macro_f1"].max() < table.macro_f1.max()
    assert clf.weight == table.loc[table.macro_f1.idxmax(), "weight"]  # first best in grid order
    at_w = table[table.weight == clf.weight]
    assert clf.temperature == at_w.loc[at_w.log_loss.idxmin(), "temperature"]
    assert not clf.with_descriptions and clf.class_names == ("a", "b", "c")  # none given: none used
    img = image_prototypes(feats[:40], y[:40], 3)
    txt = text_prototypes(tiny, class_prompts(names, texts), names, FP32)
    assert torch.allclose(clf.protos, joint_prototypes(img, txt, clf.weight), atol=1e-5)


class TableText(nn.Module):
    """A stand-in CLIP text tower with known embeddings: each text in `table` has its vector, any other
    text `default`. `tokenize` is its tokenizer and records every text it is given."""

    def __init__(self, table: dict[str, torch.Tensor], default: torch.Tensor):
        super().__init__()
        self.texts, self.seen = list(table), []
        self.register_buffer("rows", torch.stack([default, *table.values()]))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.seen += texts
        return torch.tensor([[self.texts.index(t) + 1 if t in self.texts else 0] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rows[tokens[:, 0]]


def table_clip(model: TableText) -> Clip:
    """A Clip around a TableText stand-in (texts only: no image preprocessing)."""
    return Clip(model, None, model.tokenize)


@pytest.mark.parametrize("case", ["help", "hurt", "tie"])
def test_fit_prototype_classifier_tries_descriptions_and_keeps_them_only_when_they_help(case):
    e = torch.eye(8)  # e0..e2: the classes' directions, e6: every training image, e7: uninformative text
    names = ["a", "b", "c"]
    y = torch.arange(30) % 3
    val = F.normalize(e[y] + 0.05 * torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    train_feats = e[6].expand(9, 8)  # image prototypes all alike: the text side decides
    labels = ["a", "b", "c"] * 3  # the classes of y[:9]
    lines = {c: [f"finding of {c} {i}" for i in range(2 if case == "help" else 8)] for c in names}
    if case == "help":  # the class wordings say nothing, the findings name the class
        texts = {c: ["tissue"] for c in names}
        table = {line: e[names.index(c)] for c in names for line in lines[c]}
    else:  # the class wordings name the class; the findings point at the next class, or agree (a tie)
        texts = {c: [f"wording {c}"] for c in names}
        table = {p: e[names.index(c)] for c, ps in class_prompts(names, texts).items() for p in ps}
        shift = 1 if case == "hurt" else 0
        table |= {line: e[(names.index(c) + shift) % 3] for c in names for line in lines[c]}
    model = TableText(table, default=e[7])
    descriptions = ["\n".join(lines[c]) for c in labels]
    level = Level("abc", tuple(names), texts)
    assert level.names(y[:9].tolist()) == labels
    clf = fit_prototype_classifier(table_clip(model), FP32, level, train_feats, y[:9].tolist(), val, y.tolist(),
                                   train_descriptions=descriptions)
    assert {line for c in names for line in lines[c]} <= set(model.seen)  # the findings were tried
    assert clf.with_descriptions is (case == "help")  # kept only when strictly better on validation
    assert clf.table.macro_f1.max() == 1.0 and clf.weight == 0.0
    assert (clf.predict_proba(val).argmax(1) == y).all()


def test_fit_prototypes_builds_the_region_and_label_classifiers_from_official_ids():
    """Both levels from official label ids: "coarse" over COARSE_CLASSES, each image's findings joining its
    region's prompts (LABEL_TO_COARSE), and "fine" over LABELS, its findings joining its label's. Here only
    the findings tell the classes apart (class wordings and training images are uninformative), so each
    level reaches macro F1 1 only if its findings went to the right class."""
    e = torch.eye(16)  # e[4 + l]: label l's findings and validation images; e14: training images; e15: other text
    train_y7, val_y7 = np.arange(14) % 7, np.repeat(np.arange(7), 3)
    lines = {lab: [f"finding {lab} {k}" for k in range(2)] for lab in LABELS}
    model = TableText({line: e[4 + LABELS.index(lab)] for lab in LABELS for line in lines[lab]}, default=e[15])
    descriptions = ["\n".join(lines[LABELS[y]]) for y in train_y7]
    noise = 0.05 * torch.randn(21, 16, generator=torch.Generator().manual_seed(0))
    val = F.normalize(e[4 + torch.as_tensor(val_y7)] + noise, dim=1)
    train = e[14].expand(14, 16)
    clip = table_clip(model)
    fitted = utils.fit_prototypes(clip, FP32, train, train_y7, val, val_y7, descriptions)
    assert set(fitted) == {"coarse", "fine"}
    coarse, fine = fitted["coarse"], fitted["fine"]
    assert coarse.class_names == COARSE_CLASSES and fine.class_names == LABELS
    assert coarse.with_descriptions and fine.with_descriptions
    assert coarse.table.macro_f1.max() == 1.0 and fine.table.macro_f1.max() == 1.0
    assert coarse.predict_proba(val).argmax(1).tolist() == utils.coarse_of(val_y7).tolist()
    assert fine.predict_proba(val).argmax(1).tolist() == val_y7.tolist()
    # the same computation by hand, each level spelt out: equal exactly
    by_hand_coarse = Level("coarse", COARSE_CLASSES, COARSE_CLASS_TEXTS, LABEL_TO_COARSE)
    by_hand_fine = Level("fine", LABELS, FINE_CLASS_TEXTS)
    ref_coarse = fit_prototype_classifier(clip, FP32, by_hand_coarse, train, train_y7, val, val_y7, descriptions)
    ref_fine = fit_prototype_classifier(clip, FP32, by_hand_fine, train, train_y7, val, val_y7, descriptions)
    for got, ref in ((coarse, ref_coarse), (fine, ref_fine)):
        assert torch.equal(got.protos, ref.protos)
        assert (got.weight, got.temperature) == (ref.weight, ref.temperature)


def test_choose_prototype_weight_scores_every_class_even_one_absent_from_validation():
    # 4 classes; validation holds classes 0 and 1 only, one class-1 image looks like class 2, class 3 is
    # neither true nor predicted: it counts in macro F1 as 0, and the log loss is still defined
    protos = torch.eye(4, 8)
    feats = F.normalize(torch.eye(4, 8)[[0, 0, 1, 2]] + 0.1, dim=1)
    labels = [0, 0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no undefined-metric warning from scikit-learn either
        table = choose_prototype_weight(feats, labels, protos, protos)
    assert (table.accuracy == 0.75).all()  # 3 of 4 right at every weight
    assert table.macro_f1.tolist() == pytest.approx([(1 + 2 / 3 + 0 + 0) / 4] * len(table))
    assert np.isfinite(table.log_loss).all()


def test_fit_prototype_classifier_keeps_a_class_without_training_images():
    e = torch.eye(8)
    names = ["a", "b", "c"]
    texts = {c: [f"wording {c}"] for c in names}
    model = TableText({p: e[names.index(c)] for c, ps in class_prompts(names, texts).items() for p in ps}, default=e[7])
    train = F.normalize(e[[0, 1, 0, 1]] + 0.3 * e[5], dim=1)  # classes a and b only
    val_y = torch.arange(30) % 3
    val = F.normalize(e[val_y] + 0.3 * torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    clf = fit_prototype_classifier(table_clip(model), FP32, Level("abc", tuple(names), texts), train, [0, 1, 0, 1],
                                   val, val_y.tolist())
    assert torch.allclose(clf.protos[2], e[2])  # c's prototype is its text prototype alone
    assert (clf.predict_proba(val).argmax(1) == 2).any()


def test_fit_prototype_classifier_takes_the_temperature_of_the_chosen_weight():
    """Every weight misclassifies one image (an "a" nearer "b"), so macro F1 ties and the first weight, 0 (text
    only), is chosen. Its text prototypes call that image "b" confidently, which a high temperature softens;
    the image prototypes call it "b" by a hair, so at weight 1 a lower temperature is best."""
    e = torch.eye(8)
    names, texts = ["a", "b"], {"a": ["wording a"], "b": ["wording b"]}
    model = TableText({p: e[2 + names.index(c)] for c, ps in class_prompts(names, texts).items() for p in ps},
                      default=e[7])
    val = F.normalize(torch.stack([e[0] + e[2]] * 9 + [e[1] + e[3]] * 10 + [0.5 * e[0] + 0.55 * e[1] + e[3]]), dim=1)
    val_y = [0] * 9 + [1] * 10 + [0]
    clf = fit_prototype_classifier(table_clip(model), FP32, Level("ab", tuple(names), texts), e[[0, 1]], [0, 1], val,
                                   val_y)
    table = clf.table
    assert (table.accuracy == 0.95).all() and clf.weight == 0.0
    best_t = {w: g.loc[g.log_loss.idxmin(), "temperature"] for w, g in table.groupby("weight")}
    assert clf.temperature == best_t[0.0] == max(TEMPERATURE_GRID) and best_t[1.0] < best_t[0.0]
    probs = clf.predict_proba(val)  # at the chosen temperature, not CLIP's 0.01
    assert torch.allclose(probs, prototype_probs(val, clf.protos, clf.temperature))
    assert not torch.allclose(probs, prototype_probs(val, clf.protos, 0.01), atol=0.01)


def test_image_prototypes_take_any_integer_labels_and_keep_one_row_per_class():
    feats = unit(4, 8, 0)
    by_int32 = image_prototypes(feats, np.array([0, 1, 0, 1], dtype=np.int32), 3, allow_empty=True)
    assert by_int32.shape == (3, 8) and torch.equal(by_int32[2], torch.zeros(8))  # the last class: a zero row
    assert torch.allclose(by_int32[0], F.normalize(feats[0] + feats[2], dim=0))
    assert torch.equal(image_prototypes(feats[:0], [], 3, allow_empty=True), torch.zeros(3, 8))


def test_description_classes_outside_the_levels_keep_their_own_class():
    prompts = {"ear": ["an ear"], "custom": ["a custom view"]}
    classes = [*LEVELS["coarse"].names([LABEL_TO_ID["ear-left"]]), "custom"]  # "custom" is no level's class
    out = add_description_prompts(prompts, classes, ["wax", "a finding"])
    assert out == {"ear": ["an ear", "wax"], "custom": ["a custom view", "a finding"]}


def test_feature_table_looks_up_rows_by_path():
    feats = torch.arange(12.0).reshape(4, 3)
    table = FeatureTable(["a.png", "b.png", "c.png", "d.png"], feats)
    assert table[["c.png", "a.png"]].tolist() == [[6, 7, 8], [0, 1, 2]]
    assert torch.equal(table[[Path("d.png")]], feats[[3]])
    assert table[[]].shape == (0, 3)
    with pytest.raises(KeyError):
        table[["e.png"]]


# ----------------------------------------------------------------------------------- plots


def test_embedding_projection_draws_every_class_and_prototype():
    feats, labels = unit(30, 8, 0), np.arange(30) % 3
    protos = image_prototypes(feats, labels, 3)
    fig = plot_embedding_projection(feats, labels, ["ear", "nose", "vc"], protos)
    ax = fig.axes[0]
    assert isinstance(fig, Figure) and len(ax.collections) == 6  # three classes, three prototype stars
    assert [t.get_text() for t in ax.texts] == ["ear", "nose", "vc"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ear (n=10)", "nose (n=10)", "vc (n=10)"]
    bare = plot_embedding_projection(feats, labels, ["ear", "nose", "vc"]).axes[0]
    assert len(bare.collections) == 3 and not bare.texts
