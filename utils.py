"""The method's helpers for entrep-prototypical.ipynb, in the notebook's order.

1. Constants     label ids, regions, fine decisions, prompts, model names, grids, file names
2. Setup         parameter checks, device and precision, data path, DINOv2 weights, JSON, figures
3. Data          every ENTRep layout, problems, leakage, test lists, the validation split
4. BiomedCLIP    loading (hub, local-dir, tiny), an offline copy, embeddings cached by content
5. Prototypes    joint vision-language prototypes and their classifier
6. DINOv2        SurgeNet weights, heads, flip-swap data, training with resume, inference
7. Hybrid        the paper's fusion rule, its threshold cross-fitted on validation
8. Results       metrics with bootstrap intervals, tables, plots
9. Retrieval     Tracks 2 and 3: galleries, ranking, region re-ranking, evaluation
10. Submissions  the challenge's zip files, checked after writing
11. Learned retrieval  BiomedCLIP fine-tuned contrastively for Tracks 2 and 3 (beyond the paper)

Every helper takes what it uses as arguments; nothing runs at import time. Tensor layout: features
[N, D] with unit rows, prototypes [C, D], probabilities [N, C], logits = scale * feats @ protos.T.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import unicodedata
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import open_clip
import pandas as pd
import seaborn as sns
import timm
import timm.data
import timm.optim
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from scipy.special import softmax
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, train_test_split
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from tqdm import tqdm

# =============================================================================================
# 1. Constants
# =============================================================================================

# Official Track 1 ids (the submission values), ENTRep challenge page (../shared/ENTREP.md).
LABELS: tuple[str, ...] = ("nose-right", "nose-left", "ear-right", "ear-left", "vc-open", "vc-closed", "throat")
LABEL_TO_ID: dict[str, int] = {name: i for i, name in enumerate(LABELS)}

# The paper's coarse level: 4 anatomical regions, and the label -> region map.
COARSE_CLASSES: tuple[str, ...] = ("ear", "nose", "vc", "throat")
COARSE_TO_ID: dict[str, int] = {name: i for i, name in enumerate(COARSE_CLASSES)}
LABEL_TO_COARSE: dict[str, str] = {"nose-right": "nose", "nose-left": "nose", "ear-right": "ear", "ear-left": "ear",
                                   "vc-open": "vc", "vc-closed": "vc", "throat": "throat"}
LABEL_ID_TO_COARSE_ID: tuple[int, ...] = tuple(COARSE_TO_ID[LABEL_TO_COARSE[name]] for name in LABELS)  # (1,1,0,0,2,2,3)

# The paper's fine decisions: one binary classifier per region with two labels (ear side, nose side,
# vocal-cord state). A binary head's output 1 is the pair's second label. Throat has none.
FINE_TASKS: dict[str, tuple[str, str]] = {
    "ear": ("ear-left", "ear-right"),
    "nose": ("nose-left", "nose-right"),
    "vc": ("vc-open", "vc-closed"),
}
# DINOv2 heads: the coarse 4-way classifier and the three binary decisions (output sizes).
DINO_TASKS: dict[str, int] = {"coarse": len(COARSE_CLASSES), **{task: 2 for task in FINE_TASKS}}
# dino_heads parameter: "shared" = one backbone with all four heads (this notebook's default);
# "separate" = the paper's diagram, four SurgeNet models each fine-tuned for one decision, a binary one
# on its region's images only. {model name: its heads}.
DINO_MODEL_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "shared": {"shared": tuple(DINO_TASKS)},
    "separate": {task: (task,) for task in DINO_TASKS},
}

# A horizontal flip mirrors the anatomy: left <-> right for ear and nose; vocal-cord state and throat
# are unchanged (ENTREP.md: the Track 1 winner's flip with label swap; a plain flip corrupts sides).
FLIP_LABEL: dict[str, str] = {"nose-right": "nose-left", "nose-left": "nose-right", "ear-right": "ear-left",
                              "ear-left": "ear-right", "vc-open": "vc-open", "vc-closed": "vc-closed", "throat": "throat"}

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Prompt templates for text prototypes. The paper does not publish its prompts; its diagram's example
# is "An endoscopic image of the right nasal passage." The others follow CLIP's prompt ensembling
# (Radford et al. 2021) and BiomedCLIP's model card ("this is a photo of {}").
PROMPT_TEMPLATES: tuple[str, ...] = (
    "An endoscopic image of the {}.",  # the paper's diagram
    "this is a photo of {}.",  # BiomedCLIP model card
    "an ENT endoscopy image of the {}.",
    "an otolaryngology endoscopic view of the {}.",
)
# What each region / label shows through the endoscope (project wording; side = the patient's side).
COARSE_CLASS_TEXTS: dict[str, tuple[str, ...]] = {
    "ear": ("ear canal and tympanic membrane", "ear", "eardrum"),
    "nose": ("nasal passage", "nasal cavity", "nasal septum and turbinates"),
    "vc": ("vocal cords", "larynx and glottis", "vocal folds"),
    "throat": ("throat", "oropharynx", "pharynx and tonsils"),
}
FINE_CLASS_TEXTS: dict[str, tuple[str, ...]] = {
    "nose-right": ("right nasal passage", "right nasal cavity"),
    "nose-left": ("left nasal passage", "left nasal cavity"),
    "ear-right": ("right ear canal and tympanic membrane", "right ear"),
    "ear-left": ("left ear canal and tympanic membrane", "left ear"),
    "vc-open": ("open vocal cords during breathing", "abducted vocal folds"),
    "vc-closed": ("closed vocal cords during phonation", "adducted vocal folds"),
    "throat": ("throat", "oropharynx"),
}

# BiomedCLIP (Zhang et al. 2023), the paper's CLIP model, and the hub repository of its text tower.
BIOMEDCLIP_HUB_ID: str = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_TEXT_HUB_ID: str = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
# Files of each hub repository an offline copy needs (README "BiomedCLIP offline"; biomedclip_offline.py).
BIOMEDCLIP_FILES: tuple[str, ...] = ("open_clip_config.json", "open_clip_pytorch_model.bin", "tokenizer.json",
                                     "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
HF_TEXT_FILES: tuple[str, ...] = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                                  "special_tokens_map.json")
# A tiny random CLIP for CPU tests and the demo: open_clip's own towers and bundled tokenizer, offline.
TINY_CLIP_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# DINOv2 pretrained on SurgeNetXL (Jaspers et al.; SurgeNetDINO release). The released ViT-B file is a
# flat dict of timm-named tensors with NO register tokens, pos_embed (1, 577, 768) = CLS + 24x24 at
# 336 px, a mask_token and no head; the authors load it into timm's plain `vit_base_patch14_dinov2`
# (their load_vit_models.py). build_dino reads width, registers, depth and grid from the file itself.
SURGENET_VITB_URL: str = ("https://huggingface.co/rlpddejong/SurgeNetXL_DINOv1-v3/resolve/main/"
                          "DINOv2_ViTb14_size336_SurgeNetXL.pth")
DINO_DEFAULT_ARCH: str = "vit_base_patch14_dinov2"  # the paper's ViT-B/14 when no file says otherwise
DINO_SIZE_BY_WIDTH: dict[int, tuple[str, int]] = {384: ("small", 12), 768: ("base", 12), 1024: ("large", 24),
                                                  1536: ("giant", 40)}  # width -> (timm size, depth)
# build_dino("tiny"): the released file's structure (plain DINOv2, no registers) at toy size, offline.
# init_values=1.0: at DINOv2's 1e-5 LayerScale a random tiny model sees every image alike.
DINO_TINY_KWARGS: Mapping[str, float] = {"embed_dim": 96, "depth": 3, "num_heads": 3, "init_values": 1.0}
# Wrappers and prefixes of DINO checkpoints: DINOv2 training saves {"teacher": {"backbone.*", "dino_head.*"}},
# trainers {"model": ...} / {"state_dict": ...}, DDP "module.", torch.compile "_orig_mod.".
CHECKPOINT_WRAPPER_KEYS: tuple[str, ...] = ("teacher", "model", "state_dict", "module")
CHECKPOINT_KEY_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "backbone.")
IGNORED_CHECKPOINT_PREFIXES: tuple[str, ...] = ("head.", "dino_head.", "ibot_head.")

# DINOv2 training augmentation of the cached square (project's choice): the crop keeps >= 70% of the
# field of view, +-15 deg mimics scope roll, black fill matches the endoscope background. Horizontal
# flips are done with the label swap (SquareImages), never by timm.
DINO_TRAIN_AUGMENT: Mapping[str, object] = {"scale": (0.7, 1.0), "ratio": (3 / 4, 4 / 3), "rotate_degrees": 15.0,
                                            "color_jitter": 0.2}
TRAIN_CACHE_SCALE: float = 1.15  # training squares are cached this much larger than the input, for crops

# Grids searched on validation data only (project's choices).
PROTOTYPE_WEIGHT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))  # 0 text .. 1 image
PROTOTYPE_TEMPERATURE_GRID: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)  # CLIP's is 0.01
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(101))  # hybrid confidence
WEIGHT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))  # soft fusion
RERANK_BETA_GRID: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # region re-ranking boost
FUSION_WEIGHTS: tuple[float, ...] = (0.25, 0.5, 0.75)  # score fusion of two retrieval embeddings
FUSION_FOLDS: int = 5  # cross-fitting folds for the fusion choice
# A binary head's p(second label) above this picks the second label (argmax over [1 - p, p]; 0.5 -> first).
FINE_DECISION_THRESHOLD: float = 0.5

# Parameter values with a meaning of their own.
SPLITS: tuple[str, ...] = ("grouped", "stratified")  # examination-grouped (default) or the paper's plain split
RETRIEVAL_GALLERIES: tuple[str, ...] = ("test_folders", "lists", "all")  # see retrieval_gallery
RETRIEVAL_TUNINGS: tuple[str, ...] = ("tail", "lora", "off")  # see RetrievalConfig; "off": frozen, as the paper

# Submission files (ENTREP.md): each zip holds exactly one JSON at its root.
SUBMISSIONS: dict[str, tuple[str, str]] = {
    "track1": ("submission.zip", "submission.json"),  # {"<image file>": <int 0-6>}
    "track2": ("submission_i2i.zip", "submission_i2i.json"),  # {"<query image>": "<image>"}, never itself
    "track3": ("submission_t2i.zip", "submission_t2i.json"),  # {"<query text as given>": "<image>"}
}

# =============================================================================================
# 2. Setup: parameters, device, paths, weights files, JSON and figures
# =============================================================================================


def check_params(p: Mapping[str, object]) -> None:
    """Check the notebook's parameters before any heavy work; one ValueError lists every bad one with
    a value that works. Only the keys present are checked."""
    problems = []

    def need(name: str, ok: Callable[[object], bool], fix: str) -> None:
        if name in p:
            try:
                good = ok(p[name])
            except (TypeError, ValueError):
                good = False
            if not good:
                problems.append(f"{name}={p[name]!r}: {fix}")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # YAML reads 1e-3 as text
    need("image_size", lambda v: is_int(v) and v >= 14 and v % 14 == 0,
         "use a multiple of DINOv2's patch size 14 (224 or 336; SurgeNet was trained at 336)")
    need("epochs", lambda v: is_int(v) and v >= 1, "use 1 or more fine-tuning epochs (20 by default)")
    need("batch_size", lambda v: is_int(v) and v >= 1, "use 1 or more images per batch (32 by default)")
    need("seed", is_int, "use an integer")
    need("val_fraction", lambda v: is_num(v) and 0 < v < 1, "use a share strictly between 0 and 1, e.g. 0.1")
    need("num_workers", lambda v: is_int(v) and v >= -1, "use -1 (automatic), 0 or a number of workers")
    need("lr_head", lambda v: is_num(v) and v > 0, "use a positive learning rate, e.g. 1e-3")
    need("lr_backbone", lambda v: is_num(v) and v >= 0, "use a learning rate >= 0, e.g. 2e-5 (0 freezes the backbone)")
    need("split", lambda v: v in SPLITS, f"use one of {SPLITS}")
    need("dino_heads", lambda v: v in DINO_MODEL_SETS, f"use one of {tuple(DINO_MODEL_SETS)}")
    need("retrieval_gallery", lambda v: v in RETRIEVAL_GALLERIES, f"use one of {RETRIEVAL_GALLERIES}")
    need("dino_gpus", lambda v: v == "auto" or (is_int(v) and v >= 1), "use 'auto' or a number of GPUs >= 1")
    need("retrieval_tuning", lambda v: v in RETRIEVAL_TUNINGS, f"use one of {RETRIEVAL_TUNINGS}")
    need("retrieval_epochs", lambda v: is_int(v) and v >= 1, "use 1 or more epochs (10 by default)")
    need("retrieval_lr", lambda v: is_num(v) and v > 0, "use a positive learning rate, e.g. 1e-5 (LoRA: about 1e-4)")
    need("clip_model", lambda v: v == "tiny" or str(v).startswith(("hf-hub:", "local-dir:")),
         f"use 'hf-hub:<repo>' (default {BIOMEDCLIP_HUB_ID}), 'local-dir:<folder>' or 'tiny'")
    need("dino_model", lambda v: v in ("auto", "tiny") or (v in timm.list_models("*dinov2*")),
         "use 'auto' (the architecture the weights file holds), 'tiny', or a timm DINOv2 name "
         "such as vit_base_patch14_dinov2")
    need("dino_weights", lambda v: v in ("", "auto", "random") or urlparse(v).scheme in ("http", "https")
         or Path(v).expanduser().is_file(),
         "use 'auto' (a *SurgeNet*.pth under /kaggle/input), a .pth path or URL, '' (timm's LVD-142M weights, "
         "downloaded) or 'random'")
    need("device", lambda v: resolve_device(v).type != "cuda" or torch.cuda.is_available(),
         "no CUDA GPU is visible: use 'auto' or 'cpu' (on Kaggle, switch the accelerator on)")
    if problems:
        raise ValueError("Parameters to fix before the run starts:\n- " + "\n- ".join(problems))


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> the first CUDA GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype a device runs fastest and safely, or None for plain fp32: bf16 on GPUs
    with native bf16 (A100/H100) and CPUs with AVX512-BF16/AMX, fp16 on older GPUs (T4, P100; training
    then uses a GradScaler), else None."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and any(flag in _cpu_flags() for flag in ("avx512_bf16", "amx_bf16")):
        return torch.bfloat16
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}
    except OSError:
        return set()


def resolve_amp(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """"auto" -> autocast_dtype(device); "bf16" / "fp16" / "fp32" (or a dtype, None) force one."""
    if amp == "auto":
        return autocast_dtype(device)
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, None: None,
             torch.bfloat16: torch.bfloat16, torch.float16: torch.float16, torch.float32: None}
    if amp not in names:
        raise ValueError(f"amp={amp!r}: use 'auto', 'bf16', 'fp16' or 'fp32'.")
    return names[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype` on `device`, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_count() -> int:
    """CPUs this process may use (its affinity where the OS has one, e.g. not macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers: 0 on a CPU run (the model needs the cores), else one per core up to 8."""
    return 0 if device.type == "cpu" else min(8, cpu_count())


def resolve_gpus(gpus: int | str, device: torch.device) -> int:
    """GPUs DINOv2 fine-tuning spreads each batch over (torch DataParallel): "auto" -> every visible GPU
    on a CUDA run (Kaggle T4 x2: 2), else 1."""
    if device.type != "cuda":
        return 1
    visible = torch.cuda.device_count()
    if gpus != "auto" and gpus > visible:
        raise ValueError(f"dino_gpus={gpus} but {visible} GPU(s) are visible: use 'auto' or a smaller number.")
    return visible if gpus == "auto" else int(gpus)


def resolve_data_path(data_path: str, search_roots: Sequence[str | os.PathLike] = ("/kaggle/input",)) -> Path:
    """The folder to load: "auto" -> the common parent of every ENTRep annotation file under the first
    search root that has any (a Kaggle input, whatever the data set is called); else the path given."""
    if data_path != "auto":
        return Path(data_path).expanduser()
    for base in map(Path, search_roots):
        found = find_annotation_files(base) if base.is_dir() else []
        if found:
            return Path(os.path.commonpath([str(p.parent) for p in found]))
    raise FileNotFoundError(
        f"No ENTRep data found: searched {list(map(str, search_roots))} for {sorted(ANNOTATION_FILES)}. On Kaggle, "
        "add the ENTRep data set as input; elsewhere set data_path to its folder, or use data_path='demo'.")


def resolve_dino_weights(dino_weights: str, dino_model: str,
                         search_roots: Sequence[str | os.PathLike] = ("/kaggle/input",)) -> tuple[str, str]:
    """The `dino_weights` parameter -> (what build_dino loads, a sentence saying what is used and why).

    "auto" looks for a SurgeNet DINOv2 checkpoint (`*SurgeNet*.pth`; with a named dino_model, the one of
    its size, else ViT-B first) under search_roots; none found -> "" (timm's LVD-142M DINOv2 weights).
    """
    found = sorted(p for root in map(Path, search_roots) if root.is_dir() for p in root.rglob("*.pth")
                   if "surgenet" in p.name.lower() and "dinov2" in p.name.lower())
    if dino_model == "tiny":
        unused = f" (the SurgeNet file {found[0]} is not used)" if found and dino_weights == "auto" else ""
        return "", f"a tiny random ViT built offline for the demo and tests{unused}; no pretrained weights"
    if dino_weights == "auto":
        size = next((tag for key, tag in (("small", "vits14"), ("base", "vitb14"), ("large", "vitl14"), ("giant", "vitg14"))
                     if key in dino_model), "vitb14")
        if dino_model != "auto":  # a named model takes only a file of its size
            found = [p for p in found if size in p.name.lower()]
        found.sort(key=lambda p: size not in p.name.lower())  # else ViT-B first, stable otherwise
        dino_weights = str(found[0]) if found else ""
        if not found:
            warnings.warn(f"dino_weights='auto' found no *SurgeNet*DINOv2*.pth under {list(map(str, search_roots))}: "
                          "fine-tuning starts from timm's LVD-142M DINOv2 weights instead (downloaded). Attach "
                          f"DINOv2_ViTb14_size336_SurgeNetXL.pth ({SURGENET_VITB_URL}) or set dino_weights.")
    if dino_weights == "":
        return "", "timm's pretrained DINOv2 weights (LVD-142M, downloaded from the Hugging Face hub): no SurgeNet"
    if dino_weights == "random":
        return "random", "random initialisation (a smoke test, not the method)"
    return dino_weights, f"SurgeNet DINOv2 checkpoint {dino_weights}"


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temp file, then rename), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, (np.ndarray, Path, torch.device, torch.dtype)):
        return o.tolist() if isinstance(o, np.ndarray) else str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a Figure, creating the folder; returns the path (the notebook shows the PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temp file beside `path`, then os.replace: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# =============================================================================================
# 3. Data: every ENTRep layout, problems, leakage, test lists, the validation split
# =============================================================================================

# Folders and files a Mac zip leaves behind (ENTREP.md): never data.
_JUNK_DIRS = {"__MACOSX", ".ipynb_checkpoints", ".git"}
# Words that mark a header row in the otherwise headerless test CSVs.
_CSV_HEADER_WORDS = {"image", "images", "img", "file", "filename", "file_name", "path", "name", "id", "text",
                     "query", "caption"}
ANNOTATION_FILES = {"cls.json", "i2i.json", "t2i.json", "data.json", "cls.csv", "i2i.csv", "t2i.csv"}
# Kinds of data.problems that describe something handled, not something lost.
NOTE_KINDS = {"name-case", "duplicate", "csv-header"}


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded; the message names the file and what to do."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any image file to 8-bit RGB, upright by its EXIF orientation. 16-bit and float modes are
    rescaled, transparency is composited on black (the endoscope background). Empty, truncated or
    non-image files raise ImageDecodeError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        why = "the file is empty (0 bytes)" if path.exists() and path.stat().st_size == 0 else f"{type(e).__name__}: {e}"
        raise ImageDecodeError(f"{path}: cannot decode image ({why}). Re-export or re-download this file, or "
                               "remove it from the annotation; it is listed as skipped.") from e
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.has_transparency_data:  # an alpha band, or a transparent colour (PNG tRNS) in any mode
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def load_thumbnail(path: str | os.PathLike, px: int = 256) -> np.ndarray:
    """load_rgb shrunk to fit px x px, (H, W, 3) uint8: what the figures draw."""
    im = load_rgb(path)
    im.thumbnail((px, px))
    return np.asarray(im)


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes: the content identity of leakage checks, duplicates and every cache."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_image(path: Path) -> tuple[str, str, tuple[int, int] | None]:
    """(sha1, decode error or "", (width, height) or None) of one image file."""
    sha1 = file_sha1(path)
    try:
        im = load_rgb(path)
        return sha1, "", im.size
    except ImageDecodeError as e:
        return sha1, str(e), None


def normalize_label(raw: object) -> str | None:
    """A label as written in an annotation (`Ear_Left `, `VC open`) -> one of LABELS, or None."""
    if not isinstance(raw, str):
        return None
    s = re.sub(r"[\s_\-]+", "-", unicodedata.normalize("NFKC", raw).strip().lower())
    s = {"vocal-cords-open": "vc-open", "vocal-cords-closed": "vc-closed", "vc-close": "vc-closed"}.get(s, s)
    return s if s in LABEL_TO_ID else None


def split_finding_lines(description: str) -> list[str]:
    """A description's finding lines (split on \\r\\n / \\n / \\r), stripped, empties dropped."""
    lines = (line.strip(" \t-\u2022") for line in re.split(r"\r\n|\r|\n", description or ""))
    return [line for line in lines if line]


def finding_key(text: str) -> str:
    """A finding line compared case-, space- and end-punctuation-insensitively (one line, one key)."""
    return re.sub(r"\s+", " ", text.casefold()).strip(" .,;:")


@dataclass
class FileIndex:
    """Every image file under a root, looked up by name case-insensitively (the `_image` / `_Image` defect)."""

    root: Path
    by_lower_name: dict[str, list[Path]]

    @classmethod
    def build(cls, root: Path) -> FileIndex:
        by_lower_name: dict[str, list[Path]] = defaultdict(list)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
            for name in sorted(filenames):
                if not name.startswith("._") and name.lower().endswith(IMAGE_EXTENSIONS):
                    by_lower_name[unicodedata.normalize("NFC", name).lower()].append(Path(dirpath) / name)
        return cls(Path(root), dict(by_lower_name))

    def resolve(self, name: str, near: Path) -> tuple[Path | None, str]:
        """The file called `name` (a bare name or a relative path) nearest to folder `near`: an exact-case
        match before a case-insensitive one, then the longest common folder prefix with `near`, then the
        shallowest. Returns (path or None, note): note "" (exact), "case" or "missing"."""
        base = unicodedata.normalize("NFC", Path(str(name).replace("\\", "/")).name)
        candidates = self.by_lower_name.get(base.lower(), [])
        if not candidates:
            return None, "missing"
        exact = [p for p in candidates if p.name == base]
        near_parts = Path(near).resolve().parts

        def closeness(p: Path) -> tuple[int, int]:
            shared = next((i for i, (a, b) in enumerate(zip(p.resolve().parts, near_parts)) if a != b),
                          min(len(p.resolve().parts), len(near_parts)))
            return shared, -len(p.parts)

        return max(exact or candidates, key=closeness), "" if exact else "case"


@dataclass
class EntrepData:
    """Tidy tables of everything found under a data root.

    images     one row per labelled image: path, file, source, release, label, label_id, coarse,
               description_en, description_vi, type, sha1, width, height
    i2i        query, match (file names), query_path, match_path, source
    t2i        text, file, path, source
    queries    {"cls" | "i2i": DataFrame(file, path, source, sha1), "t2i": DataFrame(text, source)};
               a query whose image is skipped keeps its row with an empty path
    folder_images  every readable image in a folder that holds a test-list image, listed or not:
               file, path, sha1, folder (the retrieval database is wider than the lists, ENTREP.md)
    problems   where (annotation file), item, kind, message; kinds in NOTE_KINDS were handled
    inventory  every referenced image (and every test-folder image) with its status and reason
    sha1       {path: content SHA-1} of every readable image found
    """

    root: Path
    images: pd.DataFrame
    i2i: pd.DataFrame
    t2i: pd.DataFrame
    queries: dict[str, pd.DataFrame]
    folder_images: pd.DataFrame
    problems: pd.DataFrame
    inventory: pd.DataFrame
    sha1: dict[str, str]
    layouts: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """Images per label (rows) and source (columns), with totals."""
        if self.images.empty:
            return pd.DataFrame()
        table = pd.crosstab(self.images["label"], self.images["source"], margins=True, margins_name="total")
        return table.loc[[lab for lab in LABELS if lab in table.index] + ["total"]]

    def problem_lines(self) -> list[str]:
        """One line per kind of problem: its count, one example message, and whether it was handled."""
        lines = []
        for kind, group in self.problems.groupby("kind", sort=False):
            level = "note" if kind in NOTE_KINDS else "PROBLEM"
            more = f" (+{len(group) - 1} more in metrics.json)" if len(group) > 1 else ""
            lines.append(f"{level} [{kind}] x{len(group)}: {group['message'].iloc[0]}{more}")
        return lines


class _Collector:
    """Resolves the images annotation files refer to, records problems and an inventory, and checks
    every distinct image once (content hash and decode) after the annotations are read."""

    def __init__(self, root: Path):
        self.index = FileIndex.build(root)
        self.problems: list[dict] = []
        self.inventory: list[dict] = []
        self.checked: dict[Path, tuple[str, str, tuple[int, int] | None]] = {}

    def problem(self, where: Path | str, item: str, kind: str, message: str) -> None:
        self.problems.append({"where": str(where), "item": item, "kind": kind, "message": message})

    def image(self, name: str, where: Path, role: str) -> Path | None:
        """Resolve one referenced image name near its annotation file; None (and a problem) when missing."""
        path, note = self.index.resolve(name, where.parent)
        if path is None:
            self.problem(where, name, "missing-file", f"{where}: '{name}' is referenced but no file of that name "
                         f"exists under {self.index.root}. Add the file or remove the entry; it is skipped.")
        elif note == "case":
            self.problem(where, name, "name-case", f"{where}: '{name}' matched '{path.name}' only "
                         "case-insensitively (a known ENTRep defect); that file is used.")
        self.inventory.append({"where": str(where), "item": name, "role": role, "path": str(path or ""),
                               "status": "loaded" if path else "skipped", "reason": "" if path else "missing"})
        return path

    def check_all(self, extra: Iterable[Path] = ()) -> None:
        """Hash and decode every resolved image (and `extra`) once, in threads (PIL releases the GIL)."""
        todo = sorted({Path(e["path"]) for e in self.inventory if e["path"]} | set(extra))
        with ThreadPoolExecutor(min(8, cpu_count() + 2)) as pool:
            self.checked = dict(zip(todo, pool.map(check_image, todo)))
        for e in self.inventory:
            error = e["path"] and self.checked[Path(e["path"])][1]
            if error:
                e.update(status="skipped", reason="undecodable")
        for path, (_, error, _) in self.checked.items():
            if error:
                self.problem(path.parent, path.name, "undecodable", error)

    def ok(self, path: Path | None) -> bool:
        return path is not None and not self.checked[path][1]


def _read_json(path: Path, col: _Collector):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        col.problem(path, path.name, "bad-annotation", f"{path}: not valid UTF-8 JSON ({e}). Re-download the "
                    "file; it is ignored.")
        return None


def _label_row(col: _Collector, where: Path, name: str, raw_label: object, source: str, release: str,
               **extra) -> dict | None:
    label = normalize_label(raw_label)
    if label is None:
        col.problem(where, name, "unknown-label", f"{where}: '{name}' has label {raw_label!r}, which is not one of "
                    f"{list(LABELS)} (case, spaces and '_' are already forgiven). Fix the label; the image is skipped.")
        col.inventory.append({"where": str(where), "item": name, "role": "labelled", "path": "", "status": "skipped",
                              "reason": "unknown-label"})
        return None
    path = col.image(name, where, "labelled")
    return path and {"path": path, "source": source, "release": release, "label": label, **extra}


def _source_name(annotation: Path, root: Path) -> str:
    """A short name for where an annotation came from: its folder relative to the root."""
    rel = annotation.parent.resolve().relative_to(root.resolve()).as_posix()
    return root.name if rel == "." else rel


def _load_train_release(path: Path, root: Path, col: _Collector, rows: list, i2i: list, t2i: list) -> None:
    """`cls.json` / `i2i.json` / `t2i.json`: one-line JSON objects beside an image folder."""
    data = _read_json(path, col)
    if not isinstance(data, dict):
        if data is not None:
            col.problem(path, path.name, "bad-annotation", f"{path}: expected a JSON object; ignored.")
        return
    source, kind = _source_name(path, root), path.stem.lower()
    for key, value in data.items():
        if kind == "cls":
            row = _label_row(col, path, key, value, source, "train", description_en="", description_vi="", type="")
            if row:
                rows.append(row)
        elif kind == "i2i":
            q, m = col.image(key, path, "i2i-query"), col.image(str(value), path, "i2i-match")
            if q and m:
                i2i.append({"query_path": q, "match_path": m, "source": source})
        else:  # t2i
            m = col.image(str(value), path, "t2i-target")
            if m:
                t2i.append({"text": key, "path": m, "source": source})


def _load_public_release(path: Path, root: Path, col: _Collector, rows: list) -> None:
    """`data.json`: an array of {Path, Classification, Type, Description, DescriptionEN} records."""
    data = _read_json(path, col)
    if not isinstance(data, list):
        if data is not None:
            col.problem(path, path.name, "bad-annotation", f"{path}: expected a JSON array of records; ignored.")
        return
    source = _source_name(path, root)
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not rec.get("Path"):
            col.problem(path, f"record {i}", "bad-annotation", f"{path}: record {i} has no 'Path'; skipped.")
            col.inventory.append({"where": str(path), "item": f"record {i}", "role": "labelled", "path": "",
                                  "status": "skipped", "reason": "bad-record"})
            continue
        row = _label_row(col, path, str(rec["Path"]), rec.get("Classification"), source, "public",
                         description_en=str(rec.get("DescriptionEN") or ""),
                         description_vi=str(rec.get("Description") or ""), type=str(rec.get("Type") or ""))
        if row:
            rows.append(row)


def read_query_csv(path: Path) -> tuple[list[str], bool]:
    """Entries of a headerless one-column test list (BOM, CRLF, quoted fields allowed) and whether its
    first line was a header. Image names are stripped; t2i texts are kept exactly as written (their
    spaces are part of the query). A row split on unquoted commas is joined back."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [",".join(r) for r in csv.reader(f)]
    entries = [r if path.stem.lower() == "t2i" else r.strip() for r in rows]
    entries = [e for e in entries if e.strip()]
    had_header = bool(entries) and entries[0].strip().lower() in _CSV_HEADER_WORDS
    return (entries[1:] if had_header else entries), had_header


def _load_queries(path: Path, root: Path, col: _Collector, queries: dict) -> None:
    kind = path.stem.lower()
    entries, had_header = read_query_csv(path)
    if had_header:
        col.problem(path, "", "csv-header", f"{path}: the first line looks like a header and was not used as a query.")
    if not entries:
        col.problem(path, "", "empty-list", f"{path}: the list is empty; Track '{kind}' has nothing to answer.")
    source = _source_name(path, root)
    for e in entries:
        if kind == "t2i":
            queries["t2i"].append({"text": e, "source": source})
        else:
            queries[kind].append({"file": e, "path": col.image(e, path, f"{kind}-query"), "source": source})


def _class_folder_rows(col: _Collector, claimed: set[Path]) -> list[dict]:
    """`<split>/<class>/<file>.png` trees: images in a folder named like a label, not claimed by an annotation."""
    rows = []
    for p in sorted(p for paths in col.index.by_lower_name.values() for p in paths):
        label = normalize_label(p.parent.name)
        if label and p not in claimed:
            col.inventory.append({"where": str(p.parent), "item": p.name, "role": "labelled", "path": str(p),
                                  "status": "loaded", "reason": ""})
            rows.append({"path": p, "source": p.parent.parent.name or "folders", "release": "folders",
                         "label": label, "description_en": "", "description_vi": "", "type": ""})
    return rows


def find_annotation_files(root: str | os.PathLike) -> list[Path]:
    """Every ENTRep annotation or test-list file under root, in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
        out += [Path(dirpath) / n for n in sorted(filenames) if n.lower() in ANNOTATION_FILES and not n.startswith("._")]
    return out


def load_entrep(root: str | os.PathLike, strict_labels: bool = False) -> EntrepData:
    """Find and load every ENTRep layout under `root` (ENTREP.md "Data layouts seen").

    Train release (cls/i2i/t2i.json), public release (data.json), test lists (cls/i2i/t2i.csv) and
    class-folder trees are read wherever they sit; images are found by name anywhere under root, exact
    case first. Every referenced image, and every image in a folder that holds a test-list image, is
    hashed and decoded once. Nothing is dropped silently: `inventory` lists each as loaded or skipped
    with its reason, and `problems` names the file and the fix. strict_labels: an unknown label raises.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_path '{root}' is not a folder. Point data_path at the unpacked ENTRep "
                                "data, or use data_path='demo' for the synthetic demo set.")
    col = _Collector(root)
    rows, i2i, t2i, layouts = [], [], [], []
    queries: dict[str, list] = {"cls": [], "i2i": [], "t2i": []}
    for path in find_annotation_files(root):
        name, rel = path.name.lower(), path.relative_to(root)
        if name.endswith(".csv"):
            _load_queries(path, root, col, queries)
            layouts.append(f"test list: {rel}")
        elif name == "data.json":
            _load_public_release(path, root, col, rows)
            layouts.append(f"public release: {rel}")
        else:
            _load_train_release(path, root, col, rows, i2i, t2i)
            layouts.append(f"train release: {rel}")
    folder_rows = _class_folder_rows(col, {r["path"] for r in rows})
    rows += folder_rows
    layouts += [f"class folder: {f.relative_to(root)}" for f in sorted({r["path"].parent for r in folder_rows})]
    if not layouts:
        raise FileNotFoundError(f"No ENTRep data under '{root}': searched for {sorted(ANNOTATION_FILES)} and "
                                "<split>/<class>/*.png folders. Set data_path to the folder holding them, or use 'demo'.")
    if strict_labels and any(p["kind"] == "unknown-label" for p in col.problems):
        raise ValueError("Unknown labels:\n" + "\n".join(p["message"] for p in col.problems if p["kind"] == "unknown-label"))

    test_folders = {q["path"].parent for k in ("cls", "i2i") for q in queries[k] if q["path"]}
    in_folders = [p for paths in col.index.by_lower_name.values() for p in paths if p.parent in test_folders]
    referenced = {Path(e["path"]) for e in col.inventory if e["path"]}
    for p in sorted(set(in_folders) - referenced):
        col.inventory.append({"where": str(p.parent), "item": p.name, "role": "test-folder", "path": str(p),
                              "status": "loaded", "reason": ""})
    col.check_all()
    sha1 = {str(p): facts[0] for p, facts in col.checked.items() if not facts[1]}

    def image_row(r: dict) -> dict:
        _, _, (width, height) = col.checked[r["path"]]
        return {**r, "path": str(r["path"]), "file": r["path"].name, "label_id": LABEL_TO_ID[r["label"]],
                "coarse": LABEL_TO_COARSE[r["label"]], "sha1": sha1[str(r["path"])], "width": width, "height": height}

    images = pd.DataFrame([image_row(r) for r in rows if col.ok(r["path"])],
                          columns=["path", "file", "source", "release", "label", "label_id", "coarse", "description_en",
                                   "description_vi", "type", "sha1", "width", "height"])
    images, duplicates = _drop_duplicate_records(images)
    pairs = [{"query": r["query_path"].name, "match": r["match_path"].name, "query_path": str(r["query_path"]),
              "match_path": str(r["match_path"]), "source": r["source"]}
             for r in i2i if col.ok(r["query_path"]) and col.ok(r["match_path"])]
    captions = [{**r, "file": r["path"].name, "path": str(r["path"])} for r in t2i if col.ok(r["path"])]
    lists = {k: pd.DataFrame([{"file": q["file"], "path": str(q["path"]) if col.ok(q["path"]) else "",
                               "source": q["source"], "sha1": sha1.get(str(q["path"]), "")} for q in queries[k]],
                             columns=["file", "path", "source", "sha1"]) for k in ("cls", "i2i")}
    lists["t2i"] = pd.DataFrame(queries["t2i"], columns=["text", "source"])
    folder_images = pd.DataFrame([{"file": p.name, "path": str(p), "sha1": sha1[str(p)], "folder": str(p.parent)}
                                  for p in sorted(in_folders) if col.ok(p)], columns=["file", "path", "sha1", "folder"])
    return EntrepData(
        root=root, images=images,
        i2i=pd.DataFrame(pairs, columns=["query", "match", "query_path", "match_path", "source"]),
        t2i=pd.DataFrame(captions, columns=["text", "file", "path", "source"]), queries=lists,
        folder_images=folder_images,
        problems=pd.concat([pd.DataFrame(col.problems, columns=["where", "item", "kind", "message"]), duplicates],
                           ignore_index=True),
        inventory=pd.DataFrame(col.inventory, columns=["where", "item", "role", "path", "status", "reason"]),
        sha1=sha1, layouts=layouts)


def _drop_duplicate_records(images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first labelled record of each image content; report copies and conflicting labels."""
    first = images.groupby("sha1", sort=False)[["path", "label"]].transform("first")
    copies = images[first["path"] != images["path"]]
    problems = [{"where": row.source, "item": row.file, "kind": "duplicate" if row.label == keep.label else "label-conflict",
                 "message": f"'{row.path}' has the same bytes as '{keep.path}'"
                 + ("" if row.label == keep.label else f" but label {row.label!r} vs {keep.label!r}")
                 + "; the first record is kept."}
                for row, keep in zip(copies.itertuples(), first.loc[copies.index].itertuples())]
    return (images.drop(index=copies.index).reset_index(drop=True),
            pd.DataFrame(problems, columns=["where", "item", "kind", "message"]))


def find_leakage(data: EntrepData) -> pd.DataFrame:
    """Test-list images whose bytes equal a labelled image (ENTREP.md: 71 public-test images are train
    images). One row per (track, test file, labelled copy, its label)."""
    labelled = data.images[["sha1", "file", "label"]].rename(columns={"file": "labelled_file"})
    hits = [q[q["sha1"] != ""].merge(labelled, on="sha1").assign(track=track) for track, q in data.queries.items()
            if track != "t2i"]
    return pd.concat(hits, ignore_index=True)[["track", "file", "labelled_file", "label"]].drop_duplicates()


def select_test_queries(queries: Mapping[str, pd.DataFrame], test_split: str = "auto") -> dict[str, pd.DataFrame]:
    """One test list per track, never several merged (public and private test sets may both be attached).
    "auto" keeps a track's only list and refuses to guess between several; any other value keeps the
    lists whose folder contains it, case-insensitively (e.g. "Private")."""
    out = {}
    for track, q in queries.items():
        sources = list(dict.fromkeys(q["source"]))
        keep = sources if test_split == "auto" else [s for s in sources if test_split.lower() in s.lower()]
        if len(keep) > 1:
            raise ValueError(f"Track '{track}' has test lists in {keep}: set the test_split parameter to part of one "
                             "folder name (e.g. 'Public' or 'Private') so that one test set is answered.")
        out[track] = q[q["source"].isin(keep)].reset_index(drop=True)
    return out


def exam_id(file: str) -> str:
    """Examination of a public-release file `<8 digits>_<18 digits>_<3 digits>_imageNN.png`: its first two
    fields (one examination's images share them); the file name itself otherwise."""
    m = re.match(r"^(\d{8}_\d{18})_", file)
    return m.group(1) if m else file


def split_groups(images: pd.DataFrame, i2i: pd.DataFrame) -> np.ndarray:
    """Group id per image row: rows linked by identical bytes, an i2i pair or one examination share a
    group, so a split by group never separates them (union-find)."""
    parent = list(range(len(images)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    members: dict[str, list[int]] = defaultdict(list)
    for i, (sha, file) in enumerate(zip(images["sha1"], images["file"])):
        for key in (f"sha:{sha}", f"file:{file.lower()}", f"exam:{exam_id(file)}"):
            members[key].append(i)
    linked = list(members.values()) + [members.get(f"file:{q.lower()}", []) + members.get(f"file:{m.lower()}", [])
                                       for q, m in zip(i2i["query"], i2i["match"])]
    for group in linked:
        for m in group[1:]:
            parent[find(m)] = find(group[0])
    return np.array([find(i) for i in range(len(images))])


def grouped_fold_ids(labels: Sequence[int], groups: Sequence[int], n_splits: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id per sample (0..k-1), stratified by label and grouped (scikit-learn's StratifiedGroupKFold).
    k is capped by the number of groups and by the largest class (sklearn refuses more folds than any
    class has members); when no class has two members the folds are grouped only (GroupKFold); with
    fewer than two groups every sample is in fold 0."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(np.unique(groups))
    largest = np.bincount(np.unique(labels, return_inverse=True)[1]).max() if len(labels) else 0
    k = min(n_splits, n_groups, largest)
    if k >= 2:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    elif min(n_splits, n_groups) >= 2:
        splitter = GroupKFold(n_splits=min(n_splits, n_groups))  # shuffled through the group ids:
        groups = np.random.default_rng(seed).permutation(n_groups)[np.unique(groups, return_inverse=True)[1]]
    else:
        return np.zeros(len(labels), dtype=int)
    folds = np.full(len(labels), -1)
    with warnings.catch_warnings():  # a class with fewer members than folds then sits in fewer folds
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            folds[held] = fold
    return folds


def split_train_val(images: pd.DataFrame, i2i: pd.DataFrame, val_fraction: float, seed: int,
                    split: str = "grouped") -> tuple[np.ndarray, np.ndarray, str]:
    """Seeded, label-stratified train / validation split -> (train positions, val positions, how); both
    empty, with how saying why, when the labelled images are too few to split.

    "grouped" (default): StratifiedGroupKFold over split_groups' groups, so identical images, i2i pairs
    and one examination's views stay on one side; validation is the first m of the fewest k folds (up to
    20, fewer on small data) with m / k nearest to val_fraction, so the share achieved can differ a little
    and is reported. "stratified": the paper's plain stratified split (train_test_split), which
    may put two views of one examination on both sides.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: use a share strictly between 0 and 1, e.g. 0.1.")
    n, none = len(images), np.zeros(0, dtype=int)
    if n < 2:
        return none, none, f"no split: {n} labelled image(s); classification needs a train or public release"
    labels = images["label_id"].to_numpy()
    if split == "stratified":
        counts = np.bincount(labels)[np.bincount(labels) > 0]
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        stratify = labels if counts.min() >= 2 and len(counts) <= min(n_val, n - n_val) else None
        train, val = train_test_split(np.arange(n), test_size=n_val, random_state=seed, stratify=stratify)
        how = "plain stratified split" if stratify is not None else "plain random split (too few images to stratify)"
        return np.sort(train), np.sort(val), how
    if split != "grouped":
        raise ValueError(f"split={split!r}: use one of {SPLITS}.")
    def val_folds(k: int) -> int:  # m of k folds validate: at least one, and one left to train on
        return min(max(1, round(val_fraction * k)), k - 1)

    # m / k as near val_fraction as two decimals tell, then the fewest folds: larger folds stratify better
    k = min(range(2, 21), key=lambda k: (round(abs(val_folds(k) / k - val_fraction), 2), k))
    folds = grouped_fold_ids(labels, split_groups(images, i2i), n_splits=k, seed=seed)
    k = folds.max() + 1
    if k < 2:
        return none, none, f"no split: the {n} labelled images are views of one examination"
    m = val_folds(k)
    val = np.flatnonzero(folds < m)
    return np.flatnonzero(folds >= m), val, f"{m} of {k} stratified folds grouped by examination"


def sample_per_class(images: pd.DataFrame, per_class: int = 4, seed: int = 0) -> pd.DataFrame:
    """Up to `per_class` random rows of each label, in LABELS order (for plot_image_grid)."""
    return pd.concat([g.sample(min(per_class, len(g)), random_state=seed)
                      for _, g in sorted(images.groupby("label_id"), key=lambda kv: kv[0])], ignore_index=True)


# =============================================================================================
# 4. BiomedCLIP: loading, an offline copy, embeddings cached by content
# =============================================================================================


def load_clip(name: str = BIOMEDCLIP_HUB_ID, device: str | torch.device = "cpu",
              cache_dir: str | os.PathLike | None = None, seed: int = 0) -> tuple[nn.Module, Callable, Callable]:
    """An open_clip model in eval mode on `device`: (model, preprocess, tokenizer).

    name: `hf-hub:<repo>` (downloads once into cache_dir); `local-dir:<folder>` with the hub files
    (biomedclip_offline.export_biomedclip writes one: a Kaggle dataset for runs with internet off);
    `tiny`: a random TINY_CLIP_CFG model built offline from `seed`, for tests and the demo.
    """
    if name == "tiny":
        with torch.random.fork_rng(devices=[]):  # the same model every call, global RNG untouched
            torch.manual_seed(seed)
            model = open_clip.CLIP(**TINY_CLIP_CFG)
        pp_cfg = PreprocessCfg(size=TINY_CLIP_CFG["vision_cfg"]["image_size"])
        preprocess = image_transform_v2(pp_cfg, is_train=False)
        tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
    elif name.startswith("local-dir:"):
        staging = Path(cache_dir or tempfile.gettempdir()) / "open_clip_local"
        folder = offline_clip_dir(Path(name[len("local-dir:"):]).expanduser(), staging)
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}", device="cpu")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    elif name.startswith("hf-hub:"):
        cache = None if cache_dir is None else str(cache_dir)
        model, preprocess = open_clip.create_model_from_pretrained(name, device="cpu", cache_dir=cache)
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cache)
    else:
        raise ValueError(f"clip_model={name!r}: use 'hf-hub:<org>/<repo>' (e.g. {BIOMEDCLIP_HUB_ID}), "
                         "'local-dir:<folder with open_clip_config.json + weights>' or 'tiny'.")
    return model.to(device).eval(), preprocess, tokenizer


def offline_clip_dir(model_dir: Path, staging_root: Path) -> Path:
    """A folder open_clip's `local-dir:` loads with no network. open_clip reads the tokenizer from the
    folder but builds a Hugging Face text tower from `text_cfg.hf_model_name`, a hub id; this finds a
    local copy of that tower (config.json + vocab.txt or tokenizer.json: as `hf_model_name` itself,
    a sub-folder of model_dir, or the HF cache) and stages a copy of the folder under staging_root with
    the config pointing at it. model_dir itself is never modified (it may be read-only)."""
    config_path = model_dir / "open_clip_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a local-dir: folder needs the files of the model's hub "
                                f"repository ({', '.join(BIOMEDCLIP_FILES)}); biomedclip_offline.export_biomedclip writes one.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return model_dir  # open_clip's own text tower: nothing to find
    hub_id = text_cfg["hf_model_name"]
    candidates = [Path(hub_id), model_dir / hub_id, model_dir / Path(hub_id).name, model_dir,
                  *sorted(p for p in model_dir.iterdir() if p.is_dir())]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
        from huggingface_hub import try_to_load_from_cache  # a copy downloaded earlier, read without network

        cached = try_to_load_from_cache(hub_id, "config.json")
        candidates += [Path(cached).parent] if isinstance(cached, str) else []
    text_dir = next((d for d in candidates if _is_hf_text_dir(d)), None)
    if text_dir is None:
        raise FileNotFoundError(
            f"{model_dir}: the text tower {hub_id!r} needs its config.json and vocab.txt offline. Put them in "
            f"{model_dir / Path(hub_id).name}/ (from https://huggingface.co/{hub_id}), or build the folder with "
            "biomedclip_offline.export_biomedclip where internet is on.")
    weights = [p for p in sorted(model_dir.iterdir()) if p.suffix in (".bin", ".safetensors", ".pth")]
    local = str(text_dir.resolve())
    config["model_cfg"]["text_cfg"] = {**text_cfg, "hf_model_name": local, "hf_tokenizer_name": local}
    text = json.dumps(config, indent=2)
    staged = staging_root / f"{model_dir.name}-{hashlib.sha1((str(model_dir.resolve()) + text).encode()).hexdigest()[:12]}"
    if not staged.is_dir():  # built beside, then renamed: a concurrent load never sees half a folder
        staging_root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=staging_root))
        (building / "open_clip_config.json").write_text(text, encoding="utf-8")
        # the tokenizer comes from the text tower's repository, as open_clip's hf-hub: loading does
        for src in weights + [text_dir / n for n in HF_TEXT_FILES if (text_dir / n).is_file()]:
            try:
                os.symlink(src.resolve(), building / src.name)
            except OSError:  # no symlinks allowed here: copy
                shutil.copy2(src, building / src.name)
        try:
            building.rename(staged)
        except OSError:  # another process staged it first
            shutil.rmtree(building, ignore_errors=True)
    return staged


def _is_hf_text_dir(folder: Path) -> bool:
    try:
        has_vocab = (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()
        return has_vocab and "model_type" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


class ImagePathDataset(Dataset):
    """Images decoded with load_rgb and passed through `preprocess` (a CLIP or timm transform)."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Callable):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_rgb(self.paths[i]))


def encode_batches(encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                   device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """`encode` each batch under inference_mode (+ autocast): [N, D] float32 unit rows on the CPU. Rows
    stay on `device` until the end and come back in one copy, so a GPU never waits on a per-batch sync."""
    out = []
    with torch.inference_mode(), autocast(device, amp):
        for x in batches:
            out.append(F.normalize(encode(x.to(device, non_blocking=True)).float(), dim=-1))  # (B, D)
    return torch.cat(out).cpu() if out else torch.empty(0, 0)


def transform_id(transform: Callable | None) -> str:
    """A preprocessing pipeline's repr without memory addresses: part of every cache identity."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of every state_dict tensor's name, shape, dtype and bytes: the identity of a model's weights
    in cache keys and run identities (~1 s for BiomedCLIP's 196M parameters)."""
    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def content_keys(paths: Sequence[str | os.PathLike], content: Mapping[str, str] | None = None) -> list[str]:
    """Each path's content SHA-1, from `content` ({path: sha1}, e.g. EntrepData.sha1) or hashed now."""
    return [content[str(p)] if content and str(p) in content else file_sha1(p) for p in paths]


def cached_rows(keys: Sequence[str], paths: Sequence[str | os.PathLike], compute: Callable[[list], torch.Tensor],
                cache_file: Path | None, identity: str) -> torch.Tensor:
    """Rows [N, D] for images identified by content (keys: file_sha1 per path), kept in one safetensors
    file made under `identity` (whatever computes them: model, preprocessing, precision). Rows already
    there are read, `compute(paths) -> [M, D]` runs once per new content, and the file is rewritten
    atomically. A file of another identity, or one that cannot be read, is reported and rebuilt."""
    if cache_file is None:
        return compute(list(paths))
    cached = {}
    if cache_file.is_file():
        try:
            with safe_open(str(cache_file), framework="pt") as f:
                meta, table = f.metadata() or {}, f.get_tensor("rows")
            if meta.get("identity") != identity or len(json.loads(meta["keys"])) != len(table):
                raise ValueError("made by another model or damaged")
            cached = dict(zip(json.loads(meta["keys"]), table))
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            warnings.warn(f"{cache_file}: unusable cache ({type(e).__name__}: {e}); computing its rows again.")
    todo = {k: p for k, p in zip(keys, paths) if k not in cached}  # one path per new content
    if todo:
        cached.update(zip(todo, compute(list(todo.values()))))
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        save_file({"rows": torch.stack(list(cached.values())).float().contiguous()}, str(tmp),
                  metadata={"identity": identity, "keys": json.dumps(list(cached))})
        os.replace(tmp, cache_file)
    return torch.stack([cached[k] for k in keys]) if len(keys) else torch.empty(0, 0)


def embed_images(model: nn.Module, preprocess: Callable, paths: Sequence[str | os.PathLike], device: torch.device,
                 batch_size: int = 64, num_workers: int = 0, amp: str | torch.dtype | None = "auto",
                 cache_dir: str | os.PathLike | None = None, content: Mapping[str, str] | None = None,
                 progress: bool = True) -> torch.Tensor:
    """CLIP image embeddings [N, D] (float32 unit rows, CPU) in the order of `paths`. With cache_dir,
    rows are kept by content (`content`: {path: file_sha1}, e.g. EntrepData.sha1; hashed here when not
    given) under the model's identity, preprocessing and precision: a rerun encodes nothing, a changed
    file only itself."""
    device, amp = torch.device(device), resolve_amp(amp, torch.device(device))

    def encode(todo: list) -> torch.Tensor:
        loader = DataLoader(ImagePathDataset(todo, preprocess), batch_size=batch_size, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        return encode_batches(model.encode_image, tqdm(loader, "BiomedCLIP images", mininterval=5, disable=not progress),
                              device, amp)

    identity = f"clip|{model_fingerprint(model)}|{transform_id(preprocess)}|{amp}"
    cache_file = None if cache_dir is None else Path(cache_dir) / f"clip_{hashlib.sha1(identity.encode()).hexdigest()[:16]}.safetensors"
    return cached_rows(content_keys(paths, content), paths, encode, cache_file, identity)


def embed_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], device: torch.device,
                batch_size: int = 256, amp: str | torch.dtype | None = "auto") -> torch.Tensor:
    """CLIP text embeddings [T, D] (float32 unit rows, CPU) in the order of `texts`."""
    device = torch.device(device)
    tokens = tokenizer(list(texts))  # (T, context_length)
    return encode_batches(model.encode_text, torch.split(tokens, batch_size), device, resolve_amp(amp, device))


class FeatureTable:
    """Embeddings [N, D] looked up by image path: table[paths] -> [len(paths), D]."""

    def __init__(self, paths: Sequence[str], feats: torch.Tensor):
        self.paths, self.feats = list(paths), feats
        self.row = {p: i for i, p in enumerate(self.paths)}

    def __getitem__(self, paths: Iterable[str]) -> torch.Tensor:
        return self.feats[[self.row[str(p)] for p in paths]]


# =============================================================================================
# 5. Prototypes: joint vision-language prototypes and their classifier
# =============================================================================================


def class_prompts(class_names: Sequence[str], class_texts: Mapping[str, Sequence[str]],
                  templates: Sequence[str] = PROMPT_TEMPLATES) -> dict[str, list[str]]:
    """{class: every template filled with every wording of the class}, in `class_names` order."""
    return {c: [t.format(text) for text in class_texts[c] for t in templates] for c in class_names}


def add_description_prompts(prompts: Mapping[str, Sequence[str]], labels: Sequence[str], descriptions: Sequence[str],
                            label_map: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Add the data's English finding lines (DescriptionEN) to their class's prompts, deduplicated.
    labels[i] is the label of descriptions[i], mapped to a prompt class by label_map (e.g. LABEL_TO_COARSE).
    Give training descriptions only: validation text would leak into the prototypes."""
    out = {c: list(p) for c, p in prompts.items()}
    for label, text in zip(labels, descriptions):
        cls = label_map.get(label, label) if label_map else label
        if cls in out:
            out[cls] += [line for line in split_finding_lines(text) if line not in out[cls]]
    return out


def image_prototypes(feats: torch.Tensor, labels: Sequence[int] | torch.Tensor, n_classes: int,
                     allow_empty: bool = False) -> torch.Tensor:
    """Normalised class means of unit features: [N, D] with labels [N] in 0..C-1 -> [C, D]. A class
    without samples raises, or with allow_empty gets a zero row (joint_prototypes then leaves its text
    prototype alone)."""
    labels = torch.tensor(np.asarray(labels), dtype=torch.long)  # a copy: pandas may hand out read-only arrays
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must be class ids 0..{n_classes - 1}; got {labels.min()}..{labels.max()}.")
    onehot = F.one_hot(labels, n_classes).to(feats.dtype)  # (N, C)
    empty = torch.nonzero(onehot.sum(0) == 0).flatten().tolist()
    if empty and not allow_empty:
        raise ValueError(f"No samples for class ids {empty}: pass allow_empty=True for zero prototypes.")
    return F.normalize(onehot.T @ feats, dim=-1)  # (C, D); zero rows stay zero


def text_prototypes(model: nn.Module, tokenizer: Callable, prompts: Mapping[str, Sequence[str]],
                    device: torch.device, class_names: Sequence[str]) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompt embeddings (CLIP's prompt ensembling)."""
    if empty := [c for c in class_names if not prompts.get(c)]:
        raise ValueError(f"No prompts for classes {empty}: give each class at least one prompt.")
    feats = embed_texts(model, tokenizer, [p for c in class_names for p in prompts[c]], device)  # (T, D)
    owner = [i for i, c in enumerate(class_names) for _ in prompts[c]]
    return image_prototypes(feats, owner, len(class_names))  # the same normalised-mean rule


def joint_prototypes(img_protos: torch.Tensor, txt_protos: torch.Tensor, weight: float) -> torch.Tensor:
    """The paper's joint vision-language prototypes: normalise(weight * image + (1 - weight) * text), [C, D].
    weight 1 = image prototypes only, 0 = text prototypes only."""
    return F.normalize(weight * img_protos + (1.0 - weight) * txt_protos, dim=-1)


def prototype_probs(feats: torch.Tensor, protos: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Class probabilities [N, C] = softmax(cosine(feats [N, D], protos [C, D]) / temperature)."""
    return (feats @ protos.T / temperature).softmax(dim=-1)  # (N, C)


@dataclass(frozen=True)
class PrototypeClassifier:
    """Joint prototypes [C, D] with the weight, temperature and prompt set chosen on validation."""

    class_names: tuple[str, ...]
    protos: torch.Tensor  # (C, D) unit rows
    weight: float  # 1 = image prototypes only, 0 = text prototypes only
    temperature: float
    with_descriptions: bool  # whether the data's English findings joined the class prompts
    table: pd.DataFrame  # the validation grid behind the choice

    def predict_proba(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C) class probabilities of unit features [N, D]."""
        return prototype_probs(feats, self.protos, self.temperature)


def choose_prototype_weight(feats: torch.Tensor, labels: Sequence[int], img_protos: torch.Tensor,
                            txt_protos: torch.Tensor) -> pd.DataFrame:
    """Validation scores over PROTOTYPE_WEIGHT_GRID x PROTOTYPE_TEMPERATURE_GRID: weight, temperature,
    accuracy, macro_f1 (the temperature never changes the argmax) and log_loss (it sets the confidence
    the hybrid rule thresholds). Give validation features; img_protos come from training data."""
    labels, n_classes = np.asarray(labels), img_protos.shape[0]
    rows = []
    for w in PROTOTYPE_WEIGHT_GRID:
        cosine = (feats.double() @ joint_prototypes(img_protos, txt_protos, w).double().T).numpy()  # (N, C)
        pred = cosine.argmax(1)
        scores = {"accuracy": float((pred == labels).mean()),
                  "macro_f1": f1_score(labels, pred, labels=range(n_classes), average="macro", zero_division=0)}
        for t in PROTOTYPE_TEMPERATURE_GRID:
            rows.append({"weight": w, "temperature": t, **scores,
                         "log_loss": log_loss(labels, softmax(cosine / t, axis=1), labels=range(n_classes))})
    return pd.DataFrame(rows)


def fit_prototype_classifier(model: nn.Module, tokenizer: Callable, device: torch.device, train_feats: torch.Tensor,
                             train_y: Sequence[int], val_feats: torch.Tensor, val_y: Sequence[int],
                             class_names: Sequence[str], class_texts: Mapping[str, Sequence[str]],
                             train_labels: Sequence[str] = (), train_descriptions: Sequence[str] = (),
                             label_map: Mapping[str, str] | None = None) -> PrototypeClassifier:
    """The paper's prototype classifier at one level (coarse: 4 regions, or fine: 7 labels).

    Image prototypes are class means of the training embeddings; text prototypes come from the prompt
    templates, with and without the training images' English findings (train_labels[i] is the label of
    train_descriptions[i], mapped by label_map). On validation: the prompt set and joint weight by
    macro F1 (first best in grid order), then the temperature by log loss at that weight.
    """
    img = image_prototypes(train_feats, train_y, len(class_names), allow_empty=True)
    base = class_prompts(class_names, class_texts)
    candidates = {False: base}
    if any(d.strip() for d in train_descriptions):
        candidates[True] = add_description_prompts(base, train_labels, train_descriptions, label_map)
    best = None
    for with_desc, prompts in candidates.items():
        txt = text_prototypes(model, tokenizer, prompts, device, class_names)
        table = choose_prototype_weight(val_feats, val_y, img, txt)
        if best is None or table["macro_f1"].max() > best[2]["macro_f1"].max():
            best = (with_desc, txt, table)
    with_desc, txt, table = best
    weight = table.loc[table["macro_f1"].idxmax(), "weight"]
    at_weight = table[table["weight"] == weight]
    temperature = at_weight.loc[at_weight["log_loss"].idxmin(), "temperature"]
    return PrototypeClassifier(tuple(class_names), joint_prototypes(img, txt, weight), float(weight),
                               float(temperature), with_desc, table)


def fit_prototypes(model: nn.Module, tokenizer: Callable, device: torch.device, train_feats: torch.Tensor,
                   train_labels7: np.ndarray, val_feats: torch.Tensor, val_labels7: np.ndarray,
                   train_descriptions: Sequence[str] = ()) -> dict[str, PrototypeClassifier]:
    """The paper's prototype classifiers at both levels from official label ids: "coarse" (4 regions: the
    hybrid's gate) and "fine" (7 labels: the prototypes-alone baseline)."""
    names = [LABELS[i] for i in train_labels7]
    shared = dict(train_labels=names, train_descriptions=train_descriptions)
    return {"coarse": fit_prototype_classifier(model, tokenizer, device, train_feats, coarse_of(train_labels7), val_feats,
                                               coarse_of(val_labels7), COARSE_CLASSES, COARSE_CLASS_TEXTS,
                                               label_map=LABEL_TO_COARSE, **shared),
            "fine": fit_prototype_classifier(model, tokenizer, device, train_feats, train_labels7, val_feats, val_labels7,
                                             LABELS, FINE_CLASS_TEXTS, **shared)}


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


# =============================================================================================
# 6. DINOv2 (SurgeNet): weights, heads, flip-swap data, fine-tuning with resume, inference
# =============================================================================================


def read_checkpoint(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (.pth / .pt with torch.load(weights_only=True), .safetensors) or
    URL (downloaded once into torch's hub cache), with DINO training wrappers and key prefixes removed
    (CHECKPOINT_WRAPPER_KEYS, CHECKPOINT_KEY_PREFIXES)."""
    source = os.fspath(source)
    if urlparse(source).scheme in ("http", "https"):
        name = os.path.basename(urlparse(source).path)
        obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True, file_name=name)
    elif not os.path.isfile(source):
        raise FileNotFoundError(f"DINOv2 weights not found: {source}. Attach DINOv2_ViTb14_size336_SurgeNetXL.pth "
                                f"({SURGENET_VITB_URL}) and give its path, or use dino_model='tiny' for a smoke test.")
    elif source.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(source)
    else:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    while isinstance(obj, Mapping) and (inner := next((obj[k] for k in CHECKPOINT_WRAPPER_KEYS
                                                       if isinstance(obj.get(k), Mapping)), None)) is not None:
        obj = inner
    state = dict(obj)
    for prefix in CHECKPOINT_KEY_PREFIXES:  # keep only prefixed keys: a teacher's backbone.*, not dino_head.*
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


@dataclass(frozen=True)
class DinoArch:
    """What a DINOv2 checkpoint holds, read from its tensors."""

    name: str  # the timm model it fills, e.g. vit_base_patch14_dinov2
    width: int
    depth: int
    registers: int
    grid: int  # patches per side of the trained position embedding (24 at 336 px)

    def __str__(self) -> str:
        regs = f"{self.registers} register tokens" if self.registers else "no register tokens"
        return (f"a ViT of width {self.width} and {self.depth} blocks with {regs}, position embedding trained at "
                f"{self.grid * 14} px ({self.grid}x{self.grid} patches)")


def dino_arch(state: Mapping[str, torch.Tensor], where: str = "the checkpoint") -> DinoArch:
    """Read width, depth, register tokens and trained grid from DINOv2 backbone tensors (the original
    format with `register_tokens` and the CLS position inside pos_embed, or timm's with `reg_token`)."""
    try:
        width = state["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        registers = state["register_tokens" if "register_tokens" in state else "reg_token"].shape[1] \
            if "register_tokens" in state or "reg_token" in state else 0
        positions = state["pos_embed"].shape[1] - (0 if "reg_token" in state else 1)  # timm's reg models: no CLS
        patch = state["patch_embed.proj.weight"].shape[-1]
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{where} is not a DINOv2 ViT backbone checkpoint (missing {e}): expected cls_token, "
                         "pos_embed, patch_embed.* and blocks.N.* tensors.") from e
    grid = math.isqrt(positions)
    size, expected_depth = DINO_SIZE_BY_WIDTH.get(width, ("", -1))
    if patch != 14 or grid * grid != positions or depth != expected_depth or registers not in (0, 4):
        raise ValueError(f"{where}: width {width}, {depth} blocks, patch {patch}, {registers} registers and "
                         f"{positions} positions match no timm DINOv2 ViT-S/B/L/g with patch 14 (0 or 4 registers).")
    return DinoArch(f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2", width, depth, registers, grid)


def build_dino(model_name: str = "auto", weights: str | os.PathLike = "", image_size: int = 336,
               seed: int = 0) -> nn.Module:
    """A timm DINOv2 ViT backbone without classifier (forward -> (B, D) CLS features) at `image_size`.

    weights: a checkpoint path or URL (SurgeNet): its architecture is read from the file (dino_arch)
    and `model_name` "auto" builds that one; a named model the file cannot fill is refused with the name
    to use. Every tensor must fit (strict); the position embedding is resampled when image_size
    differs from the trained grid, otherwise each backbone tensor equals the file's. "" = timm's own
    pretrained DINOv2 (LVD-142M, downloaded; "auto" -> the paper's ViT-B/14); "random" = random init.
    model_name "tiny": a small random ViT of the released file's structure (no registers), offline.
    """
    if model_name == "tiny":
        with torch.random.fork_rng(devices=[]):  # the same tiny model every call, global RNG untouched
            torch.manual_seed(seed)
            return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=image_size,
                                     num_classes=0, **DINO_TINY_KWARGS)
    weights = os.fspath(weights)
    if weights in ("", "random"):
        name = DINO_DEFAULT_ARCH if model_name == "auto" else model_name
        try:
            return timm.create_model(name, pretrained=weights == "", img_size=image_size, num_classes=0)
        except Exception as e:  # offline: huggingface_hub / httpx errors of several kinds
            if weights == "random":
                raise
            raise RuntimeError(f"Could not download timm's pretrained weights for {name!r} ({type(e).__name__}: {e}). "
                               f"With internet off, attach DINOv2_ViTb14_size336_SurgeNetXL.pth ({SURGENET_VITB_URL}) "
                               "and set dino_weights to its path (or 'auto').") from e
    state = read_checkpoint(weights)
    arch = dino_arch(state, str(weights))
    if model_name not in ("auto", arch.name) and model_name.split(".")[0] != arch.name:
        raise ValueError(f"dino_weights={str(weights)!r} holds {arch}: it fills timm's {arch.name!r}, not "
                         f"dino_model={model_name!r}. Set dino_model='auto' (or {arch.name!r}).")
    model = timm.create_model(arch.name, pretrained=False, img_size=image_size, num_classes=0)
    backbone = {k: v for k, v in state.items() if not k.startswith(IGNORED_CHECKPOINT_PREFIXES)}
    try:  # timm's own DINOv2 conversion: drops mask_token, maps register tokens, resamples pos_embed
        model.load_state_dict(checkpoint_filter_fn(backbone, model), strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{weights} does not fit {arch.name}: {str(e)[:600]}") from e
    return model


class DinoClassifier(nn.Module):
    """A DINOv2 backbone with linear heads for some of DINO_TASKS: forward(x) -> {task: logits}.

    "coarse": (B, 4) over COARSE_CLASSES; "ear" / "nose" / "vc": (B, 2) over FINE_TASKS[task]. Heads are
    initialised from `init_seed` (trunc-normal 0.02, zero bias): the same backbone gives the same model.
    """

    def __init__(self, backbone: nn.Module, tasks: Sequence[str] = tuple(DINO_TASKS), init_seed: int = 0):
        super().__init__()
        self.backbone, self.tasks = backbone, tuple(tasks)
        self.heads = nn.ModuleDict({t: nn.Linear(backbone.num_features, DINO_TASKS[t]) for t in self.tasks})
        generator = torch.Generator().manual_seed(init_seed)
        for head in self.heads.values():
            nn.init.trunc_normal_(head.weight, std=0.02, generator=generator)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)  # (B, D)
        return {t: head(feats) for t, head in self.heads.items()}


def region_targets(labels7: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Official ids (B,) -> coarse ids (B,) and, per fine task, (mask (B,): the image is of that region,
    binary target (B,): index in FINE_TASKS[task], -1 outside the region)."""
    coarse = torch.tensor(LABEL_ID_TO_COARSE_ID, device=labels7.device)[labels7]
    fine = {}
    for task, pair in FINE_TASKS.items():
        target_of = torch.tensor([pair.index(n) if n in pair else -1 for n in LABELS], device=labels7.device)
        fine[task] = (coarse == COARSE_TO_ID[task], target_of[labels7])
    return coarse, fine


def multitask_loss(outputs: Mapping[str, torch.Tensor], labels7: torch.Tensor,
                   class_weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over the heads in `outputs`: coarse cross-entropy over the batch, and each binary head's over
    its region's images only (an ear image adds nothing to the nose and vc terms; an absent region adds 0
    through `logits.sum() * 0`, so the graph stays whole). Class weights as in F.cross_entropy."""
    weights = class_weights or {}
    coarse, fine = region_targets(labels7)
    loss = torch.zeros((), device=labels7.device)
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


def decode_square(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Decode (load_rgb), take the centre square (the circular field of view is about the frame height,
    centred) and resize bicubic -> uint8 (3, size, size): timm's eval geometry at crop_pct 1.0."""
    im = ImageOps.fit(load_rgb(path), (size, size), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def flip_label_id(label_id: int) -> int:
    """Official id of the mirrored image's label: ear / nose left <-> right, vc state and throat kept.
    -1 (unlabelled) stays -1."""
    return label_id if label_id < 0 else LABEL_TO_ID[FLIP_LABEL[LABELS[label_id]]]


@contextlib.contextmanager
def seeded_rng(seed: int | None) -> Iterator[None]:
    """Run the block with torch's CPU RNG and Python's `random` seeded by `seed` (timm / torchvision
    transforms draw from them), restoring both afterwards. None: leave them alone."""
    if seed is None:
        yield
        return
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class SquareImages(Dataset):
    """Images decoded once into uint8 squares held in memory (threads: PIL releases the GIL), each item
    passed through `transform`, with a horizontal flip WITH label swap (flip_label_id) at probability
    `flip_p` (0 for evaluation). Item key: an index, or (index, seed) from EpochSampler: the flip and the
    transform's randomness then come from `seed` alone, whatever the worker count.
    Returns (image (3, S, S) float, official label id or -1)."""

    def __init__(self, paths: Sequence[str | os.PathLike], label_ids: Sequence[int] | None,
                 transform: Callable[[Image.Image], torch.Tensor], size: int, flip_p: float = 0.0):
        self.label_ids = [-1] * len(paths) if label_ids is None else [int(y) for y in label_ids]
        if len(self.label_ids) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(self.label_ids)} labels: pass one label id per image.")
        with ThreadPoolExecutor(min(8, cpu_count() + 2)) as pool:
            squares = list(pool.map(lambda p: decode_square(p, size), paths))
        self.images = torch.stack(squares) if squares else torch.empty(0, 3, size, size, dtype=torch.uint8)
        self.transform, self.flip_p = transform, flip_p

    def __len__(self) -> int:
        return len(self.label_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.images[index], self.label_ids[index]  # (3, C, C) uint8
        with seeded_rng(seed):
            if self.flip_p > 0 and torch.rand(()) < self.flip_p:
                image, label = image.flip(-1), flip_label_id(label)
            return self.transform(Image.fromarray(image.permute(1, 2, 0).numpy())), label


def train_square_side(image_size: int) -> int:
    """Side of the uint8 squares a training set caches: TRAIN_CACHE_SCALE larger than the input, for crops."""
    return math.ceil(image_size * TRAIN_CACHE_SCALE)


def dino_transform(model: nn.Module, image_size: int, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The backbone's own preprocessing (timm resolve_model_data_config + create_transform: mean, std,
    interpolation) at image_size. Train: rotation, then random-resized-crop and colour jitter with
    hflip=0 (flips come with the label swap in SquareImages)."""
    backbone = getattr(model, "backbone", model)
    cfg = timm.data.resolve_model_data_config(backbone, args={"input_size": (3, image_size, image_size)})
    if not train:
        return timm.data.create_transform(**cfg, is_training=False)
    a = DINO_TRAIN_AUGMENT
    rotate = T.RandomRotation(a["rotate_degrees"], interpolation=T.InterpolationMode.BILINEAR, fill=0)
    return T.Compose([rotate, timm.data.create_transform(**cfg, is_training=True, hflip=0.0, scale=a["scale"],
                                                         ratio=a["ratio"], color_jitter=a["color_jitter"])])


def dino_image_size(model: nn.Module) -> int:
    """Input side (px) a timm ViT backbone, or a DinoClassifier around one, was built for."""
    return int(getattr(model, "backbone", model).patch_embed.img_size[0])


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
        order, seeds = torch.randperm(self.n, generator=generator), torch.randint(0, 2**62, (self.n,), generator=generator)
        if self.groups is not None:
            group_rank = torch.randperm(int(self.groups.max()) + 1, generator=generator)[self.groups[order]]
            order = order[torch.sort(group_rank, stable=True).indices]
        return iter(zip(order.tolist(), seeds.tolist()))


def _loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, **kw) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0, **kw)


@dataclass(frozen=True)
class DinoConfig:
    """The fine-tuning recipe (project's choices; the paper gives none): AdamW with heads at lr_head and the
    backbone at lr_backbone (optionally layer-decayed), no decay on norms, biases and tokens; linear warmup
    then cosine per optimizer step; class-weighted losses; flips with label swap at flip_p; autocast (amp
    "auto": autocast_dtype; fp16 adds a GradScaler); grad_accum batches per step; grad-norm clipping;
    early stopping after `patience` epochs without a better validation score (None: off). Saved in each
    run's config.json and part of its identity."""

    epochs: int = 20
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_backbone: float = 2e-5
    weight_decay: float = 0.05
    layer_decay: float | None = None
    warmup_epochs: float = 1.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    patience: int | None = 5
    flip_p: float = 0.5
    amp: str = "auto"
    seed: int = 0


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


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps` optimizer steps, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))


def dino_val_score(probs: Mapping[str, np.ndarray], labels7: np.ndarray) -> float:
    """Validation macro F1 of the decision a model's heads are reported with: all four heads -> 7 labels by
    region argmax then that region's binary head (region_then_fine), as DINOv2 and the hybrid are scored;
    the coarse head alone -> 4 regions; one binary head -> its two labels on its region's images."""
    labels7 = np.asarray(labels7)
    if set(DINO_TASKS) <= set(probs):
        truth, pred = labels7, region_then_fine(probs["coarse"].argmax(1), probs)
    elif "coarse" in probs:
        truth, pred = coarse_of(labels7), probs["coarse"].argmax(1)
    else:
        (task,) = [t for t in probs if t in FINE_TASKS]
        mine = task_images((task,), labels7)
        truth = (labels7[mine] == LABEL_TO_ID[FINE_TASKS[task][1]]).astype(int)
        pred = (probs[task][mine] > FINE_DECISION_THRESHOLD).astype(int)
    return float(f1_score(truth, pred, average="macro", zero_division=0))


@dataclass
class TrainedDino:
    """A fine-tuned DinoClassifier holding its best weights, where they are, and the run's history."""

    model: DinoClassifier
    best_path: Path
    history: pd.DataFrame
    weights_id: str  # file_sha1(best_path): the identity of the prediction caches

    def summary(self) -> dict:
        """What metrics.json records of the run."""
        best = int(self.history["val_score"].idxmax())
        return {"tasks": list(self.model.tasks), "epochs_run": len(self.history), "best_epoch": best + 1,
                "best_val_score_no_tta": float(self.history["val_score"][best]), "checkpoint": str(self.best_path)}


def _load(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle / zip errors of several kinds
        if path.exists():
            warnings.warn(f"{path} cannot be loaded ({type(e).__name__}: {e}); that run is trained again.")
        return None


def _resume_state(run_dir: Path, run_id: str) -> tuple[dict | None, dict | None]:
    """(last.pt, best.pt) of an earlier run of this identity when both load; else (None, None): no run, or
    one whose weights are lost, is trained from the start."""
    last = _load(run_dir / "last.pt") if (run_dir / "last.pt").exists() else None
    best = _load(run_dir / "best.pt") if last is not None else None
    return (last, best) if best is not None and last.get("run_id") == run_id else (None, None)


def train_dino(model: DinoClassifier, train: pd.DataFrame, val: pd.DataFrame, cfg: DinoConfig, *,
               checkpoint_dir: str | os.PathLike, device: torch.device, name: str = "dino", num_workers: int = 0,
               gpus: int = 1, progress: bool = True) -> TrainedDino:
    """Fine-tune `model` (freshly built) on the images of `train` its heads are for (task_images; columns
    path, label_id, sha1) with cfg, choosing the best epoch by dino_val_score on `val`.

    Checkpoints go to checkpoint_dir/<name>_<id>/, where <id> hashes the initial weights, the image size,
    the heads, every training and validation image's content and label, cfg and the augmentation. last.pt
    (model, optimizer, scheduler, scaler, history) is written atomically after every epoch,
    best.pt whenever the score improves, config.json once. A rerun resumes an unfinished run or reuses a
    finished one; anything else trains anew. Data order, augmentation and the global RNGs (drop-path,
    dropout) are seeded from (seed, epoch) at each epoch, so a resumed run ends with the weights of an
    uninterrupted one. `gpus` > 1 splits each batch over
    that many GPUs (torch DataParallel: the same loss as one GPU). One progress bar, over epochs.
    """
    if cfg.epochs < 1:
        raise ValueError(f"epochs={cfg.epochs}: fine-tuning needs at least 1 epoch.")
    amp = resolve_amp(cfg.amp, device)
    train = train[task_images(model.tasks, train["label_id"])]
    val = val[task_images(model.tasks, val["label_id"])]
    if train.empty or val.empty:
        raise ValueError(f"{name}: no training or validation images for heads {model.tasks}; add labelled images.")
    size = dino_image_size(model)
    identity = {"initial_weights": model_fingerprint(model), "image_size": size, "tasks": model.tasks,
                "train": [[s, int(y)] for s, y in zip(train["sha1"], train["label_id"])],
                "val": [[s, int(y)] for s, y in zip(val["sha1"], val["label_id"])],
                "config": {**asdict(cfg), "amp": str(amp)}, "augment": {k: str(v) for k, v in DINO_TRAIN_AUGMENT.items()}}
    run_id = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    run_dir = Path(checkpoint_dir) / f"{name}_{run_id[:12]}"
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    state, best = _resume_state(run_dir, run_id)
    if state is not None and state["finished"]:
        tqdm.write(f"train_dino: reusing finished run {run_dir} (best epoch {state['best_epoch']}).")
        model.load_state_dict(best["model"])
        return TrainedDino(model.to(device), best_path, pd.DataFrame(state["history"]), file_sha1(best_path))

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"run_id": run_id, **identity}, indent=1))
    model.to(device)
    train_set = SquareImages(train["path"].tolist(), train["label_id"].tolist(), dino_transform(model, size, True),
                             train_square_side(size), cfg.flip_p)
    val_set = SquareImages(val["path"].tolist(), val["label_id"].tolist(), dino_transform(model, size, False), size)
    sampler = EpochSampler(len(train_set), cfg.seed)
    train_loader = _loader(train_set, cfg.batch_size, num_workers, device, sampler=sampler)
    val_loader = _loader(val_set, cfg.batch_size, num_workers, device)
    weights = {k: v.to(device) for k, v in class_weights(train["label_id"], model.tasks).items()}
    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    steps = math.ceil(len(train_loader) / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, round(cfg.warmup_epochs * steps), cfg.epochs * steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    start, history, best_score, best_epoch = 0, [], -1.0, 0
    if state is not None:
        for obj, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
            if state[key]:  # the scaler's is empty unless fp16
                obj.load_state_dict(state[key])
        start, history, best_score, best_epoch = state["epoch"], state["history"], state["best_score"], state["best_epoch"]
        tqdm.write(f"train_dino: resuming {run_dir} after epoch {start}/{cfg.epochs}.")
    net = nn.DataParallel(model, device_ids=list(range(gpus))) if gpus > 1 else model

    bar = tqdm(total=cfg.epochs, initial=start, desc=f"DINOv2 {name}", disable=not progress)
    for epoch in range(start, cfg.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)  # the data order and augmentations come from (seed, epoch) ...
        seed_everything(epoch_seed(cfg.seed, epoch))  # ... and drop-path's
        train_loss = _train_epoch(net, train_loader, optimizer, scheduler, scaler, device, amp, weights, cfg)
        logits, labels = collect_logits(model, val_loader, device, amp)
        score = dino_val_score(task_probs(logits), labels.numpy())
        history.append({"epoch": epoch + 1, "train_loss": train_loss,
                        "val_loss": multitask_loss(logits, labels, {k: v.cpu() for k, v in weights.items()}).item(),
                        "val_score": score, "lr_heads": max(g["lr"] for g in optimizer.param_groups if g["name"] == "heads"),
                        "seconds": time.perf_counter() - started})
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            atomic_save({"model": model.state_dict(), "epoch": best_epoch, "val_score": score}, best_path)
        finished = epoch + 1 == cfg.epochs or bool(cfg.patience) and epoch + 1 - best_epoch >= cfg.patience
        atomic_save({"run_id": run_id, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch + 1, "finished": finished, "history": history, "best_score": best_score,
                     "best_epoch": best_epoch}, last_path)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{score:.3f}", best=best_epoch, refresh=False)
        bar.update(1)  # one line per epoch in a saved notebook
        if finished:
            break
    bar.total = bar.n  # an early stop ends the bar at 100% too
    bar.close()
    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    return TrainedDino(model, best_path, pd.DataFrame(history), file_sha1(best_path))


def _train_epoch(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, device: torch.device,
                 amp: torch.dtype | None, weights: Mapping[str, torch.Tensor], cfg: DinoConfig) -> float:
    """One pass; an optimizer + scheduler step every cfg.grad_accum batches (the last group may be
    shorter and is averaged over its own size). Returns the mean batch loss."""
    net.train()
    n, total = len(loader), 0.0
    for i, (x, y) in enumerate(loader):
        group = min(cfg.grad_accum, n - (i // cfg.grad_accum) * cfg.grad_accum)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            loss = multitask_loss(net(x), y, weights)
        scaler.scale(loss / group).backward()
        if (i + 1) % cfg.grad_accum == 0 or i + 1 == n:
            optimizer_step(optimizer, scheduler, scaler, cfg.max_grad_norm)
        total += loss.item()
    return total / max(n, 1)


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


def collect_logits(model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None,
                   flip: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run `model` (eval, no grad) over `loader`, mirroring each batch first when `flip`:
    ({output: (N, k) float32 CPU}, labels (N,)). A model returning one tensor reports it as "features"."""
    model.eval()
    outputs, labels = defaultdict(list), []
    with torch.inference_mode(), autocast(device, amp):
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            out = model(x.flip(-1) if flip else x)
            for name, value in (out if isinstance(out, Mapping) else {"features": out}).items():
                outputs[name].append(value.float().cpu())
            labels.append(torch.as_tensor(y))
    return {k: torch.cat(v) for k, v in outputs.items()}, torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)


def task_probs(logits: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Head logits -> {"coarse": (N, 4) softmax, task: (N,) p(FINE_TASKS[task][1])} for the heads present."""
    return {t: v.softmax(-1).numpy() if t == "coarse" else v.softmax(-1)[:, 1].numpy() for t, v in logits.items()}


def flip_tta_probs(probs: Mapping[str, np.ndarray], probs_flipped: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Average an image's probabilities with its mirror's read through FLIP_LABEL: for ear / nose
    p(right | x) is averaged with p(left | mirror) = 1 - p(right | mirror); region and vc state plainly."""
    out = {}
    for task, p in probs.items():
        mirrored = probs_flipped[task]
        if task in FINE_TASKS and FLIP_LABEL[FINE_TASKS[task][1]] == FINE_TASKS[task][0]:
            mirrored = 1.0 - mirrored
        out[task] = (p + mirrored) / 2
    return out


def _dino_rows(model: nn.Module, paths: Sequence[str], device: torch.device, rows: Callable[[dict, dict | None], torch.Tensor],
               kind: str, tta_flip: bool, batch_size: int, num_workers: int, cache_dir: str | os.PathLike | None,
               content: Mapping[str, str] | None, weights_id: str | None) -> torch.Tensor:
    """rows(outputs, mirrored outputs or None) over `paths` at the model's input size, through
    cached_rows when cache_dir is given (identity: the weights, preprocessing, precision, TTA, kind)."""
    amp, size = autocast_dtype(device), dino_image_size(model)
    transform = dino_transform(model, size, train=False)

    def compute(todo: list) -> torch.Tensor:
        loader = _loader(SquareImages(todo, None, transform, size), batch_size, num_workers, device)
        mirrored = collect_logits(model, loader, device, amp, flip=True)[0] if tta_flip else None
        return rows(collect_logits(model, loader, device, amp)[0], mirrored)

    identity = f"{kind}|{weights_id or model_fingerprint(model)}|{transform_id(transform)}|{amp}|tta={tta_flip}"
    cache_file = None if cache_dir is None else Path(cache_dir) / f"{kind}_{hashlib.sha1(identity.encode()).hexdigest()[:16]}.safetensors"
    return cached_rows(content_keys(paths, content), paths, compute, cache_file, identity)


def predict_dino(trained: Sequence[TrainedDino], paths: Sequence[str], device: torch.device,
                 content: Mapping[str, str] | None = None,
                 tta_flip: bool = True, batch_size: int = 64, num_workers: int = 0,
                 cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Probabilities of every head of the trained models (one shared model, or the paper's four):
    {"coarse": (N, 4), "ear" / "nose" / "vc": (N,) p(second label) = p(ear-right), p(nose-right),
    p(vc-closed)}. tta_flip averages with the mirrored image (flip_tta_probs). With cache_dir, kept per
    image content (`content` as for embed_images) and model weights: a rerun predicts only new images."""
    out: dict[str, np.ndarray] = {}
    for t in trained:
        def rows(logits: dict, mirrored: dict | None, tasks=t.model.tasks) -> torch.Tensor:
            probs = task_probs(logits)
            probs = flip_tta_probs(probs, task_probs(mirrored)) if mirrored is not None else probs
            return torch.from_numpy(np.column_stack([probs[task] for task in tasks])).float()

        table = _dino_rows(t.model, paths, device, rows, "dino_probs", tta_flip, batch_size, num_workers, cache_dir,
                           content, t.weights_id).reshape(len(paths), -1).numpy()
        column = 0
        for task in t.model.tasks:
            width = DINO_TASKS[task] if task == "coarse" else 1
            out[task] = table[:, column:column + width] if task == "coarse" else table[:, column]
            column += width
    return out


def dino_features(trained: TrainedDino, paths: Sequence[str], device: torch.device,
                  content: Mapping[str, str] | None = None,
                  tta_flip: bool = False, batch_size: int = 64, num_workers: int = 0,
                  cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """L2-normalised backbone embeddings [N, D] (CLS after the final norm) of the fine-tuned model, for
    retrieval; tta_flip sums the mirror's embedding in (side-blind). Cached as predict_dino."""
    backbone = trained.model.backbone
    rows = lambda out, mirrored: F.normalize(out["features"] + (mirrored["features"] if mirrored else 0), dim=-1)
    return _dino_rows(backbone, paths, device, rows, "dino_feats", tta_flip, batch_size, num_workers, cache_dir,
                      content, trained.weights_id)


def plot_learning_curve(history: pd.DataFrame, title: str = "") -> Figure:
    """Train / validation loss and the validation score per epoch, the best epoch marked."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_score = fig.subplots(1, 2)
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o", label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="multi-task loss", title="Loss")
    ax_score.plot(history["epoch"], history["val_score"], marker="o", label="validation macro F1")
    ax_score.set(xlabel="epoch", ylabel="macro F1 (dino_val_score)", title="Validation", ylim=(0, 1.02))
    best = history.loc[history["val_score"].idxmax(), "epoch"]
    for ax in (ax_loss, ax_score):
        ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch {int(best)}")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


# =============================================================================================
# 7. Hybrid inference: the paper's fusion rule, its threshold cross-fitted on validation
# =============================================================================================


def _coarse_probs(probs, name: str, n: int | None = None) -> np.ndarray:
    """`probs` as a float64 (N, 4) array in COARSE_CLASSES order, or a ValueError saying what to pass."""
    if probs is None:
        raise ValueError(f"{name} is missing: pass DINOv2's (N, {len(COARSE_CLASSES)}) region probabilities "
                         "(predict_dino's 'coarse').")
    a = np.asarray(probs, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(COARSE_CLASSES) or (n is not None and len(a) != n):
        raise ValueError(f"{name} must be [{n or 'N'}, {len(COARSE_CLASSES)}] probabilities in COARSE_CLASSES order "
                         f"{COARSE_CLASSES}; got shape {a.shape}.")
    return a


def region_then_fine(coarse_ids, dino_probs: Mapping[str, object]) -> np.ndarray:
    """The paper's second stage: a 7-class id per image from its region and that region's binary decision.

    coarse_ids (N,) in COARSE_CLASSES order; dino_probs[task] (N,) p(FINE_TASKS[task][1]) for ear, nose
    and vc. p > FINE_DECISION_THRESHOLD picks the second label, else (a NaN too) the first; throat has one label.
    """
    coarse_ids = np.asarray(coarse_ids).reshape(-1)
    if len(coarse_ids) and (coarse_ids.min() < 0 or coarse_ids.max() >= len(COARSE_CLASSES)):
        raise ValueError(f"coarse ids must be in 0..{len(COARSE_CLASSES) - 1} (COARSE_CLASSES order).")
    labels = np.full(coarse_ids.shape, LABEL_TO_ID["throat"], dtype=np.int64)  # (N,)
    for task, (first, second) in FINE_TASKS.items():
        if task not in dino_probs:
            raise ValueError(f"dino_probs has no {task!r}: pass p({second}) per image for every task of FINE_TASKS.")
        p = np.asarray(dino_probs[task], dtype=np.float64).reshape(-1)
        if len(p) != len(coarse_ids):
            raise ValueError(f"dino_probs[{task!r}] has {len(p)} values; expected one per image ({len(coarse_ids)}).")
        picks = np.where(p > FINE_DECISION_THRESHOLD, LABEL_TO_ID[second], LABEL_TO_ID[first])
        labels = np.where(coarse_ids == COARSE_TO_ID[task], picks, labels)
    return labels


def hybrid_predict(proto_coarse, dino_probs: Mapping[str, object], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's rule: the prototypes' region when their confidence (top probability) reaches
    `threshold`, DINOv2's region otherwise; then DINOv2's binary decision for that region.

    proto_coarse (N, 4) and dino_probs["coarse"] (N, 4) in COARSE_CLASSES order. At exactly the threshold
    the prototype is used, so threshold 0 never falls back, one above 1 always does, and a NaN confidence
    falls back. Returns (labels (N,) ids in LABELS order, fell_back (N,) bool).
    """
    proto = _coarse_probs(proto_coarse, "proto_coarse")  # (N, 4)
    dino = _coarse_probs(dino_probs.get("coarse"), "dino_probs['coarse']", n=len(proto))  # (N, 4)
    fell_back = ~(proto.max(axis=1) >= threshold)  # (N,); NaN >= t is False
    return region_then_fine(np.where(fell_back, dino.argmax(1), proto.argmax(1)), dino_probs), fell_back


def soft_fusion_predict(proto_coarse, dino_probs: Mapping[str, object], weight: float) -> np.ndarray:
    """A compared variant (not the paper's): region = argmax of weight * proto + (1 - weight) * DINOv2, then
    DINOv2's binary decision. weight 1 = prototypes only, 0 = DINOv2 only. Returns (N,) ids."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1] (1 = prototypes only, 0 = DINOv2 only); got {weight}.")
    proto = _coarse_probs(proto_coarse, "proto_coarse")
    dino = _coarse_probs(dino_probs.get("coarse"), "dino_probs['coarse']", n=len(proto))
    return region_then_fine((weight * proto + (1.0 - weight) * dino).argmax(1), dino_probs)


@dataclass(frozen=True, eq=False)
class FusionChoice:
    """A fusion parameter chosen on validation data only.

    chosen       the value chosen on all validation data: frozen and applied to the test set once
    fold_values  the value chosen on the other folds, per fold (fold id order); with one fold (too few
                 validation images or groups) on that fold itself, so oof_pred is then in-sample
    oof_pred     (N,) out-of-fold ids: image i predicted with its fold's value, chosen without its label
    oof_fallback (N,) bool out-of-fold "fell back to DINOv2" (hybrid only, else None)
    sweep        per grid value on all validation data (in-sample): value, accuracy, macro_f1[, fallback_fraction]
    """

    param: str
    chosen: float
    fold_values: tuple[float, ...]
    oof_pred: np.ndarray
    oof_fallback: np.ndarray | None
    sweep: pd.DataFrame


def best_grid_value(grid: Sequence[float], macro_f1, accuracy) -> float:
    """The grid value of highest macro F1; ties -> higher accuracy; still tied -> the middle of the tied
    values (upper middle for an even count): a plateau's centre, least sensitive to where it ends."""
    grid = np.asarray(grid, dtype=np.float64)
    f1 = np.round(np.asarray(macro_f1, dtype=np.float64), 12)  # rounding: equal scores compare equal
    acc = np.where(f1 == f1.max(), np.round(np.asarray(accuracy, dtype=np.float64), 12), -np.inf)
    tied = np.sort(grid[acc == acc.max()])
    return float(tied[len(tied) // 2])


def choose_fusion(rule: str, proto_coarse, dino_probs: Mapping[str, object], y_true, fold_of) -> FusionChoice:
    """The hybrid threshold (rule "hybrid", THRESHOLD_GRID) or the soft-fusion weight ("soft", WEIGHT_GRID),
    chosen by macro F1 (best_grid_value) with cross-fitting: each fold is predicted with the value chosen
    on the other folds (honest validation figures), and `chosen` uses all of them. Both rules decide each
    image alone, so a fold's predictions are its columns of the grid's. Test data never enters."""
    if rule not in ("hybrid", "soft"):
        raise ValueError(f"rule must be 'hybrid' (threshold) or 'soft' (weight); got {rule!r}.")
    grid = np.asarray(THRESHOLD_GRID if rule == "hybrid" else WEIGHT_GRID)
    runs = [hybrid_predict(proto_coarse, dino_probs, v) if rule == "hybrid" else
            (soft_fusion_predict(proto_coarse, dino_probs, v), None) for v in grid]
    preds, y_true, fold_of = np.stack([r[0] for r in runs]), np.asarray(y_true), np.asarray(fold_of)  # (G, N)
    fallback = np.stack([r[1] for r in runs]) if rule == "hybrid" else None  # (G, N)
    if len(fold_of) != len(y_true):
        raise ValueError(f"fold_of has {len(fold_of)} ids for {len(y_true)} validation images: give one per image.")
    scores = batched_scores(y_true, preds)
    sweep = pd.DataFrame({"threshold" if rule == "hybrid" else "weight": grid, "accuracy": scores["accuracy"],
                          "macro_f1": scores["macro_f1"]})
    if fallback is not None:
        sweep["fallback_fraction"] = fallback.mean(axis=1)
    oof_pred, oof_fallback, fold_values = np.empty(len(y_true), np.int64), np.zeros(len(y_true), bool), []
    for k in np.unique(fold_of):
        held, rest = fold_of == k, fold_of != k
        if not rest.any():  # one fold: nothing to cross-fit on, the figures are in-sample (n_folds says so)
            rest = held
        rest_scores = batched_scores(y_true[rest], preds[:, rest])
        value = best_grid_value(grid, rest_scores["macro_f1"], rest_scores["accuracy"])
        g = int(np.flatnonzero(grid == value)[0])
        oof_pred[held] = preds[g, held]
        if fallback is not None:
            oof_fallback[held] = fallback[g, held]
        fold_values.append(value)
    chosen = best_grid_value(grid, scores["macro_f1"], scores["accuracy"])
    return FusionChoice(sweep.columns[0], chosen, tuple(fold_values), oof_pred,
                        oof_fallback if fallback is not None else None, sweep)


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


# =============================================================================================
# 8. Results: metrics with bootstrap intervals, tables, plots
# =============================================================================================


def _ids(y, name: str, n_classes: int | None = None) -> np.ndarray:
    """Integer class ids as int64, checked to lie in 0..n_classes-1."""
    a = np.asarray(y)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids; got dtype {a.dtype}.")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or (n_classes is not None and a.max() >= n_classes)):
        allowed = "non-negative" if n_classes is None else f"in 0..{n_classes - 1}"
        raise ValueError(f"{name} ids must be {allowed}; got {a.min()}..{a.max()}.")
    return a


def coarse_of(labels7) -> np.ndarray:
    """(N,) region ids (COARSE_CLASSES order) of (N,) official ids (LABELS order)."""
    return np.asarray(LABEL_ID_TO_COARSE_ID, dtype=np.int64)[_ids(labels7, "labels7", len(LABELS))]


def summary_metrics(y_true, y_pred) -> dict[str, float]:
    """Accuracy, macro F1 and weighted F1 (scikit-learn; averages over the classes present in either)."""
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted"))}


def classification_table(y_true, y_pred, labels: Sequence[str] = LABELS) -> pd.DataFrame:
    """Per-class precision / recall / F1 / support (one row per name, ids = positions) plus macro and
    weighted averages over the classes present in either (as summary_metrics); an absent class shows
    support 0."""
    y_true, y_pred = _ids(y_true, "y_true", len(labels)), _ids(y_pred, "y_pred", len(labels))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(len(labels)), zero_division=0)
    table = pd.DataFrame({"precision": p, "recall": r, "f1": f, "support": s}, index=pd.Index(labels, name="class"))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        table.loc[f"{average} avg"] = [p, r, f, len(y_true)]
    return table.astype({"support": int})


def batched_scores(y_true, y_pred) -> dict[str, np.ndarray]:
    """Accuracy, macro F1 and weighted F1 of B prediction rows at once, equal to scikit-learn's per row.

    y_true (N,) or (B, N), y_pred (B, N) -> each (B,). Hand-written because the bootstrap scores 1,000
    resamples per model and the fusion choice 101 grid values per fold: one bincount over all rows instead
    of scikit-learn calls per row. Measured on 186 images: 0.008 s against 3.1 s for one model's resamples
    (the Results cell bootstraps 8), so the notebook would spend ~25 s more in scikit-learn.
    """
    y_pred = np.atleast_2d(_ids(y_pred, "y_pred"))  # (B, N)
    y_true = np.broadcast_to(_ids(y_true, "y_true"), y_pred.shape)  # (B, N)
    b, n = y_pred.shape
    k = int(max(y_true.max(), y_pred.max())) + 1
    offset = np.arange(b)[:, None] * k  # one block of k bins per row
    hit = y_true == y_pred
    count = lambda ids, mask=None: np.bincount((offset + ids)[mask] if mask is not None else (offset + ids).ravel(),
                                               minlength=b * k).reshape(b, k)
    tp, support, predicted = count(y_true, hit), count(y_true), count(y_pred)  # (B, K) each
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros((b, k)), where=present)  # (B, K)
    return {"accuracy": hit.mean(axis=1), "macro_f1": f1.sum(axis=1) / present.sum(axis=1),
            "weighted_f1": (f1 * support).sum(axis=1) / n}


def bootstrap_ci(y_true, y_pred, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Percentile bootstrap intervals of accuracy, macro F1 and weighted F1: the N (true, pred) pairs
    resampled with replacement. Resamples depend only on (seed, N), so models scored on the same images
    are compared on the same resamples. Rows per metric: estimate, low, high ((1 - alpha) interval)."""
    y_true, y_pred = _ids(y_true, "y_true"), _ids(y_pred, "y_pred")
    if len(y_true) == 0 or len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred must be non-empty and equally long; got {len(y_true)} and {len(y_pred)}.")
    idx = np.random.default_rng(seed).integers(0, len(y_true), size=(n_boot, len(y_true)))  # (B, N)
    boot, full = batched_scores(y_true[idx], y_pred[idx]), batched_scores(y_true, y_pred[None])
    return pd.DataFrame({m: {"estimate": float(full[m][0]), "low": float(np.quantile(boot[m], alpha / 2)),
                             "high": float(np.quantile(boot[m], 1 - alpha / 2))} for m in boot}).T.rename_axis("metric")


def comparison_table(predictions: Mapping[str, object], y_true, seed: int = 0) -> pd.DataFrame:
    """One row per model ({name: (N,) predicted ids}): accuracy, macro_f1, weighted_f1, each with its
    bootstrap _low / _high bounds (paired: the same resamples for every model)."""
    rows = {}
    for name, y_pred in predictions.items():
        ci = bootstrap_ci(y_true, y_pred, seed=seed)
        rows[name] = {f"{m}{suffix}": ci.loc[m, col] for m in ci.index
                      for suffix, col in (("", "estimate"), ("_low", "low"), ("_high", "high"))}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def branch_accuracy(y_true, y_pred, fell_back) -> pd.DataFrame:
    """How many images each branch of the hybrid rule decided and its accuracy: rows "prototype",
    "DINOv2 fallback", "all"; columns n, fraction, accuracy (NaN for an empty branch)."""
    correct = _ids(y_true, "y_true") == _ids(y_pred, "y_pred")
    fell_back = np.asarray(fell_back, dtype=bool)
    branches = {"prototype": ~fell_back, "DINOv2 fallback": fell_back, "all": np.ones_like(fell_back)}
    return pd.DataFrame.from_dict({name: {"n": int(m.sum()), "fraction": m.mean() if len(m) else np.nan,
                                          "accuracy": correct[m].mean() if m.any() else np.nan}
                                   for name, m in branches.items()}, orient="index").rename_axis("branch")


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
            ax.text(0.5, 0.5, f"cannot load\n{Path(path).name}\n{type(e).__name__}", ha="center", va="center", fontsize=7)
        ax.set_title(text, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


# =============================================================================================
# 9. Retrieval: Tracks 2 and 3
# =============================================================================================


def retrieval_gallery(data: EntrepData, queries: Mapping[str, pd.DataFrame], mode: str = "test_folders") -> pd.DataFrame:
    """The images Tracks 2 and 3 answer from: file, path, sha1, listed.

    "test_folders" (default): every readable image in the folders holding the chosen test lists' images,
    listed or not; the challenge's database is wider than the lists (ENTREP.md: the paper authors' answers
    were mostly images no list names). "lists": only the images the chosen cls and i2i lists name.
    "all": test_folders plus every labelled and annotated image. Identical contents are kept once
    (a listed file first, then by path).
    """
    if mode not in RETRIEVAL_GALLERIES:
        raise ValueError(f"retrieval_gallery={mode!r}: use one of {RETRIEVAL_GALLERIES}.")
    listed = pd.concat([queries["cls"], queries["i2i"]])
    listed = listed[listed["path"] != ""]
    rows = listed[["file", "path", "sha1"]]
    if mode != "lists":
        folders = {str(Path(p).parent) for p in listed["path"]}
        rows = data.folder_images[data.folder_images["folder"].isin(folders)][["file", "path", "sha1"]]
    if mode == "all":
        annotated = [*data.images["path"], *data.i2i["query_path"], *data.i2i["match_path"], *data.t2i["path"]]
        rows = pd.concat([rows, pd.DataFrame({"file": [Path(p).name for p in annotated], "path": annotated,
                                              "sha1": [data.sha1[p] for p in annotated]})])
    rows = rows.assign(listed=rows["path"].isin(set(listed["path"])))
    return rows.sort_values(["listed", "path"], ascending=[False, True]).drop_duplicates("sha1").reset_index(drop=True)


def cosine_topk(query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int, query_ids: Sequence | None = None,
                gallery_ids: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery rows by cosine (give unit rows: the score is their dot product) for each query:
    (scores [Q, k], indices [Q, k]), best first, equal
    scores by lower gallery index. A pair with equal ids (the query itself, or the same content: pass
    file_sha1s) is never returned; a slot with no candidate left holds index -1 and score -inf.
    Queries are scored in blocks of at most 2^24 scores, so memory stays bounded for any gallery."""
    n_q, n_g = len(query_feats), len(gallery_feats)
    k = min(k, n_g)
    same = None
    if query_ids is not None:
        codes = {v: i for i, v in enumerate(dict.fromkeys([*query_ids, *gallery_ids]))}
        q_codes, g_codes = (torch.tensor([codes[v] for v in ids]) for ids in (query_ids, gallery_ids))
    scores, indices = [torch.empty(0, k)], [torch.empty(0, k, dtype=torch.long)]
    block = max(1, 2**24 // max(n_g, 1))
    for start in range(0, n_q, block):
        sim = query_feats[start:start + block].float() @ gallery_feats.float().T  # (q, G)
        if query_ids is not None:
            same = q_codes[start:start + block, None] == g_codes[None, :]
            sim.masked_fill_(same, float("-inf"))
        s, i = torch.sort(sim, dim=1, descending=True, stable=True)
        scores.append(s[:, :k].clone())  # a view would keep the block's whole sorted matrix alive
        indices.append(i[:, :k].masked_fill(s[:, :k] == float("-inf"), -1))
    return torch.cat(scores), torch.cat(indices)


def rerank_by_region(scores: torch.Tensor, indices: torch.Tensor, query_region: torch.Tensor,
                     gallery_region: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank each shortlist by score + beta * P(same region), P = sum_c p_query[c] * p_candidate[c] from
    the coarse prototype classifier: i2i partners share the region but often not the side or state
    (ENTREP.md), so the fine label must not be asked for. Ties keep the previous order."""
    agree = (query_region[:, None, :] * gallery_region[indices.clamp(min=0)]).sum(-1)  # (Q, K)
    new_scores = scores + beta * agree
    order = torch.sort(new_scores, dim=1, descending=True, stable=True).indices
    return new_scores.gather(1, order), indices.gather(1, order)


def rank_gallery(query_feats: torch.Tensor, gallery_feats: torch.Tensor, query_ids: Sequence, gallery_ids: Sequence,
                 k: int = 10, query_region: torch.Tensor | None = None, gallery_region: torch.Tensor | None = None,
                 beta: float = 0.0) -> torch.Tensor:
    """Track 2's ranking [Q, k] of gallery indices: cosine top-k without the query's own content, then
    region re-ranking when beta > 0. Validation and the test answers both rank with it."""
    scores, ranked = cosine_topk(query_feats, gallery_feats, k, query_ids, gallery_ids)
    if beta:
        ranked = rerank_by_region(scores, ranked, query_region, gallery_region, beta)[1]
    return ranked


def retrieval_hits(ranked: torch.Tensor | np.ndarray, relevant: Sequence[Iterable[int]]) -> np.ndarray:
    """[Q, K] bool: ranked[q, j] is one of the gallery indices relevant to query q."""
    ranked = np.asarray(ranked)
    if len(relevant) != len(ranked):
        raise ValueError(f"{len(ranked)} rankings but {len(relevant)} relevance sets: give one per query.")
    return np.array([[int(g) in set(r) for g in row] for row, r in zip(ranked, relevant)], dtype=bool).reshape(ranked.shape)


def retrieval_metrics(ranked: torch.Tensor | np.ndarray, relevant: Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10),
                      n_boot: int = 0, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Recall@k (a relevant item in the top k; a query with none counts as a miss) and MRR (1 / rank of
    the first relevant item, 0 when it is not in the ranking) over the queries. With n_boot, each metric
    also gets `_low` / `_high`: the percentile bootstrap interval over queries resampled with replacement
    (resamples depend only on (seed, number of queries): paired across embeddings)."""
    hits = retrieval_hits(ranked, relevant)
    if not len(hits):
        return {**{f"R@{k}": float("nan") for k in ks}, "MRR": float("nan")}
    per_query = {f"R@{k}": hits[:, :k].any(1).astype(float) for k in ks}  # (Q,) each
    per_query["MRR"] = 1.0 / np.where(hits, np.arange(1, hits.shape[1] + 1), np.inf).min(1, initial=np.inf)  # 0: no hit
    out = {m: float(v.mean()) for m, v in per_query.items()}
    if n_boot:
        idx = np.random.default_rng(seed).integers(0, len(hits), size=(n_boot, len(hits)))  # (B, Q)
        for m, v in per_query.items():
            out[f"{m}_low"], out[f"{m}_high"] = np.quantile(v[idx].mean(1), [alpha / 2, 1 - alpha / 2]).tolist()
    return out


def best_retrieval_row(table: pd.DataFrame) -> pd.Series:
    """The retrieval choice rule: the row with the best R@1, then MRR, then the first in the table's order."""
    return table.sort_values(["R@1", "MRR"], ascending=False, kind="stable").iloc[0]


def choose_rerank_beta(scores: torch.Tensor, indices: torch.Tensor, query_region: torch.Tensor,
                       gallery_region: torch.Tensor, relevant: Sequence[Iterable[int]]) -> tuple[float, pd.DataFrame]:
    """Region re-ranking boost from RERANK_BETA_GRID chosen on the given pairs only: best R@1, then MRR,
    then the smaller beta. Returns (beta, table of R@1 / R@5 / MRR per beta)."""
    table = pd.DataFrame([{"beta": beta, **retrieval_metrics(rerank_by_region(scores, indices, query_region,
                                                                              gallery_region, beta)[1], relevant, (1, 5))}
                          for beta in sorted(RERANK_BETA_GRID)])
    return float(best_retrieval_row(table)["beta"]), table


def held_out_images(data: EntrepData, train_paths: Iterable[str], val_paths: Iterable[str]) -> set[str]:
    """The images retrieval is validated on, fixed before any training: the validation images and both
    images of every i2i pair that touches no training image (pairs stay whole: the split keeps a pair's
    labelled images on one side, and unlabelled pair images are in neither). No model trains on them."""
    seen = set(train_paths)
    pairs = [(q, m) for q, m in zip(data.i2i["query_path"], data.i2i["match_path"]) if not {q, m} & seen]
    return set(val_paths) | {p for pair in pairs for p in pair}


def i2i_eval_set(i2i: pd.DataFrame, distractors: Sequence[str] = ()) -> tuple[list[str], list[int], list[set[int]]]:
    """Track 2 validation from annotated pairs: the gallery is every image of the pairs plus `distractors`
    (other images, as the test's database holds far more than the partners); each pair's query is a
    query and its match relevant. Returns (gallery paths, query rows, relevant row sets)."""
    pair_images = sorted(set(i2i["query_path"]) | set(i2i["match_path"]))
    gallery = pair_images + sorted(set(distractors) - set(pair_images))
    row = {p: i for i, p in enumerate(gallery)}
    relevant: dict[int, set[int]] = defaultdict(set)
    for q, m in zip(i2i["query_path"], i2i["match_path"]):
        if q != m:
            relevant[row[q]].add(row[m])
    return gallery, sorted(relevant), [relevant[q] for q in sorted(relevant)]


def validation_distractors(candidates: Sequence[str], n_pair_images: int, gallery_size: int, n_queries: int,
                           seed: int) -> list[str]:
    """Distractors for i2i_eval_set: as many of `candidates` (labelled images outside the pairs, seeded
    draw) as make the validation gallery as many times larger than its queries as the test's is
    (gallery_size / n_queries); all of them when there is no test list to copy."""
    candidates = sorted(candidates)
    n = len(candidates) if n_queries == 0 else round(n_pair_images * max(gallery_size / n_queries - 1, 0))
    picked = np.random.default_rng(seed).permutation(len(candidates))[:n]
    return [candidates[i] for i in sorted(picked)]


def evaluate_i2i(feats: Mapping[str, torch.Tensor], ids: Sequence[str], query_rows: Sequence[int],
                 relevant: Sequence[set[int]], choose_on: Sequence[int], region: torch.Tensor | None = None,
                 k: int = 10) -> tuple[pd.DataFrame, dict]:
    """Track 2 on annotated pairs, per candidate embedding {name: [G, D]} of one gallery (ids: its content
    ids, so no query finds itself), plain and region re-ranked (region [G, 4], beta by choose_rerank_beta).
    The re-ranking boost and then the embedding (by R@1, then MRR) are chosen on the queries at positions
    `choose_on`: pairs no model trained on where there are any, else all pairs, which the table and the
    choice then say. Returns (table: embedding, pairs, ranking, beta, n, R@1, R@5, R@10, MRR, each with
    its 95% bootstrap _low / _high; choice: embedding, beta, chosen_on)."""
    queries = list(query_rows)
    if not queries:
        return pd.DataFrame(), {"embedding": next(iter(feats)), "beta": 0.0,
                                "chosen_on": "no annotated pairs: the first embedding, no re-ranking"}
    held_out = bool(len(choose_on))
    choose_on = list(choose_on) if held_out else list(range(len(queries)))
    subsets = {"held-out pairs (choice)": choose_on} if held_out else {}
    subsets["all pairs" + ("" if held_out else " (choice; includes pairs a model trained on)")] = list(range(len(queries)))
    rows, betas = [], {}
    for name, f in feats.items():
        scores, ranked = cosine_topk(f[queries], f, k, [ids[q] for q in queries], ids)
        beta = 0.0 if region is None else choose_rerank_beta(scores[choose_on], ranked[choose_on], region[queries][choose_on],
                                                             region, [relevant[i] for i in choose_on])[0]
        reranked = ranked if region is None else rerank_by_region(scores, ranked, region[queries], region, beta)[1]
        betas[name] = beta
        for subset, idx in subsets.items():
            for ranking, r, b in (("plain", ranked, 0.0), ("region re-rank", reranked, beta)):
                rows.append({"embedding": name, "pairs": subset, "ranking": ranking, "beta": b, "n": len(idx),
                             **retrieval_metrics(r[idx], [relevant[i] for i in idx], n_boot=1000)})
    table = pd.DataFrame(rows)
    pick = table[(table["pairs"] == next(iter(subsets))) & (table["ranking"] == "region re-rank")]
    best = best_retrieval_row(pick)
    where = f"{len(choose_on)} held-out pairs" if held_out else f"all {len(queries)} pairs (none held out)"
    return table, {"embedding": best["embedding"], "beta": betas[best["embedding"]], "chosen_on": where}


def caption_queries(t2i: pd.DataFrame, gallery: Sequence[str]) -> tuple[list[str], list[set[int]]]:
    """Track 3 validation from t2i.json: every distinct caption line (as description_queries) is a query,
    the gallery rows of every image carrying it relevant; images outside the gallery are dropped."""
    row = {p: i for i, p in enumerate(gallery)}
    return _finding_queries((text, row[p]) for text, p in zip(t2i["text"], t2i["path"]) if p in row)


def description_queries(descriptions: Sequence[str]) -> tuple[list[str], list[set[int]]]:
    """Track 3 validation from the public release: every distinct English finding line is a query and
    every image (index into `descriptions`) carrying it is relevant. Lines are compared case- and
    space-insensitively without end punctuation; the first spelling is the query text."""
    return _finding_queries((text, i) for i, text in enumerate(descriptions))


def _finding_queries(texts: Iterable[tuple[str, int]]) -> tuple[list[str], list[set[int]]]:
    """(text, gallery row) pairs -> (distinct finding lines, the rows carrying each)."""
    relevant: dict[str, set[int]] = {}
    spelling: dict[str, str] = {}
    for text, i in texts:
        for line in split_finding_lines(text):
            key = finding_key(line)
            spelling.setdefault(key, line)
            relevant.setdefault(key, set()).add(i)
    return [spelling[k] for k in relevant], list(relevant.values())


def text_to_image(model: nn.Module, tokenizer: Callable, texts: Sequence[str], image_feats: torch.Tensor,
                  device: torch.device, k: int = 10) -> torch.Tensor:
    """Track 3: embed `texts` with the CLIP text tower and rank the gallery [G, D]: indices [T, k]."""
    return cosine_topk(embed_texts(model, tokenizer, texts, device), image_feats, k)[1]


def plot_retrieval_gallery(query_paths: Sequence[str], ranked_paths: Sequence[Sequence[str]], hits: np.ndarray,
                           k: int = 5, row_labels: Sequence[str] | None = None) -> Figure:
    """One row per query: the query (blue frame), then its top k, relevant ones framed green, others red.
    row_labels title each row's query (e.g. the same query twice, "frozen" then "fine-tuned")."""
    fig = Figure(figsize=(2.0 * (k + 1), 2.1 * len(query_paths)), layout="constrained")
    axes = fig.subplots(max(len(query_paths), 1), k + 1, squeeze=False)
    for q, query in enumerate(query_paths):
        cells = [(query, "tab:blue", row_labels[q] if row_labels else "query")] + [(ranked_paths[q][j], "tab:green" if hits[q][j] else "tab:red",
                                                   f"#{j + 1}") for j in range(min(k, len(ranked_paths[q])))]
        for ax, (path, color, title) in zip(axes[q], cells):
            ax.imshow(load_thumbnail(path, 256))
            ax.set(xticks=[], yticks=[])
            ax.set_title(title, fontsize=8)
            for spine in ax.spines.values():
                spine.set(edgecolor=color, linewidth=4)
    return fig


# =============================================================================================
# 10. Submissions: one JSON at each zip's root, checked after writing
# =============================================================================================


def write_submission(track: str, queries: Sequence[str], answers: Sequence[object], out_dir: str | os.PathLike,
                     gallery: Sequence[str] | None = None) -> Path:
    """Write out_dir / SUBMISSIONS[track]'s zip holding its JSON {query: answer} alone at its root, atomically
    and with a fixed timestamp (a rerun writes the same bytes), then read it back with check_submission;
    an invalid zip is removed before the error is raised. A query listed twice is written once, with its
    first answer and a warning. Track 1 answers are label ids 0-6, Tracks 2-3 gallery file names."""
    if track not in SUBMISSIONS:
        raise ValueError(f"track must be one of {tuple(SUBMISSIONS)}; got {track!r}.")
    queries, answers = [str(q) for q in queries], [a.item() if isinstance(a, np.generic) else a for a in answers]
    if len(queries) != len(answers):
        raise ValueError(f"{track}: {len(queries)} queries but {len(answers)} answers; pass one answer per query.")
    repeated = [q for q, c in Counter(queries).items() if c > 1]
    if repeated:
        warnings.warn(f"{track}: {len(repeated)} queries are listed more than once (e.g. {repeated[:3]}); the JSON "
                      "holds each once, with its first answer.", stacklevel=2)
    mapping: dict[str, object] = {}
    for q, a in zip(queries, answers):
        mapping.setdefault(q, a)  # the first answer wins
    zip_path = Path(out_dir) / SUBMISSIONS[track][0]
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    info = zipfile.ZipInfo(SUBMISSIONS[track][1], date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr(info, json.dumps(mapping, ensure_ascii=False, indent=1).encode("utf-8"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, zip_path)
    try:
        check_submission(zip_path, track, queries, gallery)
    except ValueError:
        zip_path.unlink()
        raise
    return zip_path


def check_submission(zip_path: str | os.PathLike, track: str, queries: Sequence[str],
                     gallery: Sequence[str] | None = None) -> dict:
    """Read a submission zip and check it against the challenge's rules (ENTREP.md): exactly one JSON at its
    root, named for the track; a JSON object holding every listed query exactly once; Track 1 values
    integer ids 0-6; Tracks 2-3 values images of `gallery`, and a Track 2 query never answered by itself.
    Returns the mapping; raises ValueError naming the zip and every problem."""
    def no_repeats(pairs: list) -> dict:
        if repeated := [k for k, c in Counter(k for k, _ in pairs).items() if c > 1]:
            raise ValueError(f"the JSON repeats keys {repeated[:3]}")
        return dict(pairs)

    if track not in SUBMISSIONS:
        raise ValueError(f"track must be one of {tuple(SUBMISSIONS)}; got {track!r}.")
    name = SUBMISSIONS[track][1]
    try:
        with zipfile.ZipFile(zip_path) as zf:
            if zf.namelist() != [name]:
                raise ValueError(f"it must hold exactly {name} at its root; it holds {zf.namelist()}")
            mapping = json.loads(zf.read(name).decode("utf-8"), object_pairs_hook=no_repeats)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{zip_path} is not a valid {track} submission: {e}.") from e
    if not isinstance(mapping, dict):
        raise ValueError(f"{zip_path}: {name} must hold a JSON object {{query: answer}}.")
    problems, listed = [], set(queries)
    if missing := [q for q in dict.fromkeys(queries) if q not in mapping]:
        problems.append(f"{len(missing)} listed queries missing, e.g. {missing[:3]}")
    if extra := [k for k in mapping if k not in listed]:
        problems.append(f"{len(extra)} keys are not listed queries, e.g. {extra[:3]}")
    if track == "track1":
        bad = [f"{k}: {v!r}" for k, v in mapping.items() if type(v) is not int or not 0 <= v < len(LABELS)]
    elif gallery is None:
        raise ValueError(f"{zip_path}: pass gallery= (the image names a {track} answer may use).")
    else:
        pool = set(gallery)
        bad = [f"{k} -> {v!r}" for k, v in mapping.items() if not isinstance(v, str) or v not in pool
               or (track == "track2" and v == k)]
    if bad:
        problems.append(f"{len(bad)} answers are not {'label ids 0-6' if track == 'track1' else 'gallery images other than the query'}"
                        f", e.g. {bad[:3]}")
    if problems:
        raise ValueError(f"{zip_path} is not a valid submission:\n- " + "\n- ".join(problems)
                         + "\nFix the predictions and write it again; do not upload this file.")
    return mapping


# =============================================================================================
# 11. Learned retrieval (beyond the paper): contrastive fine-tuning of BiomedCLIP for Tracks 2 and 3
# =============================================================================================

# What follows a tower's blocks (final norms, projections) in open_clip's two layouts: its own CLIP
# (the tiny model) and timm + Hugging Face towers (BiomedCLIP). Trained with the last blocks by "tail".
_TOWER_TAIL = re.compile(r"^(visual\.(proj|ln_post|trunk\.norm|trunk\.fc_norm|head)|text_projection|ln_final|text\.proj)")


@dataclass(frozen=True)
class RetrievalConfig:
    """Contrastive fine-tuning of BiomedCLIP for retrieval (the project's recipe: the paper froze its
    embeddings). tuning "tail" trains the last `blocks` blocks of each tower with the final norms and
    projections; "lora" trains LoRA adapters of rank `lora_rank` (peft) on those blocks' linear layers.
    The loss is multi-positive InfoNCE at `temperature`: text -> image and image -> text over the batch's
    finding lines (a line is positive for every image carrying it, never a negative), and image -> image
    over two augmented views per image (DINO_TRAIN_AUGMENT; either view mirrored at mirror_p: a mirrored
    view shows the same site, though another class), whose positives are the views of its group (i2i
    partners, one examination's images). AdamW at lr with warmup + cosine, autocast; a fixed number of
    epochs, no epoch chosen on held-out data (it stays untouched for the evaluation)."""

    tuning: str = "tail"
    blocks: int = 2
    lora_rank: int = 8
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    temperature: float = 0.05
    mirror_p: float = 0.5
    amp: str = "auto"
    seed: int = 0


def retrieval_training_set(data: EntrepData, exclude: Iterable[str], class_texts: bool = True) -> pd.DataFrame:
    """The supervision the data holds for learning retrieval, without the `exclude`d (held-out) images:
    one row per labelled or annotated image: path, sha1, group (images linked by an i2i pair, one
    examination or identical bytes share it: split_groups), texts (its t2i captions, the finding lines of
    its English description and, with class_texts, its label's prompts in the paper diagram's template)."""
    texts: dict[str, list[str]] = defaultdict(list)
    for text, path in zip(data.t2i["text"], data.t2i["path"]):
        texts[path].append(text)
    for path, description, label in zip(data.images["path"], data.images["description_en"], data.images["label"]):
        texts[path] += split_finding_lines(description)
        texts[path] += [PROMPT_TEMPLATES[0].format(t) for t in FINE_CLASS_TEXTS[label]] if class_texts else []
    paths = sorted((set(data.images["path"]) | set(data.i2i["query_path"]) | set(data.i2i["match_path"])
                    | set(data.t2i["path"])) - set(exclude))
    frame = pd.DataFrame({"path": paths, "file": [Path(p).name for p in paths], "sha1": [data.sha1[p] for p in paths]})
    return frame.assign(group=split_groups(frame, data.i2i), texts=[sorted(set(texts[p])) for p in paths])


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
    """SquareImages (flip_p = the mirror probability) giving two augmented views of each image:
    key (index, seed) -> (view, view, index, seed)."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        index, seed = key
        return super().__getitem__((index, seed))[0], super().__getitem__((index, seed + 1))[0], index, seed


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
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets), model)
    elif cfg.tuning != "tail":
        raise ValueError(f"retrieval tuning {cfg.tuning!r}: use one of {RETRIEVAL_TUNINGS[:2]} (or 'off' to skip it).")
    for name, p in model.named_parameters():
        p.requires_grad = ("lora_" in name) if cfg.tuning == "lora" else (name.startswith(blocks) or bool(_TOWER_TAIL.match(name)))
    return [name for name, p in model.named_parameters() if p.requires_grad]


@dataclass
class TunedCLIP:
    """A contrastively fine-tuned copy of a CLIP model, where its trained weights are, and the history."""

    model: nn.Module
    path: Path
    history: pd.DataFrame


def train_retrieval(model: nn.Module, tokenizer: Callable, preprocess: Callable, train: pd.DataFrame,
                    cfg: RetrievalConfig, *, checkpoint_dir: str | os.PathLike, device: torch.device,
                    num_workers: int = 0, progress: bool = True) -> TunedCLIP:
    """Fine-tune a copy of `model` (the original is left as it is) for retrieval with cfg on `train`
    (retrieval_training_set). Checkpoints as train_dino's: checkpoint_dir/retrieval_<id>/, <id> over the
    model's weights, the images' content, groups and texts, and cfg; last.pt every epoch (trainable
    weights, optimizer, scheduler, scaler, history), best.pt = the weights to use (the last epoch's). A rerun
    resumes or reuses; a resumed run ends with the weights of an uninterrupted one. One bar, over epochs."""
    if cfg.epochs < 1 or len(train) < 2:
        raise ValueError(f"retrieval fine-tuning needs epochs >= 1 and two or more images; got {cfg.epochs} and {len(train)}.")
    size = model.visual.image_size  # open_clip keeps an int or a (height, width) pair
    amp, size = resolve_amp(cfg.amp, device), int(size[0] if isinstance(size, (tuple, list)) else size)
    identity = {"model": model_fingerprint(model), "config": {**asdict(cfg), "amp": str(amp)},
                "train": [[s, int(g), t] for s, g, t in zip(train["sha1"], train["group"], train["texts"])],
                "augment": {k: str(v) for k, v in DINO_TRAIN_AUGMENT.items()}}
    run_id = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    run_dir = Path(checkpoint_dir) / f"retrieval_{run_id[:12]}"
    tuned = copy.deepcopy(model).to(device)
    trainable = set(make_tunable(tuned, cfg))
    state, best = _resume_state(run_dir, run_id)
    if state is not None and state["finished"]:
        tqdm.write(f"train_retrieval: reusing finished run {run_dir}.")
        tuned.load_state_dict(best["model"], strict=False)
        return TunedCLIP(tuned.eval(), run_dir / "best.pt", pd.DataFrame(state["history"]))

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"run_id": run_id, **identity}, indent=1))
    a = DINO_TRAIN_AUGMENT
    normalize = next(t for t in preprocess.transforms if isinstance(t, T.Normalize))  # the model's own mean / std
    transform = T.Compose([T.RandomRotation(a["rotate_degrees"], interpolation=T.InterpolationMode.BILINEAR, fill=0),
                           T.RandomResizedCrop(size, scale=a["scale"], ratio=a["ratio"], interpolation=T.InterpolationMode.BICUBIC),
                           T.ColorJitter(a["color_jitter"], a["color_jitter"], a["color_jitter"]), T.ToTensor(), normalize])
    views = TwoViews(train["path"].tolist(), None, transform, train_square_side(size), cfg.mirror_p)
    sampler = EpochSampler(len(views), cfg.seed, groups=train["group"].tolist())
    loader = _loader(views, cfg.batch_size, num_workers, device, sampler=sampler, drop_last=len(views) > cfg.batch_size)
    groups = torch.tensor(train["group"].to_numpy())
    texts = [list(t) for t in train["texts"]]
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, round(cfg.warmup_epochs * len(loader)), cfg.epochs * len(loader)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    start, history = 0, []
    if state is not None:
        tuned.load_state_dict(state["model"], strict=False)
        for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
            if state[key]:
                obj.load_state_dict(state[key])
        start, history = state["epoch"], state["history"]
        tqdm.write(f"train_retrieval: resuming {run_dir} after epoch {start}/{cfg.epochs}.")

    bar = tqdm(total=cfg.epochs, initial=start, desc=f"retrieval ({cfg.tuning})", disable=not progress)
    for epoch in range(start, cfg.epochs):
        started, total = time.perf_counter(), 0.0
        sampler.set_epoch(epoch)
        seed_everything(epoch_seed(cfg.seed, epoch))
        tuned.train()
        for first, second, index, seed in loader:
            with autocast(device, amp):
                loss = _retrieval_loss(tuned, tokenizer, first.to(device), second.to(device), groups[index].to(device),
                                       [texts[i][s % len(texts[i])] if texts[i] else None for i, s in zip(index.tolist(), seed.tolist())],
                                       [texts[i] for i in index.tolist()], cfg.temperature, device)
            scaler.scale(loss).backward()
            optimizer_step(optimizer, scheduler, scaler)
            total += loss.item()
        history.append({"epoch": epoch + 1, "train_loss": total / max(len(loader), 1), "seconds": time.perf_counter() - started})
        weights = {k: v for k, v in tuned.state_dict().items() if k in trainable}
        atomic_save({"model": weights, "epoch": epoch + 1}, run_dir / "best.pt")
        atomic_save({"run_id": run_id, "model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch + 1, "finished": epoch + 1 == cfg.epochs,
                     "history": history}, run_dir / "last.pt")
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    return TunedCLIP(tuned.eval(), run_dir / "best.pt", pd.DataFrame(history))


def _retrieval_loss(model: nn.Module, tokenizer: Callable, first: torch.Tensor, second: torch.Tensor, groups: torch.Tensor,
                    chosen: Sequence[str | None], carried: Sequence[Sequence[str]], temperature: float,
                    device: torch.device) -> torch.Tensor:
    """One batch's loss (RetrievalConfig): image -> image over the two views of B images, positives = the
    other views of the same group; then text <-> image over the distinct finding lines chosen for the
    batch (`chosen`: one per image, or None), an image positive for every line it carries (`carried`)."""
    views = F.normalize(model.encode_image(torch.cat([first, second])).float(), dim=-1)  # (2B, D)
    g = groups.repeat(2)
    eye = torch.eye(len(g), dtype=torch.bool, device=device)
    sim = (views @ views.T / temperature).masked_fill(eye, float("-inf"))
    loss = multi_positive_nce(sim, (g[:, None] == g[None, :]) & ~eye)
    spelling = {finding_key(t): t for t in chosen if t}  # one query per key (its last spelling), in first-seen order
    if spelling:
        keys = list(spelling)
        text = F.normalize(model.encode_text(tokenizer([spelling[k] for k in keys]).to(device)).float(), dim=-1)  # (K, D)
        carried_keys = [{finding_key(t) for t in mine} for mine in carried]
        carries = torch.tensor([[k in mine for mine in carried_keys] for k in keys], device=device)
        sim_t = text @ views[:len(first)].T / temperature  # (K, B)
        loss = loss + multi_positive_nce(sim_t, carries) + multi_positive_nce(sim_t.T, carries.T)
    return loss


def fuse_embeddings(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Score fusion as one embedding: [sqrt(w) a, sqrt(1 - w) b] of unit rows is a unit row whose cosine
    with another is w * cosine_a + (1 - w) * cosine_b. [N, Da + Db]."""
    return torch.cat([math.sqrt(weight) * a, math.sqrt(1.0 - weight) * b], dim=1)


def evaluate_t2i(models: Mapping[str, tuple[nn.Module, FeatureTable]], tokenizer: Callable,
                 query_sets: Mapping[str, tuple[Sequence[str], Sequence[set[int]], Sequence[str]]],
                 device: torch.device) -> tuple[pd.DataFrame, dict]:
    """Track 3 on held-out queries, per candidate {name: (CLIP model, its image FeatureTable)} and query set
    {name: (texts, relevant gallery rows, gallery paths)}: R@1 / R@5 / R@10 / MRR with bootstrap intervals.
    The model is chosen on the first query set that has queries (R@1, then MRR); with none, the first
    model, said so. Returns (table: queries, model, n, gallery, metrics; choice: model, chosen_on)."""
    rows = [{"queries": q, "model": name, "n": len(texts), "gallery": len(paths),
             **retrieval_metrics(text_to_image(model, tokenizer, texts, table[paths], device), relevant, n_boot=1000)}
            for q, (texts, relevant, paths) in query_sets.items() if len(texts) for name, (model, table) in models.items()]
    table = pd.DataFrame(rows)
    if table.empty:
        return table, {"model": next(iter(models)), "chosen_on": "no held-out captions or finding lines: the first model"}
    first = table[table["queries"] == table["queries"].iloc[0]]
    best = best_retrieval_row(first)
    return table, {"model": best["model"], "chosen_on": f"{best['n']} held-out {best['queries']}"}
