"""The method's helpers for entrep-prototypical.ipynb, in the notebook's order.

1. Constants    label ids, regions, fine decisions, prompts, model names, grids, file names; label maps
2. Data         every ENTRep layout, problems, leakage, test lists, the validation split
3. BiomedCLIP   loading (hub, local-dir, tiny), embeddings cached by content
4. Scores       accuracy and F1 with bootstrap intervals, per-class tables
5. Prototypes   joint vision-language prototypes and their classifier
6. DINOv2       SurgeNet weights, heads, flip-swap images, cached inference
7. Hybrid       the paper's fusion rule, its threshold cross-fitted on validation
8. Submissions  the challenge's zip files, checked after writing

Beside it: training.py (fine-tuning DINOv2 and BiomedCLIP), retrieval.py (Tracks 2 and 3), plots.py
(figures and the closing report), preflight.py (Setup's checks of a run) and runtime.py (device,
precision, packages, files). Every helper takes what it uses as arguments; nothing runs at import time.
Tensor layout: features [N, D] with unit rows, prototypes [C, D], probabilities [N, C],
logits = scale * feats @ protos.T. No section calls into a later one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import random
import re
import tempfile
import unicodedata
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import open_clip
import pandas as pd
import timm
import timm.data
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from scipy.special import softmax
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_fscore_support
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, train_test_split
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from runtime import Runtime, atomic_path, autocast, cpu_count, data_parallel, progress, seeded

# =============================================================================================
# 1. Constants and label maps
# =============================================================================================

# Official Track 1 ids (the submission values), ENTRep challenge page (../shared/ENTREP.md).
LABELS: tuple[str, ...] = ("nose-right", "nose-left", "ear-right", "ear-left", "vc-open", "vc-closed", "throat")
LABEL_TO_ID: dict[str, int] = {name: i for i, name in enumerate(LABELS)}

# The paper's coarse level: 4 anatomical regions, and the label -> region map.
COARSE_CLASSES: tuple[str, ...] = ("ear", "nose", "vc", "throat")
COARSE_TO_ID: dict[str, int] = {name: i for i, name in enumerate(COARSE_CLASSES)}
LABEL_TO_COARSE: dict[str, str] = {"nose-right": "nose", "nose-left": "nose", "ear-right": "ear", "ear-left": "ear",
                                   "vc-open": "vc", "vc-closed": "vc", "throat": "throat"}
LABEL_ID_TO_COARSE_ID: tuple[int, ...] = tuple(COARSE_TO_ID[LABEL_TO_COARSE[name]] for name in LABELS)  # 1100223

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
                              "ear-left": "ear-right", "vc-open": "vc-open", "vc-closed": "vc-closed",
                              "throat": "throat"}

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The annotation and test-list files of the ENTRep releases (ENTREP.md "Data layouts seen").
ANNOTATION_FILES: frozenset[str] = frozenset({"cls.json", "i2i.json", "t2i.json", "data.json", "cls.csv", "i2i.csv",
                                              "t2i.csv"})

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

# BiomedCLIP (Zhang et al. 2023), the paper's CLIP model (biomedclip_offline.py: its offline copy).
BIOMEDCLIP_HUB_ID: str = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
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

# Grids searched on validation data only (project's choices).
JOINT_WEIGHT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))  # prototypes: 0 text .. 1 image
TEMPERATURE_GRID: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)  # prototypes; CLIP's is 0.01
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(101))  # hybrid confidence
SOFT_FUSION_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))  # soft fusion: 0 DINOv2 .. 1 proto
FUSION_FOLDS: int = 5  # cross-fitting folds for the fusion choice
# A binary head's p(second label) above this picks the second label (argmax over [1 - p, p]; 0.5 -> first).
FINE_DECISION_THRESHOLD: float = 0.5

# Parameter values with a meaning of their own.
SPLITS: tuple[str, ...] = ("grouped", "stratified")  # examination-grouped (default) or the paper's plain split
# How a frame becomes the models' square input: "crop" the centre square (the circular field of view is
# about the frame's height), or "pad" the whole frame letterboxed on black (the Track 1 winner's choice).
RESIZES: tuple[str, ...] = ("crop", "pad")
MIXES: tuple[str, ...] = ("off", "mixup", "cutmix")  # same-label mixing while DINOv2 trains (training.DinoConfig)
RETRIEVAL_GALLERIES: tuple[str, ...] = ("test_folders", "lists", "all")  # see retrieval.gallery_images
RETRIEVAL_TUNINGS: tuple[str, ...] = ("tail", "lora", "off")  # see training.RetrievalConfig; "off": frozen (the paper)

# Submission files (ENTREP.md): each zip holds exactly one JSON at its root.
SUBMISSIONS: dict[str, tuple[str, str]] = {
    "track1": ("submission.zip", "submission.json"),  # {"<image file>": <int 0-6>}
    "track2": ("submission_i2i.zip", "submission_i2i.json"),  # {"<query image>": "<image>"}, never itself
    "track3": ("submission_t2i.zip", "submission_t2i.json"),  # {"<query text as given>": "<image>"}
}


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


def coarse_of(label_ids) -> np.ndarray:
    """(N,) region ids (COARSE_CLASSES order) of (N,) official ids (LABELS order)."""
    return np.asarray(LABEL_ID_TO_COARSE_ID, dtype=np.int64)[_ids(label_ids, "label_ids", len(LABELS))]


def flip_label_id(label_id: int) -> int:
    """Official id of the mirrored image's label: ear / nose left <-> right, vc state and throat kept.
    -1 (unlabelled) stays -1."""
    return label_id if label_id < 0 else LABEL_TO_ID[FLIP_LABEL[LABELS[label_id]]]


@dataclass(frozen=True)
class Level:
    """One level of the paper's labels: its class names, their prompt wordings, and the map from an
    official label to a class name (None: the official labels themselves)."""

    name: str
    class_names: tuple[str, ...]
    class_texts: Mapping[str, tuple[str, ...]]
    label_map: Mapping[str, str] | None = None

    def ids(self, label_ids) -> np.ndarray:
        """(N,) class ids at this level of (N,) official ids."""
        label_ids = _ids(label_ids, "label_ids", len(LABELS))
        if self.label_map is None:
            return label_ids
        return np.array([self.class_names.index(self.label_map[name]) for name in LABELS], dtype=np.int64)[label_ids]

    def names(self, label_ids) -> list[str]:
        """The class name at this level of each official id."""
        return [self.class_names[i] for i in self.ids(label_ids)]


# The coarse level (4 regions: the hybrid's gate) and the fine one (the 7 official labels).
LEVELS: dict[str, Level] = {"coarse": Level("coarse", COARSE_CLASSES, COARSE_CLASS_TEXTS, LABEL_TO_COARSE),
                            "fine": Level("fine", LABELS, FINE_CLASS_TEXTS)}


# =============================================================================================
# 2. Data: every ENTRep layout, problems, leakage, test lists, the validation split
# =============================================================================================

# Folders and files a Mac zip leaves behind (ENTREP.md): never data.
_JUNK_DIRS = {"__MACOSX", ".ipynb_checkpoints", ".git"}

# Words that mark a header row in the otherwise headerless test CSVs.
_CSV_HEADER_WORDS = {"image", "images", "img", "file", "filename", "file_name", "path", "name", "id", "text",
                     "query", "caption"}

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
        empty = path.exists() and path.stat().st_size == 0
        why = "the file is empty (0 bytes)" if empty else f"{type(e).__name__}: {e}"
        raise ImageDecodeError(f"{path}: cannot decode image ({why}). Re-export or re-download this file, or "
                               "remove it from the annotation; it is listed as skipped.") from e
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.has_transparency_data:  # an alpha band, or a transparent colour (PNG tRNS) in any mode
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def to_square(im: Image.Image, size: int, resize: str = "crop") -> Image.Image:
    """A frame as a size x size square, bicubic (RESIZES): "crop" takes the centre square (timm's eval
    geometry at crop_pct 1.0), "pad" keeps the whole frame and fills the rest with black, the endoscope's
    own background."""
    if resize == "pad":
        return ImageOps.pad(im, (size, size), method=Image.Resampling.BICUBIC, color=(0, 0, 0))
    if resize != "crop":
        raise ValueError(f"resize={resize!r}: use one of {RESIZES}.")
    return ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)


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


class _Ledger:
    """What reading the annotations under a root finds: labelled rows, i2i pairs, t2i captions, test lists
    and the layouts seen; every referenced image resolved, with problems and an inventory; and, after the
    annotations are read, every distinct image checked once (content hash and decode)."""

    def __init__(self, root: Path):
        self.root, self.index = root, FileIndex.build(root)
        self.rows: list[dict] = []
        self.i2i: list[dict] = []
        self.t2i: list[dict] = []
        self.queries: dict[str, list[dict]] = {"cls": [], "i2i": [], "t2i": []}
        self.layouts: list[str] = []
        self.problems: list[dict] = []
        self.inventory: list[dict] = []
        self.checked: dict[Path, tuple[str, str, tuple[int, int] | None]] = {}

    def problem(self, where: Path | str, item: str, kind: str, message: str) -> None:
        self.problems.append({"where": str(where), "item": item, "kind": kind, "message": message})

    def record(self, where: Path | str, item: str, role: str, path: Path | None, reason: str = "") -> None:
        """One inventory entry: loaded, or skipped for `reason`."""
        self.inventory.append({"where": str(where), "item": item, "role": role, "path": str(path or ""),
                               "status": "skipped" if reason else "loaded", "reason": reason})

    def image(self, name: str, where: Path, role: str) -> Path | None:
        """Resolve one referenced image name near its annotation file; None (and a problem) when missing."""
        path, note = self.index.resolve(name, where.parent)
        if path is None:
            self.problem(where, name, "missing-file", f"{where}: '{name}' is referenced but no file of that name "
                         f"exists under {self.index.root}. Add the file or remove the entry; it is skipped.")
        elif note == "case":
            self.problem(where, name, "name-case", f"{where}: '{name}' matched '{path.name}' only "
                         "case-insensitively (a known ENTRep defect); that file is used.")
        self.record(where, name, role, path, "" if path else "missing")
        return path

    def source(self, annotation: Path) -> str:
        """A short name for where an annotation came from: its folder relative to the root."""
        rel = annotation.parent.resolve().relative_to(self.root.resolve()).as_posix()
        return self.root.name if rel == "." else rel

    def check_all(self) -> None:
        """Hash and decode every resolved image once, in threads (PIL releases the GIL)."""
        todo = sorted({Path(e["path"]) for e in self.inventory if e["path"]})
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


def _read_json(path: Path, ledger: _Ledger, kind: type):
    """The JSON in `path` when it is a `kind` (dict or list); else None, with a problem naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        ledger.problem(path, path.name, "bad-annotation", f"{path}: not valid UTF-8 JSON ({e}). Re-download the "
                       "file; it is ignored.")
        return None
    if not isinstance(data, kind):
        what = "a JSON object" if kind is dict else "a JSON array of records"
        ledger.problem(path, path.name, "bad-annotation", f"{path}: expected {what}; ignored.")
        return None
    return data


def _label_row(ledger: _Ledger, where: Path, name: str, raw_label: object, release: str, **extra) -> None:
    """A labelled image: its row in ledger.rows, or an unknown-label problem and a skipped entry."""
    label = normalize_label(raw_label)
    if label is None:
        ledger.problem(where, name, "unknown-label", f"{where}: '{name}' has label {raw_label!r}, which is not one "
                       f"of {list(LABELS)} (case, spaces and '_' are already forgiven). Fix the label; the image is "
                       "skipped.")
        ledger.record(where, name, "labelled", None, "unknown-label")
    elif path := ledger.image(name, where, "labelled"):
        ledger.rows.append({"path": path, "source": ledger.source(where), "release": release, "label": label,
                            "description_en": "", "description_vi": "", "type": "", **extra})


def _load_train_release(path: Path, ledger: _Ledger) -> None:
    """`cls.json` / `i2i.json` / `t2i.json`: one-line JSON objects beside an image folder."""
    data, kind, source = _read_json(path, ledger, dict), path.stem.lower(), ledger.source(path)
    for key, value in (data or {}).items():
        if kind == "cls":
            _label_row(ledger, path, key, value, "train")
        elif kind == "i2i":
            q, m = ledger.image(key, path, "i2i-query"), ledger.image(str(value), path, "i2i-match")
            if q and m:
                ledger.i2i.append({"query_path": q, "match_path": m, "source": source})
        elif m := ledger.image(str(value), path, "t2i-target"):
            ledger.t2i.append({"text": key, "path": m, "source": source})


def _load_public_release(path: Path, ledger: _Ledger) -> None:
    """`data.json`: an array of {Path, Classification, Type, Description, DescriptionEN} records."""
    for i, rec in enumerate(_read_json(path, ledger, list) or []):
        if not isinstance(rec, dict) or not rec.get("Path"):
            ledger.problem(path, f"record {i}", "bad-annotation", f"{path}: record {i} has no 'Path'; skipped.")
            ledger.record(path, f"record {i}", "labelled", None, "bad-record")
            continue
        _label_row(ledger, path, str(rec["Path"]), rec.get("Classification"), "public",
                   description_en=str(rec.get("DescriptionEN") or ""), description_vi=str(rec.get("Description") or ""),
                   type=str(rec.get("Type") or ""))


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


def _load_queries(path: Path, ledger: _Ledger) -> None:
    kind, source = path.stem.lower(), ledger.source(path)
    entries, had_header = read_query_csv(path)
    if had_header:
        ledger.problem(path, "", "csv-header", f"{path}: the first line looks like a header and was not used as a "
                       "query.")
    if not entries:
        ledger.problem(path, "", "empty-list", f"{path}: the list is empty; Track '{kind}' has nothing to answer.")
    for e in entries:
        if kind == "t2i":
            ledger.queries["t2i"].append({"text": e, "source": source})
        else:
            ledger.queries[kind].append({"file": e, "path": ledger.image(e, path, f"{kind}-query"), "source": source})


def _load_class_folders(ledger: _Ledger) -> None:
    """`<split>/<class>/<file>.png` trees: images in a folder named like a label, not claimed by an annotation."""
    claimed, found = {r["path"] for r in ledger.rows}, set()
    for p in sorted(p for paths in ledger.index.by_lower_name.values() for p in paths):
        label = normalize_label(p.parent.name)
        if label and p not in claimed:
            ledger.record(p.parent, p.name, "labelled", p)
            ledger.rows.append({"path": p, "source": p.parent.parent.name or "folders", "release": "folders",
                                "label": label, "description_en": "", "description_vi": "", "type": ""})
            found.add(p.parent)
    ledger.layouts += [f"class folder: {f.relative_to(ledger.root)}" for f in sorted(found)]


def find_annotation_files(root: str | os.PathLike) -> list[Path]:
    """Every ENTRep annotation or test-list file under root, in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
        out += [Path(dirpath) / n for n in sorted(filenames)
                if n.lower() in ANNOTATION_FILES and not n.startswith("._")]
    return out


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
    ledger = _Ledger(root)
    for path in find_annotation_files(root):
        name, rel = path.name.lower(), path.relative_to(root)
        kind, load = (("test list", _load_queries) if name.endswith(".csv") else
                      ("public release", _load_public_release) if name == "data.json" else
                      ("train release", _load_train_release))
        load(path, ledger)
        ledger.layouts.append(f"{kind}: {rel}")
    _load_class_folders(ledger)
    if not ledger.layouts:
        raise FileNotFoundError(f"No ENTRep data under '{root}': searched for {sorted(ANNOTATION_FILES)} and "
                                "<split>/<class>/*.png folders. Set data_path to the folder holding them, or use "
                                "'demo'.")
    unknown = [p["message"] for p in ledger.problems if p["kind"] == "unknown-label"]
    if strict_labels and unknown:
        raise ValueError("Unknown labels:\n" + "\n".join(unknown))
    test_folders = {q["path"].parent for k in ("cls", "i2i") for q in ledger.queries[k] if q["path"]}
    referenced = {Path(e["path"]) for e in ledger.inventory if e["path"]}
    for p in sorted(p for paths in ledger.index.by_lower_name.values() for p in paths if p.parent in test_folders):
        if p not in referenced:
            ledger.record(p.parent, p.name, "test-folder", p)
    ledger.check_all()
    return _tables(ledger, test_folders)


def _tables(ledger: _Ledger, test_folders: set[Path]) -> EntrepData:
    """EntrepData from a checked ledger: readable images only, one labelled record per content."""
    ok, checked = ledger.ok, ledger.checked
    sha1 = {str(p): facts[0] for p, facts in checked.items() if not facts[1]}
    images = pd.DataFrame([{**r, "path": str(r["path"]), "file": r["path"].name, "label_id": LABEL_TO_ID[r["label"]],
                            "coarse": LABEL_TO_COARSE[r["label"]], "sha1": sha1[str(r["path"])],
                            "width": checked[r["path"]][2][0], "height": checked[r["path"]][2][1]}
                           for r in ledger.rows if ok(r["path"])],
                          columns=["path", "file", "source", "release", "label", "label_id", "coarse", "description_en",
                                   "description_vi", "type", "sha1", "width", "height"])
    images, duplicates = _drop_duplicate_records(images)
    pairs = [{"query": r["query_path"].name, "match": r["match_path"].name, "query_path": str(r["query_path"]),
              "match_path": str(r["match_path"]), "source": r["source"]}
             for r in ledger.i2i if ok(r["query_path"]) and ok(r["match_path"])]
    captions = [{**r, "file": r["path"].name, "path": str(r["path"])} for r in ledger.t2i if ok(r["path"])]
    lists = {k: pd.DataFrame([{"file": q["file"], "path": str(q["path"]) if ok(q["path"]) else "",
                               "source": q["source"], "sha1": sha1.get(str(q["path"]), "")} for q in ledger.queries[k]],
                             columns=["file", "path", "source", "sha1"]) for k in ("cls", "i2i")}
    lists["t2i"] = pd.DataFrame(ledger.queries["t2i"], columns=["text", "source"])
    in_folders = sorted(p for p in checked if p.parent in test_folders and ok(p))
    folder_images = pd.DataFrame([{"file": p.name, "path": str(p), "sha1": sha1[str(p)], "folder": str(p.parent)}
                                  for p in in_folders], columns=["file", "path", "sha1", "folder"])
    return EntrepData(
        root=ledger.root, images=images,
        i2i=pd.DataFrame(pairs, columns=["query", "match", "query_path", "match_path", "source"]),
        t2i=pd.DataFrame(captions, columns=["text", "file", "path", "source"]), queries=lists,
        folder_images=folder_images,
        problems=pd.concat([pd.DataFrame(ledger.problems, columns=["where", "item", "kind", "message"]), duplicates],
                           ignore_index=True),
        inventory=pd.DataFrame(ledger.inventory, columns=["where", "item", "role", "path", "status", "reason"]),
        sha1=sha1, layouts=ledger.layouts)


def _drop_duplicate_records(images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first labelled record of each image content; report copies and conflicting labels."""
    first = images.groupby("sha1", sort=False)[["path", "label"]].transform("first")
    copies = images[first["path"] != images["path"]]
    problems = [{"where": row.source, "item": row.file,
                 "kind": "duplicate" if row.label == keep.label else "label-conflict",
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


@dataclass(frozen=True)
class Fold:
    """One fold of the evaluation (rows of EntrepData.images). Models train on `fit`; every choice (prototype
    weight and temperature, DINOv2's best epoch, the hybrid threshold, the soft-fusion weight) is made on
    `choose`; `predict` is only predicted, and no image of its content groups is in fit or choose. With one
    fold (cv_folds=1, the paper's protocol) choose and predict are the same validation split, as before
    cross-validation: the choices are then made on the images they are scored on (the fusion's cross-fitted)."""

    name: str
    fit: pd.DataFrame
    choose: pd.DataFrame
    predict: pd.DataFrame


def make_folds(images: pd.DataFrame, i2i: pd.DataFrame, cv_folds: int, val_fraction: float, seed: int,
               split: str = "grouped", exclude: Iterable[str] = ()) -> tuple[list[Fold], str]:
    """The folds every labelled image is predicted in, and a sentence saying how they were made.

    cv_folds >= 2: stratified folds grouped as the split is (identical bytes, i2i partners, one examination on
    one side; grouped_fold_ids, which lowers k when a class or the groups are too few: said so); fold j
    predicts its images, and the others, less `exclude` (the retrieval hold-out: never trained on), are
    split again (split_train_val, grouped) into fit and choose. cv_folds 1: split_train_val's validation
    split, with `split` (the paper's plain one for its protocol). No folds when the images are too few."""
    labels = images["label_id"].to_numpy()
    excluded = images["path"].isin(set(exclude)).to_numpy()
    if cv_folds == 1:
        train, val, how = split_train_val(images, i2i, val_fraction, seed, split)
        fit = images.iloc[train][~excluded[train]]
        val_rows = images.iloc[val].reset_index(drop=True)
        return ([Fold("validation split", fit.reset_index(drop=True), val_rows, val_rows)] if len(val) else []), how
    fold_of = grouped_fold_ids(labels, split_groups(images, i2i), cv_folds, seed) if len(images) > 1 else []
    k = int(max(fold_of, default=-1)) + 1
    folds = []
    for j in range(k if k >= 2 else 0):
        rest = images[(fold_of != j) & ~excluded].reset_index(drop=True)
        inner_fit, inner_choose, _ = split_train_val(rest, i2i, val_fraction, seed, "grouped")
        fit, choose = (rest.iloc[inner_fit], rest.iloc[inner_choose]) if len(inner_choose) else (rest, rest)
        folds.append(Fold(f"fold {j + 1} of {k}", fit.reset_index(drop=True), choose.reset_index(drop=True),
                          images[fold_of == j].reset_index(drop=True)))
    lowered = f" (cv_folds={cv_folds} lowered to {k}: too few images in a class or too few groups)" * (k < cv_folds)
    return folds, (f"{k} stratified folds grouped by examination{lowered}; in each, choices on a grouped "
                   f"{val_fraction:g} of its training part" if k >= 2 else f"no folds: {len(images)} labelled image(s)")


def sample_per_class(images: pd.DataFrame, per_class: int = 4, seed: int = 0) -> pd.DataFrame:
    """Up to `per_class` random rows of each label, in LABELS order (for plot_image_grid)."""
    return pd.concat([g.sample(min(per_class, len(g)), random_state=seed)
                      for _, g in sorted(images.groupby("label_id"), key=lambda kv: kv[0])], ignore_index=True)


# =============================================================================================
# 3. BiomedCLIP: loading (hub, local-dir, tiny), embeddings cached by content
# =============================================================================================


@dataclass(frozen=True)
class Clip:
    """An open_clip model in eval mode with its image preprocessing and its tokenizer."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable


def load_clip(name: str = BIOMEDCLIP_HUB_ID, device: str | torch.device = "cpu",
              cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Clip:
    """An open_clip model on `device`, in eval mode, with its preprocessing and tokenizer.

    name: `hf-hub:<repo>` (downloads once into cache_dir); `local-dir:<folder>` with the hub files
    (biomedclip_offline.export_biomedclip writes one: a Kaggle dataset for runs with internet off);
    `tiny`: a random TINY_CLIP_CFG model built offline from `seed`, for tests and the demo.
    """
    if name == "tiny":
        model = seeded(seed, lambda: open_clip.CLIP(**TINY_CLIP_CFG))
        preprocess = image_transform_v2(PreprocessCfg(size=TINY_CLIP_CFG["vision_cfg"]["image_size"]),
                                        is_train=False)
        tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
    elif name.startswith("local-dir:"):
        from biomedclip_offline import offline_clip_dir  # a copy made for runs with internet off

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
    return Clip(model.to(device).eval(), preprocess, tokenizer)


class PadToSquare:
    """A preprocessing step letterboxing a frame to its own long side on black (to_square "pad"), before a
    model's own preprocessing: resize="pad" for BiomedCLIP. Its repr is part of the embedding cache's key."""

    def __call__(self, im: Image.Image) -> Image.Image:
        return to_square(im, max(im.size), "pad")

    def __repr__(self) -> str:
        return "PadToSquare(black)"


def square_clip(clip: Clip, resize: str) -> Clip:
    """`clip` reading each frame as `resize` says (RESIZES): "crop", as its own preprocessing does (the short
    side resized, the centre cropped); "pad", the whole frame letterboxed on black first."""
    if resize == "crop":
        return clip
    if resize != "pad":
        raise ValueError(f"resize={resize!r}: use one of {RESIZES}.")
    return Clip(clip.model, transforms.Compose([PadToSquare(), clip.preprocess]), clip.tokenizer)


class ImagePathDataset(Dataset):
    """Images decoded with load_rgb and passed through `preprocess` (a CLIP or timm transform)."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Callable):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_rgb(self.paths[i]))


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, **kw) -> DataLoader:
    """A DataLoader as every stage uses one: pinned memory for a GPU, workers kept across epochs."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0, **kw)


def encode_batches(encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                   device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """`encode` each batch under inference_mode (+ autocast): [N, D] float32 unit rows on the CPU, (0, 0)
    for no batches. Rows stay on `device` until the end and come back in one copy, so a GPU never waits on
    a per-batch sync."""
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


def cache_file(folder: str | os.PathLike | None, identity: str) -> Path | None:
    """The file in `folder` (None: no cache) that keeps rows made under `identity` ("<kind>|..."):
    <kind>_<hash of the identity>.safetensors."""
    digest = hashlib.sha1(identity.encode()).hexdigest()[:16]
    return None if folder is None else Path(folder) / f"{identity.split('|', 1)[0]}_{digest}.safetensors"


def cached_rows(keys: Sequence[str], paths: Sequence[str | os.PathLike], compute: Callable[[list], torch.Tensor],
                cache_path: Path | None, identity: str) -> torch.Tensor:
    """Rows [N, D] for images identified by content (keys: file_sha1 per path; (0, 0) for none), kept in
    one safetensors file made under `identity` (whatever computes them: model, preprocessing, precision).
    Rows already there are read, `compute(paths) -> [M, D]` runs once per new content, and the file is
    rewritten atomically. A file of another identity, or one that cannot be read, is reported and rebuilt."""
    if not len(keys):
        return torch.empty(0, 0)
    if cache_path is None:
        return compute(list(paths))
    cached = {}
    if cache_path.is_file():
        try:
            with safe_open(str(cache_path), framework="pt") as f:
                meta, table = f.metadata() or {}, f.get_tensor("rows")
            if meta.get("identity") != identity or len(json.loads(meta["keys"])) != len(table):
                raise ValueError("made by another model or damaged")
            cached = dict(zip(json.loads(meta["keys"]), table))
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            warnings.warn(f"{cache_path}: unusable cache ({type(e).__name__}: {e}); computing its rows again.")
    todo = {k: p for k, p in zip(keys, paths) if k not in cached}  # one path per new content
    if todo:
        cached.update(zip(todo, compute(list(todo.values()))))
        with atomic_path(cache_path) as tmp:
            save_file({"rows": torch.stack(list(cached.values())).float().contiguous()}, str(tmp),
                      metadata={"identity": identity, "keys": json.dumps(list(cached))})
    return torch.stack([cached[k] for k in keys])


def embed_images(clip: Clip, paths: Sequence[str | os.PathLike], rt: Runtime,
                 content: Mapping[str, str] | None = None) -> torch.Tensor:
    """CLIP image embeddings [N, D] (float32 unit rows, CPU) in the order of `paths`. With rt.cache_dir,
    rows are kept by content (`content`: {path: file_sha1}, e.g. EntrepData.sha1; hashed here when not
    given) under the model's identity, preprocessing and precision: a rerun encodes nothing, a changed
    file only itself."""
    def encode(todo: list) -> torch.Tensor:
        loader = make_loader(ImagePathDataset(todo, clip.preprocess), rt.batch_size, rt.num_workers, rt.device)
        batches = progress(loader, desc="BiomedCLIP images", mininterval=5, disable=not rt.progress)
        return encode_batches(data_parallel(clip.model, rt, "encode_image"), batches, rt.device, rt.amp)

    identity = f"clip|{model_fingerprint(clip.model)}|{transform_id(clip.preprocess)}|{rt.amp}"
    folder = None if rt.cache_dir is None else Path(rt.cache_dir) / "features"
    return cached_rows(content_keys(paths, content), paths, encode, cache_file(folder, identity), identity)


def embed_texts(clip: Clip, texts: Sequence[str], rt: Runtime, batch_size: int = 256) -> torch.Tensor:
    """CLIP text embeddings [T, D] (float32 unit rows, CPU) in the order of `texts`."""
    tokens = clip.tokenizer(list(texts))  # (T, context_length)
    return encode_batches(clip.model.encode_text, torch.split(tokens, batch_size), rt.device, rt.amp)


class FeatureTable:
    """Embeddings [N, D] looked up by image path: table[paths] -> [len(paths), D]."""

    def __init__(self, paths: Sequence[str], feats: torch.Tensor):
        self.paths, self.feats = list(paths), feats
        self.row = {p: i for i, p in enumerate(self.paths)}

    def __getitem__(self, paths: Iterable[str]) -> torch.Tensor:
        return self.feats[[self.row[str(p)] for p in paths]]


# =============================================================================================
# 4. Scores: accuracy and F1 with bootstrap intervals, per-class tables
# =============================================================================================


def summary_metrics(y_true, y_pred) -> dict[str, float]:
    """Accuracy, macro F1 and weighted F1 (scikit-learn; averages over the classes present in either)."""
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted"))}


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


def bootstrap_ci(y_true, y_pred, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 groups=None) -> pd.DataFrame:
    """Percentile bootstrap intervals of accuracy, macro F1 and weighted F1: the N (true, pred) pairs
    resampled with replacement, or with `groups` (N,) whole groups (an examination's views, i2i partners,
    identical bytes) resampled, so images that move together are not counted as independent. Resamples
    depend only on (seed, N) (on the groups too), so models scored on the same images are compared on the
    same resamples; singleton groups in image order give the plain bootstrap's numbers. Rows per metric:
    estimate, low, high ((1 - alpha) interval)."""
    y_true, y_pred = _ids(y_true, "y_true"), _ids(y_pred, "y_pred")
    if len(y_true) == 0 or len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred must be non-empty and equally long; got {len(y_true)} and {len(y_pred)}.")
    members = _group_members(groups, len(y_true))
    draws = np.random.default_rng(seed).integers(0, len(members), size=(n_boot, len(members)))  # (B, G)
    if all(len(m) == 1 for m in members):
        boot = batched_scores(y_true[draws], y_pred[draws])  # (B, N) at once
    else:
        rows = [batched_scores(y_true[i], y_pred[i][None]) for i in (np.concatenate(members[d]) for d in draws)]
        boot = {m: np.concatenate([r[m] for r in rows]) for m in rows[0]}
    full = batched_scores(y_true, y_pred[None])
    return pd.DataFrame({m: {"estimate": float(full[m][0]), "low": float(np.quantile(boot[m], alpha / 2)),
                             "high": float(np.quantile(boot[m], 1 - alpha / 2))} for m in boot}).T.rename_axis("metric")


def _group_members(groups, n: int) -> np.ndarray:
    """(G,) object array of each group's image indices, groups ordered by their first image; one group per
    image when `groups` is None."""
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} ids for {n} images: give one per image.")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))[inverse.reshape(-1)]  # group id -> its order of first appearance
    members = np.empty(len(first), dtype=object)
    for g in range(len(first)):
        members[g] = np.flatnonzero(rank == g)
    return members


def comparison_table(predictions: Mapping[str, object], y_true, seed: int = 0, groups=None) -> pd.DataFrame:
    """One row per model ({name: (N,) predicted ids}): accuracy, macro_f1, weighted_f1, each with its
    bootstrap _low / _high bounds (paired: the same resamples for every model; `groups` as bootstrap_ci)."""
    rows = {}
    for name, y_pred in predictions.items():
        ci = bootstrap_ci(y_true, y_pred, seed=seed, groups=groups)
        rows[name] = {f"{m}{suffix}": ci.loc[m, col] for m in ci.index
                      for suffix, col in (("", "estimate"), ("_low", "low"), ("_high", "high"))}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


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


# =============================================================================================
# 5. Prototypes: joint vision-language prototypes and their classifier
# =============================================================================================


def class_prompts(class_names: Sequence[str], class_texts: Mapping[str, Sequence[str]],
                  templates: Sequence[str] = PROMPT_TEMPLATES) -> dict[str, list[str]]:
    """{class: every template filled with every wording of the class}, in `class_names` order."""
    return {c: [t.format(text) for text in class_texts[c] for t in templates] for c in class_names}


def add_description_prompts(prompts: Mapping[str, Sequence[str]], classes: Sequence[str],
                            descriptions: Sequence[str]) -> dict[str, list[str]]:
    """Add the data's English finding lines (DescriptionEN) to their class's prompts, deduplicated:
    classes[i] is the class of descriptions[i] (Level.names). Give training descriptions only: validation
    text would leak into the prototypes."""
    out = {c: list(p) for c, p in prompts.items()}
    for cls, text in zip(classes, descriptions):
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


def text_prototypes(clip: Clip, prompts: Mapping[str, Sequence[str]], class_names: Sequence[str],
                    rt: Runtime) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompt embeddings (CLIP's prompt ensembling)."""
    if empty := [c for c in class_names if not prompts.get(c)]:
        raise ValueError(f"No prompts for classes {empty}: give each class at least one prompt.")
    feats = embed_texts(clip, [p for c in class_names for p in prompts[c]], rt)  # (T, D)
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
    """Validation scores over JOINT_WEIGHT_GRID x TEMPERATURE_GRID: weight, temperature,
    accuracy, macro_f1 (the temperature never changes the argmax) and log_loss (it sets the confidence
    the hybrid rule thresholds). Give validation features; img_protos come from training data."""
    labels, n_classes = np.asarray(labels), img_protos.shape[0]
    rows = []
    for w in JOINT_WEIGHT_GRID:
        cosine = (feats.double() @ joint_prototypes(img_protos, txt_protos, w).double().T).numpy()  # (N, C)
        pred = cosine.argmax(1)
        scores = {"accuracy": float((pred == labels).mean()),
                  "macro_f1": f1_score(labels, pred, labels=range(n_classes), average="macro", zero_division=0)}
        for t in TEMPERATURE_GRID:
            rows.append({"weight": w, "temperature": t, **scores,
                         "log_loss": log_loss(labels, softmax(cosine / t, axis=1), labels=range(n_classes))})
    return pd.DataFrame(rows)


def fit_prototype_classifier(clip: Clip, rt: Runtime, level: Level, train_feats: torch.Tensor,
                             train_label_ids: Sequence[int], val_feats: torch.Tensor, val_label_ids: Sequence[int],
                             train_descriptions: Sequence[str] = ()) -> PrototypeClassifier:
    """The paper's prototype classifier at one level (coarse: 4 regions, or fine: 7 labels), from official
    label ids.

    Image prototypes are class means of the training embeddings; text prototypes come from the prompt
    templates, with and without the training images' English findings (train_descriptions[i] belongs to
    training image i). On validation: the prompt set and joint weight by macro F1 (first best in grid
    order), then the temperature by log loss at that weight.
    """
    names, val_y = level.class_names, level.ids(val_label_ids)
    img = image_prototypes(train_feats, level.ids(train_label_ids), len(names), allow_empty=True)
    base = class_prompts(names, level.class_texts)
    candidates = {False: base}
    if any(d.strip() for d in train_descriptions):
        candidates[True] = add_description_prompts(base, level.names(train_label_ids), train_descriptions)
    best = None
    for with_desc, prompts in candidates.items():
        txt = text_prototypes(clip, prompts, names, rt)
        table = choose_prototype_weight(val_feats, val_y, img, txt)
        if best is None or table["macro_f1"].max() > best[2]["macro_f1"].max():
            best = (with_desc, txt, table)
    with_desc, txt, table = best
    weight = table.loc[table["macro_f1"].idxmax(), "weight"]
    at_weight = table[table["weight"] == weight]
    temperature = at_weight.loc[at_weight["log_loss"].idxmin(), "temperature"]
    return PrototypeClassifier(tuple(names), joint_prototypes(img, txt, weight), float(weight),
                               float(temperature), with_desc, table)


def fit_prototypes(clip: Clip, rt: Runtime, train_feats: torch.Tensor, train_label_ids: Sequence[int],
                   val_feats: torch.Tensor, val_label_ids: Sequence[int],
                   train_descriptions: Sequence[str] = ()) -> dict[str, PrototypeClassifier]:
    """The paper's prototype classifiers at both LEVELS: "coarse" (4 regions: the hybrid's gate) and
    "fine" (7 labels: the prototypes-alone baseline)."""
    return {name: fit_prototype_classifier(clip, rt, level, train_feats, train_label_ids, val_feats, val_label_ids,
                                           train_descriptions) for name, level in LEVELS.items()}


# =============================================================================================
# 6. DINOv2 (SurgeNet): weights, heads, images, cached inference
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
        return seeded(seed, lambda: timm.create_model("vit_small_patch14_dinov2", pretrained=False,
                                                      img_size=image_size, num_classes=0, **DINO_TINY_KWARGS))
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


def decode_square(path: str | os.PathLike, size: int, resize: str = "crop") -> torch.Tensor:
    """Decode (load_rgb) and make the square (to_square) -> uint8 (3, size, size)."""
    im = to_square(load_rgb(path), size, resize)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


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
    transform's randomness then come from `seed` alone, whatever the worker count. resize: how a frame
    becomes its square (to_square). Returns (image (3, S, S) float, official label id or -1)."""

    def __init__(self, paths: Sequence[str | os.PathLike], label_ids: Sequence[int] | None,
                 transform: Callable[[Image.Image], torch.Tensor], size: int, flip_p: float = 0.0,
                 resize: str = "crop"):
        self.label_ids = [-1] * len(paths) if label_ids is None else [int(y) for y in label_ids]
        if len(self.label_ids) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(self.label_ids)} labels: pass one label id per image.")
        with ThreadPoolExecutor(min(8, cpu_count() + 2)) as pool:
            squares = list(pool.map(lambda p: decode_square(p, size, resize), paths))
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


def dino_data_config(model: nn.Module, image_size: int) -> dict:
    """timm's data config of the backbone (of a DinoClassifier too) at image_size: mean, std,
    interpolation, crop: the model's own preprocessing, never hard-coded."""
    backbone = getattr(model, "backbone", model)
    return timm.data.resolve_model_data_config(backbone, args={"input_size": (3, image_size, image_size)})


def dino_transform(model: nn.Module, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The backbone's evaluation preprocessing (timm create_transform) at image_size."""
    return timm.data.create_transform(**dino_data_config(model, image_size), is_training=False)


def dino_image_size(model: nn.Module) -> int:
    """Input side (px) a timm ViT backbone, or a DinoClassifier around one, was built for."""
    return int(getattr(model, "backbone", model).patch_embed.img_size[0])


@dataclass
class Trained:
    """A fine-tuned model holding the weights to use, the file they are in, the run's history, and that
    file's SHA-1 (the identity of what is cached from the model). finished: False when a time budget
    stopped the run early (its resumable state is kept)."""

    model: nn.Module
    path: Path
    history: pd.DataFrame
    weights_id: str
    finished: bool = True

    def summary(self) -> dict:
        """What metrics.json records of the run."""
        out = {"tasks": list(self.model.tasks)} if hasattr(self.model, "tasks") else {}
        out["epochs_run"] = len(self.history)
        if "val_score" in self.history:
            best = int(self.history["val_score"].idxmax())
            out |= {"best_epoch": best + 1, "best_val_score_no_tta": float(self.history["val_score"][best])}
        return out | {"checkpoint": str(self.path), "finished": self.finished}


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
    labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    return {k: torch.cat(v) for k, v in outputs.items()}, labels


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


def _cached_dino_rows(model: nn.Module, paths: Sequence[str], rt: Runtime, content: Mapping[str, str] | None,
                      rows: Callable[[dict, dict | None], torch.Tensor], kind: str, tta_flip: bool,
                      weights_id: str, resize: str = "crop") -> torch.Tensor:
    """rows(outputs, mirrored outputs or None) over `paths` at the model's input size, through cached_rows
    under rt.cache_dir/dino (identity: the weights, preprocessing and square, precision, TTA, kind)."""
    size = dino_image_size(model)
    transform = dino_transform(model, size)

    def compute(todo: list) -> torch.Tensor:
        images = SquareImages(todo, None, transform, size, resize=resize)
        loader = make_loader(images, rt.batch_size, rt.num_workers, rt.device)
        net = data_parallel(model, rt)
        mirrored = collect_logits(net, loader, rt.device, rt.amp, flip=True)[0] if tta_flip else None
        return rows(collect_logits(net, loader, rt.device, rt.amp)[0], mirrored)

    square = "" if resize == "crop" else f"|resize={resize}"  # crop: the identity caches had before pad existed
    weights = weights_id or model_fingerprint(model)
    identity = f"{kind}|{weights}|{transform_id(transform)}{square}|{rt.amp}|tta={tta_flip}"
    folder = None if rt.cache_dir is None else Path(rt.cache_dir) / "dino"
    return cached_rows(content_keys(paths, content), paths, compute, cache_file(folder, identity), identity)


def predict_dino(trained: Sequence[Trained], paths: Sequence[str], rt: Runtime,
                 content: Mapping[str, str] | None = None, tta_flip: bool = True,
                 resize: str = "crop") -> dict[str, np.ndarray]:
    """Probabilities of every head of the trained models (one shared model, or the paper's four):
    {"coarse": (N, 4), "ear" / "nose" / "vc": (N,) p(second label) = p(ear-right), p(nose-right),
    p(vc-closed)}. tta_flip averages with the mirrored image (flip_tta_probs); resize: the square the
    models were trained on (to_square). With rt.cache_dir, kept per image content (`content` as for
    embed_images) and model weights: a rerun predicts only new images."""
    out: dict[str, np.ndarray] = {}
    for t in trained:
        def rows(logits: dict, mirrored: dict | None, tasks=t.model.tasks) -> torch.Tensor:
            probs = task_probs(logits)
            probs = flip_tta_probs(probs, task_probs(mirrored)) if mirrored is not None else probs
            return torch.from_numpy(np.column_stack([probs[task] for task in tasks])).float()

        table = _cached_dino_rows(t.model, paths, rt, content, rows, "dino_probs", tta_flip, t.weights_id,
                                  resize).reshape(len(paths), -1).numpy()
        column = 0
        for task in t.model.tasks:
            width = DINO_TASKS[task] if task == "coarse" else 1
            out[task] = table[:, column:column + width] if task == "coarse" else table[:, column]
            column += width
    return out


def dino_features(trained: Trained, paths: Sequence[str], rt: Runtime, content: Mapping[str, str] | None = None,
                  tta_flip: bool = False, resize: str = "crop") -> torch.Tensor:
    """L2-normalised backbone embeddings [N, D] (CLS after the final norm) of the fine-tuned model, for
    retrieval; tta_flip sums the mirror's embedding in (side-blind). Cached as predict_dino."""
    rows = lambda out, mirrored: F.normalize(out["features"] + (mirrored["features"] if mirrored else 0), dim=-1)
    return _cached_dino_rows(trained.model.backbone, paths, rt, content, rows, "dino_feats", tta_flip,
                             trained.weights_id, resize)


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


def dino_labels(dino_probs: Mapping[str, object]) -> np.ndarray:
    """DINOv2 alone, 7 classes (N,): its own coarse head's region, then that region's binary decision."""
    return region_then_fine(np.asarray(dino_probs["coarse"]).argmax(1), dino_probs)


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
    """The hybrid threshold (rule "hybrid", THRESHOLD_GRID) or the soft-fusion weight ("soft", SOFT_FUSION_GRID),
    chosen by macro F1 (best_grid_value) with cross-fitting: each fold is predicted with the value chosen
    on the other folds (honest validation figures), and `chosen` uses all of them. Both rules decide each
    image alone, so a fold's predictions are its columns of the grid's. Test data never enters."""
    if rule not in ("hybrid", "soft"):
        raise ValueError(f"rule must be 'hybrid' (threshold) or 'soft' (weight); got {rule!r}.")
    grid = np.asarray(THRESHOLD_GRID if rule == "hybrid" else SOFT_FUSION_GRID)
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


def branch_accuracy(y_true, y_pred, fell_back) -> pd.DataFrame:
    """How many images each branch of the hybrid rule decided and its accuracy: rows "prototype",
    "DINOv2 fallback", "all"; columns n, fraction, accuracy (NaN for an empty branch)."""
    correct = _ids(y_true, "y_true") == _ids(y_pred, "y_pred")
    fell_back = np.asarray(fell_back, dtype=bool)
    branches = {"prototype": ~fell_back, "DINOv2 fallback": fell_back, "all": np.ones_like(fell_back)}
    return pd.DataFrame.from_dict({name: {"n": int(m.sum()), "fraction": m.mean() if len(m) else np.nan,
                                          "accuracy": correct[m].mean() if m.any() else np.nan}
                                   for name, m in branches.items()}, orient="index").rename_axis("branch")


# =============================================================================================
# 8. Submissions: one JSON at each zip's root, checked after writing
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
    info = zipfile.ZipInfo(SUBMISSIONS[track][1], date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        zf.writestr(info, json.dumps(mapping, ensure_ascii=False, indent=1).encode("utf-8"))
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
        allowed = "label ids 0-6" if track == "track1" else "gallery images other than the query"
        problems.append(f"{len(bad)} answers are not {allowed}"
                        f", e.g. {bad[:3]}")
    if problems:
        raise ValueError(f"{zip_path} is not a valid submission:\n- " + "\n- ".join(problems)
                         + "\nFix the predictions and write it again; do not upload this file.")
    return mapping


