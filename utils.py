"""Helpers for the ENTRep prototypical + DINOv2 pipeline (entrep-prototypical.ipynb).

Pure, explicit helpers: every function takes what it uses (model, device, paths, seed) as
arguments; nothing happens at import time. Sections follow the notebook's order:

1. Constants            label ids, coarse regions, fine decisions
2. Runtime and images   device, mixed precision, decoding any pixel mode to RGB, content hashes
3. Data                 finding and loading every ENTRep layout, problems, leakage, split
4. Demo data            the synthetic ENTRep-shaped data set (never real data)
5. Run setup            seeds, data path, weights, JSON output
6. BiomedCLIP           loading (hub, local-dir, tiny), cached embeddings, joint prototypes
7. DINOv2               SurgeNet weights, heads, flip-swap data, training with resume, inference
8. Hybrid               the fusion rule, choices on validation, metrics, result plots, submissions
9. Retrieval            Track 2 and Track 3 ranking, re-ranking, metrics, plots
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import matplotlib.pyplot as plt
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
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from scipy.special import softmax
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from tqdm.auto import tqdm

# =============================================================================================
# 1. Constants
# =============================================================================================

# Official Track 1 ids (the submission values): ENTRep challenge page, see ../shared/ENTREP.md.
LABELS: tuple[str, ...] = (
    "nose-right",  # 0
    "nose-left",  # 1
    "ear-right",  # 2
    "ear-left",  # 3
    "vc-open",  # 4
    "vc-closed",  # 5
    "throat",  # 6
)
LABEL_TO_ID: dict[str, int] = {name: i for i, name in enumerate(LABELS)}

# The paper's coarse level (4 anatomical regions) and the label -> region map.
COARSE_CLASSES: tuple[str, ...] = ("ear", "nose", "vc", "throat")
COARSE_TO_ID: dict[str, int] = {name: i for i, name in enumerate(COARSE_CLASSES)}
LABEL_TO_COARSE: dict[str, str] = {
    "nose-right": "nose",
    "nose-left": "nose",
    "ear-right": "ear",
    "ear-left": "ear",
    "vc-open": "vc",
    "vc-closed": "vc",
    "throat": "throat",
}

# Coarse region id of each official label id, from LABEL_TO_COARSE: (1, 1, 0, 0, 2, 2, 3).
LABEL_ID_TO_COARSE_ID: tuple[int, ...] = tuple(COARSE_TO_ID[LABEL_TO_COARSE[name]] for name in LABELS)

# The paper's fine decisions: one binary classifier per region that has two labels. Index 0/1 of
# each pair is the binary target (ear side, nose side, vocal-cord state). Throat has none.
FINE_TASKS: dict[str, tuple[str, str]] = {
    "ear": ("ear-left", "ear-right"),
    "nose": ("nose-left", "nose-right"),
    "vc": ("vc-open", "vc-closed"),
}

# Horizontal flip mirrors the anatomy: left <-> right for ear and nose; vocal-cord state and
# throat are unchanged (ENTREP.md: the Track 1 winner's flip with label swap).
FLIP_LABEL: dict[str, str] = {
    "nose-right": "nose-left",
    "nose-left": "nose-right",
    "ear-right": "ear-left",
    "ear-left": "ear-right",
    "vc-open": "vc-open",
    "vc-closed": "vc-closed",
    "throat": "throat",
}

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# =============================================================================================
# 2. Runtime and images
# =============================================================================================


def resolve_device(device: str = "auto") -> "torch.device":
    """`auto` -> the first CUDA GPU when there is one, else the CPU; anything else as given."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: "torch.device | str") -> "torch.dtype | None":
    """The mixed-precision dtype a device runs fastest and safely, or None for plain fp32.

    bf16 on GPUs with native bf16 (compute capability 8.0+, e.g. A100/H100) and on CPUs with
    AVX512-BF16/AMX; fp16 on older GPUs (T4, P100: use a GradScaler when training); else None.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu":
        cpu_caps = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
        if "AMX" in cpu_caps.upper() or _cpu_has_flag("avx512_bf16") or _cpu_has_flag("amx_bf16"):
            return torch.bfloat16
    return None


def resolve_amp_dtype(amp_dtype: "str | torch.dtype | None", device: torch.device) -> "torch.dtype | None":
    """"auto" -> utils.autocast_dtype(device) (bf16 on A100/H100 and bf16 CPUs, fp16 on T4/P100,
    else fp32); "bf16"/"fp16"/"fp32" or a torch dtype force one. None / fp32 -> no autocast."""
    if amp_dtype == "auto":
        return autocast_dtype(device)
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if isinstance(amp_dtype, str) and amp_dtype in names:
        return names[amp_dtype]
    if amp_dtype in (None, "fp32", "float32", "none", torch.float32):
        return None
    if amp_dtype in (torch.bfloat16, torch.float16):
        return amp_dtype
    raise ValueError(f"amp_dtype={amp_dtype!r}: use 'auto', 'bf16', 'fp16', 'fp32' or a torch dtype.")


def _cpu_has_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded; the message names the file and what to do."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any image file to an 8-bit RGB PIL image, honouring EXIF orientation.

    Handles L, LA, P (with or without transparency), RGBA, I;16/I/F (16-bit and float, rescaled
    to 8 bit) and CMYK. Transparent pixels are composited on black, the endoscope background.
    Raises ImageDecodeError naming the file for empty, truncated or non-image files.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        size = path.stat().st_size if path.exists() else -1
        why = "the file is empty (0 bytes)" if size == 0 else f"{type(e).__name__}: {e}"
        raise ImageDecodeError(
            f"{path}: cannot decode image ({why}). Re-export or re-download this file, or remove it "
            "from the annotation; it is listed as skipped."
        ) from e
    return to_rgb(im)


def load_thumbnail(path: str | os.PathLike, px: int = 256) -> np.ndarray:
    """An image decoded with load_rgb and shrunk to fit px x px (aspect kept), (H, W, 3) uint8: what
    the figures draw, so rendering never resamples full-size frames."""
    im = load_rgb(path)
    im.thumbnail((px, px))
    return np.asarray(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (alpha composited on black)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def file_stat_key(path: str | os.PathLike) -> tuple[str, int, int, int, int]:
    """(absolute path, size, mtime ns, ctime ns, inode): what says a file is unchanged. The change
    time is in it because copies that keep the mtime (cp -p, rsync -a, unzip) cannot keep it: any
    write or replacement of the file sets it."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


# SHA-1s already computed in this process, by file_stat_key: the loader, the embedding and the
# prediction caches all ask for the same files, and a changed file has another key.
_SHA1_BY_STAT: dict[tuple[str, int, int, int, int], str] = {}


def file_digest(path: str | os.PathLike, algorithm: str = "sha1", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes (hashlib `algorithm`), read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes: the identity used for leakage checks and caches. Computed once per
    process for each file_stat_key and remembered."""
    key = file_stat_key(path)
    if key not in _SHA1_BY_STAT:
        _SHA1_BY_STAT[key] = file_digest(path, "sha1")
    return _SHA1_BY_STAT[key]


# =============================================================================================
# 3. Data: finding and loading every ENTRep layout
# =============================================================================================

# Folders and files a Mac zip leaves behind (ENTREP.md): never data.
_JUNK_DIRS = {"__MACOSX", ".ipynb_checkpoints", ".git"}
# Words that mark a header row in the otherwise headerless test CSVs.
_CSV_HEADER_WORDS = {"image", "images", "img", "file", "filename", "file_name", "path", "name", "id", "text", "query", "caption"}


def normalize_label(raw: object) -> str | None:
    """Map a label as written in an annotation (`Ear_Left `, `VC open`) to LABELS, or None."""
    if not isinstance(raw, str):
        return None
    s = unicodedata.normalize("NFKC", raw).strip().lower()
    s = re.sub(r"[\s_\-]+", "-", s)
    s = {"vocal-cords-open": "vc-open", "vocal-cords-closed": "vc-closed", "vc-close": "vc-closed"}.get(s, s)
    return s if s in LABEL_TO_ID else None


@dataclass
class FileIndex:
    """Every image file under a root, looked up by name case-insensitively (the `_image`/`_Image` defect)."""

    root: Path
    by_lower_name: dict[str, list[Path]]

    @classmethod
    def build(cls, root: Path) -> "FileIndex":
        by_lower_name: dict[str, list[Path]] = defaultdict(list)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
            for name in sorted(filenames):
                if name.startswith("._") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                by_lower_name[unicodedata.normalize("NFC", name).lower()].append(Path(dirpath) / name)
        return cls(Path(root), dict(by_lower_name))

    def resolve(self, name: str, near: Path) -> tuple[Path | None, str]:
        """The file called `name` (a bare name or a relative path) closest to folder `near`.

        Returns (path or None, note): note is "" for an exact match, "case" when only a
        case-insensitive match exists, "missing" when none does.
        """
        base = unicodedata.normalize("NFC", Path(str(name).replace("\\", "/")).name)
        candidates = self.by_lower_name.get(base.lower(), [])
        if not candidates:
            return None, "missing"
        exact = [p for p in candidates if p.name == base]
        pool = exact or candidates
        near_parts = Path(near).resolve().parts
        best = max(pool, key=lambda p: (_common_prefix_len(p.resolve().parts, near_parts), -len(p.parts)))
        return best, "" if exact else "case"


def _common_prefix_len(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class EntrepData:
    """Tidy tables for everything found under a data root.

    images:   one row per labelled image record: path, file, source, release, label, label_id,
              coarse, description_en, description_vi, type, sha1, width, height
    i2i:      query, match (file names), query_path, match_path, source
    t2i:      text, file, path, source
    queries:  {"cls" | "i2i": DataFrame(file, path, source, sha1), "t2i": DataFrame(text, source)};
              a query whose image is skipped keeps its row with an empty path
    problems: one row per problem: where (annotation file), item, kind, message
    inventory: every referenced image item with its status ("loaded" or "skipped") and reason
    """

    root: Path
    images: pd.DataFrame
    i2i: pd.DataFrame
    t2i: pd.DataFrame
    queries: dict[str, pd.DataFrame]
    problems: pd.DataFrame
    inventory: pd.DataFrame
    layouts: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """Images per label (rows) and source (columns), with totals."""
        if self.images.empty:
            return pd.DataFrame()
        table = pd.crosstab(self.images["label"], self.images["source"], margins=True, margins_name="total")
        order = [lab for lab in LABELS if lab in table.index] + ["total"]
        return table.loc[order]


class _Collector:
    """Accumulates rows and problems while annotation files are read. `earlier`: decode checks of
    an earlier run by file_stat_key (load_image_checks); `checks` gets this run's, for the next."""

    def __init__(self, root: Path, check_images: bool, earlier: dict[tuple, dict] | None = None):
        self.index = FileIndex.build(root)
        self.check_images = check_images
        self.earlier = earlier or {}
        self.checks: dict[tuple, dict] = {}
        self.new_checks = 0
        self.problems: list[dict] = []
        self.inventory: list[dict] = []
        self._image_status: dict[Path, tuple[str, dict]] = {}

    def problem(self, where: Path | str, item: str, kind: str, message: str) -> None:
        self.problems.append({"where": str(where), "item": item, "kind": kind, "message": message})

    def image(self, name: str, where: Path, role: str) -> tuple[Path | None, dict]:
        """Resolve, decode-check and account for one referenced image; None when skipped."""
        path, note = self.index.resolve(name, where.parent)
        info: dict = {}
        reason = ""
        if path is None:
            reason = "missing"
            self.problem(where, name, "missing-file",
                         f"{where}: '{name}' is referenced but no file of that name exists under "
                         f"{self.index.root}. Add the file or remove the entry; it is skipped.")
        else:
            if note == "case":
                self.problem(where, name, "name-case",
                             f"{where}: '{name}' matched '{path.name}' only case-insensitively "
                             "(known ENTRep defect); used that file.")
            status = self._check(path)
            if status[0]:
                reason = "undecodable"
                self.problem(where, name, "undecodable", status[0])
            info = status[1]
        self.inventory.append({"where": str(where), "item": name, "role": role,
                               "path": str(path) if path else "", "status": "skipped" if reason else "loaded",
                               "reason": reason})
        return (None if reason else path), info

    def _check(self, path: Path) -> tuple[str, dict]:
        if path not in self._image_status:
            key = file_stat_key(path)
            known = self.earlier.get(key)  # failures are checked again: their cause may be the environment
            if known is None or known["error"] or (self.check_images and not known["decoded"]):
                known = {"sha1": file_sha1(path), "decoded": self.check_images, "error": "", "size": None}
                if self.check_images:
                    try:
                        im = load_rgb(path)
                        known["size"] = [im.width, im.height]
                    except ImageDecodeError as e:
                        known["error"] = str(e)
                self.new_checks += 1
            self.checks[key] = known
            _SHA1_BY_STAT.setdefault(key, known["sha1"])
            info = {"sha1": known["sha1"]}
            if known["size"]:
                info.update(width=known["size"][0], height=known["size"][1])
            self._image_status[path] = (known["error"], info)
        return self._image_status[path]


IMAGE_CHECKS_FORMAT = "entrep-image-checks-2"


def load_image_checks(path: str | os.PathLike) -> dict[tuple, dict]:
    """Decode checks saved by an earlier load_entrep ({file_stat_key: {sha1, decoded, error, size}});
    {} when absent. An unreadable or foreign file (or one from an older format) is reported and
    ignored: every image is checked again."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != IMAGE_CHECKS_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return {(e["path"], int(e["bytes"]), int(e["mtime_ns"]), int(e["ctime_ns"]), int(e["inode"])):
                {k: e[k] for k in ("sha1", "decoded", "error", "size")} for e in data["files"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"{path}: unreadable image-check cache ({type(e).__name__}: {e}); checking every image again.")
        return {}


def save_image_checks(checks: Mapping[tuple, Mapping], path: str | os.PathLike) -> Path:
    """Write decode checks for load_image_checks (atomic JSON)."""
    files = [{"path": p, "bytes": size, "mtime_ns": mtime, "ctime_ns": ctime, "inode": inode, **facts}
             for (p, size, mtime, ctime, inode), facts in checks.items()]
    return save_json({"format": IMAGE_CHECKS_FORMAT, "files": files}, path)


def _read_json(path: Path, col: _Collector):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        col.problem(path, path.name, "bad-annotation",
                    f"{path}: not valid UTF-8 JSON ({e}). Re-download the file; it is ignored.")
        return None


def _label_row(col: _Collector, where: Path, name: str, raw_label: object, source: str, release: str,
               **extra) -> dict | None:
    label = normalize_label(raw_label)
    if label is None:
        col.problem(where, name, "unknown-label",
                    f"{where}: '{name}' has label {raw_label!r}, which is not one of {list(LABELS)} "
                    "(case, spaces and '_' are already forgiven). Fix the label; the image is skipped.")
        col.inventory.append({"where": str(where), "item": name, "role": "labelled", "path": "",
                              "status": "skipped", "reason": "unknown-label"})
        return None
    path, info = col.image(name, where, "labelled")
    if path is None:
        return None
    return {"path": str(path), "file": path.name, "source": source, "release": release, "label": label,
            "label_id": LABEL_TO_ID[label], "coarse": LABEL_TO_COARSE[label], **extra, **info}


def _source_name(annotation: Path, root: Path) -> str:
    """A short name for where an annotation came from: its folder relative to the root."""
    rel = annotation.parent.resolve().relative_to(root.resolve()) if annotation.parent.resolve() != root.resolve() else Path(".")
    return rel.as_posix() if rel.as_posix() != "." else root.name


def _load_train_release(path: Path, root: Path, col: _Collector, rows: list, i2i: list, t2i: list) -> None:
    """`cls.json` / `i2i.json` / `t2i.json`: one-line JSON objects beside an image folder."""
    data = _read_json(path, col)
    if data is None:
        return
    if not isinstance(data, dict):
        col.problem(path, path.name, "bad-annotation", f"{path}: expected a JSON object, got {type(data).__name__}; ignored.")
        return
    source = _source_name(path, root)
    kind = path.stem.lower()
    for key, value in data.items():
        if kind == "cls":
            row = _label_row(col, path, key, value, source, "train", description_en="", description_vi="", type="")
            if row:
                rows.append(row)
        elif kind == "i2i":
            q, _ = col.image(key, path, "i2i-query")
            m, _ = col.image(str(value), path, "i2i-match")
            if q is not None and m is not None:
                i2i.append({"query": q.name, "match": m.name, "query_path": str(q), "match_path": str(m), "source": source})
        else:  # t2i
            m, _ = col.image(str(value), path, "t2i-target")
            if m is not None:
                t2i.append({"text": key, "file": m.name, "path": str(m), "source": source})


def _load_public_release(path: Path, root: Path, col: _Collector, rows: list) -> None:
    """`data.json`: an array of {Path, Classification, Type, Description, DescriptionEN} records."""
    data = _read_json(path, col)
    if data is None:
        return
    if not isinstance(data, list):
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
    """Entries of a headerless one-column test CSV (BOM, CRLF, quotes, commas in texts allowed).

    Returns (entries, had_header). A row split on unquoted commas is joined back: entries are
    file names or free texts, never several columns.
    """
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [",".join(r) for r in csv.reader(f)]
    entries = [r.strip() if path.stem.lower() != "t2i" else r for r in rows]
    entries = [e for e in entries if e.strip()]
    had_header = bool(entries) and entries[0].strip().lower() in _CSV_HEADER_WORDS
    return (entries[1:] if had_header else entries), had_header


def _load_queries(path: Path, root: Path, col: _Collector, queries: dict) -> None:
    kind = path.stem.lower()
    entries, had_header = read_query_csv(path)
    if had_header:
        col.problem(path, entries[0] if entries else "", "csv-header",
                    f"{path}: the first line looks like a header and was not used as a query.")
    if not entries:
        col.problem(path, "", "empty-list", f"{path}: the list is empty; Track '{kind}' has nothing to answer.")
    source = _source_name(path, root)
    if kind == "t2i":
        queries["t2i"].extend({"text": e, "source": source} for e in entries)
        return
    for e in entries:
        p, info = col.image(e, path, f"{kind}-query")
        queries[kind].append({"file": e, "path": str(p) if p else "", "source": source, "sha1": info.get("sha1", "")})


def _load_class_folders(root: Path, col: _Collector, rows: list, claimed: set[Path]) -> list[Path]:
    """`<split>/<class>/<file>.png` trees: a folder named like a label holding images."""
    found = []
    for paths in col.index.by_lower_name.values():
        for p in paths:
            if p in claimed:
                continue
            label = normalize_label(p.parent.name)
            if label is None:
                continue
            found.append(p)
    for p in sorted(found):
        source = p.parent.parent.name or "folders"
        where = p.parent
        info_path, info = col.image(p.name, where / p.name, "labelled")
        if info_path is None:
            continue
        label = normalize_label(p.parent.name)
        rows.append({"path": str(p), "file": p.name, "source": source, "release": "folders", "label": label,
                     "label_id": LABEL_TO_ID[label], "coarse": LABEL_TO_COARSE[label],
                     "description_en": "", "description_vi": "", "type": "", **info})
    return sorted({p.parent for p in found})


ANNOTATION_FILES = {"cls.json", "i2i.json", "t2i.json", "data.json", "cls.csv", "i2i.csv", "t2i.csv"}


def find_annotation_files(root: str | os.PathLike) -> list[Path]:
    """Every ENTRep annotation or query-list file under root, in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
        out += [Path(dirpath) / n for n in sorted(filenames) if n.lower() in ANNOTATION_FILES and not n.startswith("._")]
    return out


def load_entrep(root: str | os.PathLike, check_images: bool = True, strict_labels: bool = False,
                cache_dir: str | os.PathLike | None = None) -> EntrepData:
    """Find and load every ENTRep layout under `root` (see ENTREP.md "Data layouts seen").

    Train release (cls/i2i/t2i.json), public release (data.json), test query lists
    (cls/i2i/t2i.csv) and class-folder trees are read wherever they sit; image files are found by
    name anywhere under root, case-insensitively. Nothing is dropped silently: every referenced
    image is in `inventory` as loaded or skipped with a reason, and each problem has a message
    naming the file and the fix. With strict_labels, an unknown label raises instead.

    Every referenced image is hashed (SHA-1) and, with check_images, decoded once. With
    `cache_dir`, those results are kept in `cache_dir/image_checks.json` by file_stat_key (path,
    size, modification and change times, inode), so a rerun reads only new or changed files;
    images that failed to decode are tried again on every run.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_path '{root}' is not a folder. Point data_path at the unpacked ENTRep "
                                "data, or use data_path='demo' for the synthetic demo set.")
    checks_path = None if cache_dir is None else Path(cache_dir) / "image_checks.json"
    col = _Collector(root, check_images, None if checks_path is None else load_image_checks(checks_path))
    rows: list[dict] = []
    i2i: list[dict] = []
    t2i: list[dict] = []
    queries: dict[str, list] = {"cls": [], "i2i": [], "t2i": []}
    layouts: list[str] = []
    for path in find_annotation_files(root):
        name = path.name.lower()
        if name.endswith(".csv"):
            _load_queries(path, root, col, queries)
            layouts.append(f"test list: {path.relative_to(root)}")
        elif name == "data.json":
            _load_public_release(path, root, col, rows)
            layouts.append(f"public release: {path.relative_to(root)}")
        else:
            _load_train_release(path, root, col, rows, i2i, t2i)
            layouts.append(f"train release: {path.relative_to(root)}")
    claimed = {Path(r["path"]) for r in rows}
    for folder in _load_class_folders(root, col, rows, claimed):
        layouts.append(f"class folder: {folder.relative_to(root)}")
    if not layouts:
        raise FileNotFoundError(
            f"No ENTRep data under '{root}': searched for {sorted(ANNOTATION_FILES)} and "
            "<split>/<class>/*.png folders. Set data_path to the folder holding them, or use 'demo'.")
    problems = pd.DataFrame(col.problems, columns=["where", "item", "kind", "message"])
    if strict_labels and (problems["kind"] == "unknown-label").any():
        bad = problems.loc[problems["kind"] == "unknown-label", "message"].tolist()
        raise ValueError("Unknown labels:\n" + "\n".join(bad))
    images = pd.DataFrame(rows, columns=["path", "file", "source", "release", "label", "label_id", "coarse",
                                         "description_en", "description_vi", "type", "sha1", "width", "height"])
    images, dup_problems = _drop_duplicate_records(images)
    if checks_path is not None and (col.new_checks or col.checks.keys() != col.earlier.keys()):
        save_image_checks(col.checks, checks_path)  # this run's files only: gone or changed ones drop out
    problems = pd.concat([problems, dup_problems], ignore_index=True)
    return EntrepData(
        root=root, images=images.reset_index(drop=True),
        i2i=pd.DataFrame(i2i, columns=["query", "match", "query_path", "match_path", "source"]),
        t2i=pd.DataFrame(t2i, columns=["text", "file", "path", "source"]),
        queries={"cls": pd.DataFrame(queries["cls"], columns=["file", "path", "source", "sha1"]),
                 "i2i": pd.DataFrame(queries["i2i"], columns=["file", "path", "source", "sha1"]),
                 "t2i": pd.DataFrame(queries["t2i"], columns=["text", "source"])},
        problems=problems, inventory=pd.DataFrame(col.inventory), layouts=layouts)


def _drop_duplicate_records(images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep one labelled record per image content; report copies and conflicting labels."""
    problems = []
    keep = np.ones(len(images), dtype=bool)
    for sha, group in images.groupby("sha1", sort=False):
        if len(group) < 2:
            continue
        first = group.iloc[0]
        for idx, row in group.iloc[1:].iterrows():
            same = row["label"] == first["label"]
            kind = "duplicate" if same else "label-conflict"
            problems.append({"where": row["source"], "item": row["file"], "kind": kind,
                             "message": f"'{row['path']}' has the same bytes as '{first['path']}'"
                             + ("" if same else f" but label {row['label']!r} vs {first['label']!r}")
                             + "; the first record is kept."})
            keep[images.index.get_loc(idx)] = False
    return images[keep], pd.DataFrame(problems, columns=["where", "item", "kind", "message"])


def find_leakage(data: EntrepData) -> pd.DataFrame:
    """Test-list images whose bytes equal a labelled image (ENTREP.md: 71 public-test images are
    train images). One row per (test item, labelled copy): track, file, labelled_file, label."""
    labelled = data.images[["sha1", "file", "label"]].rename(columns={"file": "labelled_file"})
    rows = []
    for track in ("cls", "i2i"):
        q = data.queries[track]
        q = q[q["sha1"] != ""]
        hits = q.merge(labelled, on="sha1")
        rows.append(hits.assign(track=track)[["track", "file", "labelled_file", "label"]])
    return pd.concat(rows, ignore_index=True).drop_duplicates()


def select_test_queries(queries: Mapping[str, pd.DataFrame], test_split: str = "auto") -> dict[str, pd.DataFrame]:
    """One test list per track, never several merged (public and private test sets may both be
    attached). "auto" keeps a track's only list and refuses to guess between several; any other
    value keeps the lists whose folder contains it, case-insensitively (e.g. "Private")."""
    out = {}
    for track, q in queries.items():
        sources = list(dict.fromkeys(q["source"]))
        keep = sources if test_split == "auto" else [s for s in sources if test_split.lower() in s.lower()]
        if len(keep) > 1:
            raise ValueError(f"Track '{track}' has test lists in {keep}: set the test_split parameter to part of "
                             "one folder name (e.g. 'Public' or 'Private') so that one test set is answered.")
        out[track] = q[q["source"].isin(keep)].reset_index(drop=True)
    return out


def exam_id(file: str) -> str:
    """Examination of a public-release file `<8 digits>_<18 digits>_<3 digits>_imageNN.png`: its
    first two fields (several images share one examination); the file name itself otherwise."""
    m = re.match(r"^(\d{8}_\d{18})_", file)
    return m.group(1) if m else file


def split_groups(images: pd.DataFrame, i2i: pd.DataFrame) -> np.ndarray:
    """Group id per image row: rows linked by identical bytes, an i2i pair or one examination
    share a group, so a split by group never separates them (union-find)."""
    parent = list(range(len(images)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union_all(members: Iterable[int]) -> None:
        members = list(members)
        for m in members[1:]:
            parent[find(m)] = find(members[0])

    by_key: dict[str, list[int]] = defaultdict(list)
    for i, (sha, file) in enumerate(zip(images["sha1"], images["file"])):
        by_key["sha:" + sha].append(i)
        by_key["file:" + file.lower()].append(i)
        by_key["exam:" + exam_id(file)].append(i)
    for members in by_key.values():
        union_all(members)
    for q, m in zip(i2i["query"], i2i["match"]):
        union_all(by_key.get("file:" + q.lower(), []) + by_key.get("file:" + m.lower(), []))
    return np.array([find(i) for i in range(len(images))])


def grouped_fold_ids(labels: Sequence[int], groups: Sequence[int], n_splits: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id per sample (0..k-1), stratified by label and grouped (scikit-learn's
    StratifiedGroupKFold): with split_groups' groups, a choice cross-fitted on validation is never
    tuned on one view of an examination and scored on the other. Small data is handled explicitly:
    k is capped by the number of groups and by the largest class (sklearn refuses more folds than
    any class has members), and when no class has two members the folds are grouped only
    (GroupKFold)."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(np.unique(groups))
    largest = np.bincount(np.unique(labels, return_inverse=True)[1]).max() if len(labels) else 0
    k = min(n_splits, n_groups, largest)
    if k >= 2:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    elif min(n_splits, n_groups) >= 2:
        k = min(n_splits, n_groups)
        splitter = GroupKFold(n_splits=k)  # shuffled through the group ids below (any sklearn version)
        _, groups = np.unique(groups, return_inverse=True)
        groups = np.random.default_rng(seed).permutation(n_groups)[groups]
    else:
        raise ValueError(f"{len(labels)} samples in {n_groups} group(s) cannot be split into folds; add labelled images.")
    folds = np.full(len(labels), -1)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than folds; that class then sits in fewer folds.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            folds[held] = fold
    return folds


def split_train_val(images: pd.DataFrame, i2i: pd.DataFrame, val_fraction: float = 0.15,
                    seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, label-stratified train/validation split by group (see split_groups).

    Returns (train_index, val_index) as positions into `images`: the first of round(1/val_fraction)
    stratified group folds is validation (fewer folds when the data is too small for that many).
    """
    if len(images) < 2:
        raise ValueError(f"{len(images)} labelled image(s) are too few for a validation split; add labelled images.")
    folds = grouped_fold_ids(images["label_id"].to_numpy(), split_groups(images, i2i),
                             max(2, round(1 / val_fraction)), seed)
    return np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)


# =============================================================================================
# 4. Demo data: a SYNTHETIC data set in the official layouts (never real ENTRep data)
# =============================================================================================

DEMO_NOTICE = ("SYNTHETIC DEMO DATA made by utils.make_demo_dataset: drawn shapes, not endoscopy. "
               "No real ENTRep image or annotation is in it; numbers on it say nothing about the method.")

# Visible findings drawn per region, with the short English caption and a Vietnamese gloss used in
# the synthetic public-release descriptions (wording modelled on ENTREP.md's caption examples).
DEMO_FINDINGS: dict[str, dict[str, tuple[str, str]]] = {
    "ear": {"perforation": ("a perforated tympanic membrane", "Thủng màng nhĩ"),
            "intact": ("the tympanic membrane is intact", "Màng nhĩ nguyên vẹn"),
            "wax": ("wax in the ear canal", "Ráy tai trong ống tai")},
    "nose": {"spur": ("a spur on the septum", "Gai vách ngăn"),
             "polyp": ("a polyp in the middle meatus", "Polyp khe giữa"),
             "mucus": ("mucus in the nasal cavity", "Dịch nhầy trong hốc mũi")},
    "vc": {"open": ("the vocal cords are open", "Dây thanh mở"),
           "closed": ("incomplete glottic closure", "Thanh môn đóng không kín"),
           "nodule": ("a nodule on the vocal fold", "Hạt xơ dây thanh"),
           "red": ("red swollen vocal folds", "Dây thanh phù nề, sung huyết")},
    "throat": {"tonsils": ("enlarged tonsils", "Amidan quá phát"),
               "patches": ("white patches on the tonsils", "Mảng trắng trên amidan"),
               "normal": ("a normal oropharynx", "Họng bình thường")},
}

# Class proportions of the real train release (cls.json counts, ENTREP.md).
_REAL_CLS_COUNTS = {"nose-right": 325, "nose-left": 290, "vc-open": 159, "ear-right": 156,
                    "vc-closed": 147, "ear-left": 133, "throat": 81}
DEMO_SIZE = (640, 480)  # the real frames' size


def demo_exam(region: str, rng: np.random.Generator) -> dict:
    """A synthetic examination: one patient's look (tint, texture) and findings in one region."""
    f = {
        "ear": lambda: {"perforation": rng.random() < 0.35, "wax": rng.random() < 0.3},
        "nose": lambda: {"spur": rng.random() < 0.4, "polyp": rng.random() < 0.3, "mucus": rng.random() < 0.3},
        "vc": lambda: {"nodule": rng.random() < 0.3, "red": rng.random() < 0.3},
        "throat": lambda: {"tonsils": rng.random() < 0.5, "patches": rng.random() < 0.3},
    }[region]()
    return {"region": region, "findings": f, "tint": rng.uniform(0.8, 1.15, 3).tolist(),
            "texture_seed": int(rng.integers(2**31)), "anatomy": rng.uniform(-1, 1, 6).tolist()}


def demo_view(exam: dict, label: str, rng: np.random.Generator) -> dict:
    """One view of an examination: label (side/state), pose, blur, noise and glare of this shot."""
    assert LABEL_TO_COARSE[label] == exam["region"], (label, exam["region"])
    return {**exam, "label": label, "angle": float(rng.uniform(-25, 25)), "scale": float(rng.uniform(0.85, 1.15)),
            "shift": rng.uniform(-30, 30, 2).tolist(), "blur": float(rng.uniform(0, 2.2)),
            "noise": float(rng.uniform(2, 10)), "noise_seed": int(rng.integers(2**31)),
            "glare": rng.uniform(0, 1, (int(rng.integers(0, 4)), 3)).tolist(),
            "gap": float(rng.uniform(0.55, 1.0) if label == "vc-open" else rng.uniform(0.0, 0.12))}


def render_demo_image(view: dict) -> Image.Image:
    """Draw a 640x480 synthetic endoscopy frame for a view (see demo_view).

    Ear and nose are drawn as the right side; a left label is the exact mirror of the same
    scene, so a horizontal flip with a left<->right label swap is valid by construction.
    """
    w, h = DEMO_SIZE
    a = np.asarray(view["anatomy"])
    tint = np.asarray(view["tint"])
    tex_rng = np.random.default_rng(view["texture_seed"])
    base_rgb = {"ear": (150, 95, 80), "nose": (205, 120, 115), "vc": (170, 80, 85), "throat": (200, 85, 80)}[view["region"]]
    texture = Image.fromarray((tex_rng.uniform(0.75, 1.15, (12, 16)) * 255 / 1.15).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    canvas = ImageChops.multiply(texture.convert("RGB"), Image.new("RGB", (w, h), _tinted(base_rgb, tint)))
    draw = ImageDraw.Draw(canvas)
    {"ear": _draw_ear, "nose": _draw_nose, "vc": _draw_vc, "throat": _draw_throat}[view["region"]](draw, view, a, tint)
    # Pose: rotation, scale and shift of the scene inside the fixed field of view.
    canvas = canvas.rotate(view["angle"], resample=Image.BILINEAR, translate=tuple(view["shift"]),
                           fillcolor=_tinted(base_rgb, tint * 0.8))
    s = view["scale"]
    cw, ch = int(w / s), int(h / s)
    canvas = canvas.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)).resize((w, h), Image.BILINEAR)
    glare = ImageDraw.Draw(canvas)
    for gx, gy, gr in view["glare"]:
        x, y, r = 170 + gx * 300, 90 + gy * 300, 6 + gr * 18
        glare.ellipse((x - r, y - r * 0.6, x + r, y + r * 0.6), fill=(250, 250, 245))
    if view["blur"] > 0.2:
        canvas = canvas.filter(ImageFilter.GaussianBlur(view["blur"]))
    noise = np.random.default_rng(view["noise_seed"]).standard_normal((h, w, 3), dtype=np.float32)
    arr = np.asarray(canvas, dtype=np.float32) + noise * view["noise"] + 0.5
    np.clip(arr, 0, 255, out=arr)
    out = Image.fromarray(arr.astype(np.uint8) * _fov_mask(w, h)[..., None], "RGB")
    return ImageOps.mirror(out) if view["label"] in ("ear-left", "nose-left") else out


@lru_cache(maxsize=4)
def _fov_mask(w: int, h: int) -> np.ndarray:
    """1 inside the endoscope's circular field of view (diameter about the frame's height), 0 outside."""
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - (w - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2 <= (h / 2 - 4) ** 2).astype(np.uint8)


def _draw_ear(d: ImageDraw.ImageDraw, v: dict, a: np.ndarray, tint: np.ndarray) -> None:
    """Ear canal and tympanic membrane of a right ear: malleus handle up-left, light cone to 5 o'clock."""
    cx, cy = 320 + 15 * a[0], 240 + 10 * a[1]
    rx, ry = 150 + 15 * a[2], 125 + 12 * a[3]
    d.ellipse((cx - rx - 30, cy - ry - 30, cx + rx + 30, cy + ry + 30), fill=_tinted((120, 70, 60), tint))
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_tinted((190, 175, 165), tint))
    d.line((cx - 35, cy - ry + 20, cx + 5, cy + 5), fill=_tinted((235, 225, 200), tint), width=14)  # malleus
    d.polygon([(cx + 10, cy + 15), (cx + rx * 0.75, cy + ry * 0.45), (cx + rx * 0.55, cy + ry * 0.75)],
              fill=(245, 245, 235))  # cone of light, anterior-inferior
    if v["findings"]["perforation"]:
        px, py = cx - rx * 0.35 + 20 * a[4], cy + ry * 0.3
        d.ellipse((px - 38, py - 30, px + 38, py + 30), fill=(40, 10, 10))
    if v["findings"]["wax"]:
        for k in range(3):
            wx, wy = cx + (rx + 10) * np.cos(2.0 + k * 0.7 + a[5]), cy + (ry + 10) * np.sin(2.0 + k * 0.7 + a[5])
            d.ellipse((wx - 25, wy - 18, wx + 25, wy + 18), fill=(120, 80, 20))


def _draw_nose(d: ImageDraw.ImageDraw, v: dict, a: np.ndarray, tint: np.ndarray) -> None:
    """Right nasal cavity: septum wall on the image's left, turbinates on the right, dark airway between."""
    sx = 230 + 20 * a[0]
    d.polygon([(0, 0), (sx, 0), (sx - 30, 480), (0, 480)], fill=_tinted((215, 140, 135), tint))  # septum
    d.polygon([(sx, 40), (sx + 110, 30), (sx + 70, 460), (sx - 25, 470)], fill=(35, 12, 12))  # airway
    d.ellipse((sx + 80, 210 + 20 * a[1], 660, 470), fill=_tinted((200, 105, 105), tint))  # inferior turbinate
    d.ellipse((sx + 110, 20, 620, 190 + 15 * a[2]), fill=_tinted((190, 100, 100), tint))  # middle turbinate
    if v["findings"]["spur"]:
        d.polygon([(sx - 20, 230), (sx + 60 + 10 * a[3], 265), (sx - 25, 300)], fill=_tinted((240, 175, 165), tint))
    if v["findings"]["polyp"]:
        d.ellipse((sx + 70, 150, sx + 150, 240), fill=(205, 200, 185))
    if v["findings"]["mucus"]:
        d.line((sx + 20, 80, sx + 40 + 20 * a[4], 420), fill=(230, 225, 150), width=9)


def _draw_vc(d: ImageDraw.ImageDraw, v: dict, a: np.ndarray, tint: np.ndarray) -> None:
    """Larynx from above: epiglottis at the top, two white vocal folds meeting anteriorly; the
    glottal gap between their posterior ends is what separates vc-open from vc-closed."""
    cx, top, bottom = 320 + 10 * a[0], 130 + 10 * a[1], 360 + 10 * a[2]
    d.chord((cx - 170, 20, cx + 170, 230), 180, 360, fill=_tinted((225, 150, 130), tint))  # epiglottis
    gap = 15 + 105 * v["gap"]
    d.polygon([(cx, top), (cx - gap, bottom), (cx + gap, bottom)], fill=(20, 5, 5))  # glottis
    fold = (235, 120, 115) if v["findings"]["red"] else (240, 235, 225)
    d.polygon([(cx - 4, top), (cx - gap - 4, bottom), (cx - gap - 34, bottom - 5), (cx - 24, top + 10)], fill=fold)
    d.polygon([(cx + 4, top), (cx + gap + 4, bottom), (cx + gap + 34, bottom - 5), (cx + 24, top + 10)], fill=fold)
    for side in (-1, 1):  # arytenoids
        d.ellipse((cx + side * (gap + 20) - 35, bottom - 5, cx + side * (gap + 20) + 35, bottom + 55),
                  fill=_tinted((200, 110, 110), tint))
    if v["findings"]["nodule"]:
        t = 0.45 + 0.1 * a[3]
        nx, ny = cx - (gap + 10) * t, top + (bottom - top) * t
        d.ellipse((nx - 12, ny - 10, nx + 6, ny + 10), fill=(255, 255, 250))


def _draw_throat(d: ImageDraw.ImageDraw, v: dict, a: np.ndarray, tint: np.ndarray) -> None:
    """Oropharynx: dark cavity, uvula from the soft palate, tonsils either side, tongue below."""
    cx = 320 + 10 * a[0]
    d.ellipse((cx - 120, 120, cx + 120, 380), fill=(60, 15, 15))  # pharynx
    d.rounded_rectangle((cx - 22, 40, cx + 22, 210 + 20 * a[1]), radius=20, fill=_tinted((215, 100, 95), tint))
    r = 70 if v["findings"]["tonsils"] else 40
    for side in (-1, 1):
        tx = cx + side * (150 - r * 0.4)
        d.ellipse((tx - r, 240 - r, tx + r, 240 + r), fill=_tinted((220, 90, 85), tint))
        if v["findings"]["patches"]:
            d.ellipse((tx - 15, 225, tx + 12, 250), fill=(245, 245, 225))
    d.ellipse((cx - 260, 360 + 15 * a[2], cx + 260, 640), fill=_tinted((225, 125, 120), tint))  # tongue


def _tinted(rgb: tuple[int, int, int], tint: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(min(255, c * t)) for c, t in zip(rgb, tint))


def demo_caption(view: dict) -> tuple[str, str]:
    """(English, Vietnamese) finding that matches what the view shows."""
    region, f = view["region"], view["findings"]
    if region == "ear":
        keys = ["perforation" if f["perforation"] else "intact"] + (["wax"] if f["wax"] else [])
    elif region == "nose":
        keys = [k for k in ("spur", "polyp", "mucus") if f[k]] or ["mucus"]
    elif region == "vc":
        keys = [k for k in ("nodule", "red") if f[k]] + ["open" if view["label"] == "vc-open" else "closed"]
    else:
        keys = [k for k in ("tonsils", "patches") if f[k]] or ["normal"]
    en, vi = zip(*(DEMO_FINDINGS[region][k] for k in keys[:2]))
    return " and ".join(en), ", ".join(vi)


def _demo_labels(n: int, rng: np.random.Generator) -> list[str]:
    """n labels drawn with the real train release's class proportions."""
    p = np.array([_REAL_CLS_COUNTS[lab] for lab in LABELS], dtype=float)
    return list(rng.choice(LABELS, size=n, p=p / p.sum()))


def _partner_label(label: str, rng: np.random.Generator) -> str:
    """The second view of an examination: same region; the other side/state 43% of the time (ENTREP.md)."""
    region = LABEL_TO_COARSE[label]
    if region in FINE_TASKS and rng.random() < 0.43:
        pair = FINE_TASKS[region]
        return pair[1 - pair.index(label)]
    return label


def _save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, compress_level=1)


def _write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def make_demo_dataset(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 180, n_public: int = 50,
                      n_test: int = 40, n_i2i_pairs: int = 24, n_t2i: int = 24, workers: int | None = None) -> Path:
    """Write the synthetic demo set in the official layouts under out_dir and return its root.

    Layout (as the real releases, see ENTREP.md):
      train/imgs/<uuid4>.png + train/cls.json, train/i2i.json, train/t2i.json
      public/images/<8>_<18>_<3>_imageNN.png + public/data.json (one `_Image` case defect)
      PublicData/PublicTest/*.png with Track1_Public/cls.csv, Track2_Public/i2i.csv, Track3_Public/t2i.csv
    i2i pairs are two views of one examination; about half of the i2i images carry no cls label;
    one i2i target exists only in the test folder, one i2i query is missing; two test images are
    byte copies of train images (leakage). All randomness is drawn up front from `seed`, so the
    same seed writes the same bytes whatever the number of render workers.
    """
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    new_name = lambda: f"{uuid.UUID(int=int(rng.integers(2**63)) << 64 | int(rng.integers(2**63)), version=4)}.png"
    jobs: list[tuple[dict, Path]] = []  # (view, where to write it)
    new_view = lambda label: demo_view(demo_exam(LABEL_TO_COARSE[label], rng), label, rng)

    def exam_pair(label: str) -> tuple[dict, dict]:
        exam = demo_exam(LABEL_TO_COARSE[label], rng)
        return demo_view(exam, label, rng), demo_view(exam, _partner_label(label, rng), rng)

    # Train release: labelled single views, then i2i examinations with two views each.
    imgs, test_dir = root / "train" / "imgs", root / "PublicData" / "PublicTest"
    cls, i2i, t2i, views = {}, {}, {}, {}
    for label in _demo_labels(n_train - n_i2i_pairs, rng):
        name = new_name()
        views[name] = new_view(label)
        cls[name] = label
    pairs = []
    for k, label in enumerate(_demo_labels(n_i2i_pairs, rng)):
        a, b = new_name(), new_name()
        views[a], views[b] = exam_pair(label)
        i2i[a], i2i[b] = b, a
        for name in (a, b) if k % 2 else (a,):  # about half of the i2i images carry a cls label
            cls[name] = views[name]["label"]
        pairs.append((a, b))
    moved = pairs[0][1]  # an i2i target that sits only in the test folder, as in the real release
    cls.pop(moved, None)
    i2i["missing-0000.png"] = pairs[1][0]  # a one-way entry whose query file is absent: reported
    jobs += [(v, (test_dir if n == moved else imgs) / n) for n, v in views.items()]
    for name in rng.permutation(sorted(n for pair in pairs for n in pair if n != moved))[:n_t2i]:
        t2i.setdefault(demo_caption(views[name])[0], str(name))  # captions point at i2i images, as in the real set

    # Test release: Track 1 images; Track 2 queries are new examinations' view pairs; Track 3 captions.
    test_cls = []
    for label in _demo_labels(n_test, rng):
        test_cls.append(new_name())
        jobs.append((new_view(label), test_dir / test_cls[-1]))
    test_i2i = []
    for label in _demo_labels(8, rng):
        for view in exam_pair(label):
            test_i2i.append(new_name())
            jobs.append((view, test_dir / test_i2i[-1]))
    leaked = [(imgs / src, test_dir / new_name()) for src in list(cls)[:2]]  # byte copies: leakage
    test_captions = sorted({demo_caption(new_view(label))[0] for label in _demo_labels(8, rng)})

    # Public release: examinations of 1-3 images, names with the `_image` / `_Image` defect.
    records = []
    while len(records) < n_public:
        label = _demo_labels(1, rng)[0]
        exam = demo_exam(LABEL_TO_COARSE[label], rng)
        stem = f"{rng.integers(10**7, 10**8)}_{rng.integers(10**17, 10**18)}_{rng.integers(100, 1000)}"
        for k in range(int(rng.integers(1, 4))):
            view = demo_view(exam, label if k == 0 else _partner_label(label, rng), rng)
            file = f"{stem}_image{k + 1:02d}.png"
            on_disk = file.replace("_image", "_Image") if not records else file  # the known case defect
            jobs.append((view, root / "public" / "images" / on_disk))
            en, vi = demo_caption(view)
            records.append({"Path": file, "Classification": view["label"], "Type": "abnormal",
                            "Description": vi + "\r\n(dữ liệu tổng hợp)", "DescriptionEN": en + "\r\n(synthetic)"})

    root.mkdir(parents=True, exist_ok=True)
    (root / "README_SYNTHETIC.txt").write_text(DEMO_NOTICE + "\n", encoding="utf-8")
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:  # PIL and zlib release the GIL
        list(pool.map(lambda job: _save_png(render_demo_image(job[0]), job[1]), jobs))
    for src, dst in leaked:
        dst.write_bytes(src.read_bytes())
    _write_json(cls, root / "train" / "cls.json")
    _write_json(i2i, root / "train" / "i2i.json")
    _write_json(t2i, root / "train" / "t2i.json")
    _write_json(records, root / "public" / "data.json")
    _write_lines(test_cls + [dst.name for _, dst in leaked], root / "Track1_Public" / "cls.csv")
    _write_lines(test_i2i, root / "Track2_Public" / "i2i.csv")
    _write_lines(test_captions, root / "Track3_Public" / "t2i.csv")
    return root


def _write_lines(lines: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")


# =============================================================================================
# 5. Run setup: seeds, data path, resolved parameters
# =============================================================================================

DEMO_VERSION = 2  # bump when make_demo_dataset changes, so a cached demo set is rebuilt


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def find_data_root(search_roots: Sequence[str | os.PathLike]) -> Path | None:
    """The folder under the first search root that holds ENTRep annotation files (e.g. a Kaggle
    input folder whatever the data set was named), or None. The common parent of all the
    annotation files found is returned, so train, public and test parts are loaded together."""
    for base in search_roots:
        base = Path(base)
        if not base.is_dir():
            continue
        found = find_annotation_files(base)
        if found:
            return Path(os.path.commonpath([str(p.parent) for p in found]))
    return None


def resolve_data_path(data_path: str, output_dir: str | os.PathLike, seed: int,
                      search_roots: Sequence[str] = ("/kaggle/input",)) -> Path:
    """Turn the `data_path` parameter into a folder to load.

    "demo": the synthetic demo set under output_dir/demo_data (made once per seed and reused);
    "auto": the folder under `search_roots` whose files look like ENTRep; else the path given.
    """
    if data_path == "demo":
        root = Path(output_dir) / "demo_data"
        stamp = root / "demo_stamp.json"
        want = {"seed": seed, "version": DEMO_VERSION}
        if not (stamp.exists() and json.loads(stamp.read_text()) == want):
            import shutil

            shutil.rmtree(root, ignore_errors=True)
            make_demo_dataset(root, seed=seed)
            stamp.write_text(json.dumps(want))
        return root
    if data_path == "auto":
        root = find_data_root(search_roots)
        if root is None:
            raise FileNotFoundError(
                f"No ENTRep data found: searched {list(search_roots)} for {sorted(ANNOTATION_FILES)}. "
                "On Kaggle, add the ENTRep data set as input; elsewhere set data_path to its folder, "
                "or use data_path='demo' for the synthetic demo set.")
        return root
    return Path(data_path).expanduser()


def resolve_dino_weights(dino_weights: str, dino_model: str, search_roots: Sequence[str] = ("/kaggle/input",)) -> str:
    """Turn the `dino_weights` parameter into a checkpoint path or URL ("" = none).

    "auto" looks for a SurgeNet checkpoint (`*SurgeNet*.pth`) under search_roots whose size tag
    matches the model (ViTs14 / ViTb14 / ViTl14 for vit_small / base / large); none found -> ""
    with a warning, so the run still goes on from timm's own DINOv2 weights.
    """
    if dino_weights != "auto":
        return dino_weights
    if dino_model == "tiny":
        return ""
    size = next((tag for key, tag in (("small", "vits14"), ("base", "vitb14"), ("large", "vitl14")) if key in dino_model), "")
    found = sorted(p for root in search_roots if Path(root).is_dir() for p in Path(root).rglob("*.pth")
                   if "surgenet" in p.name.lower() and size in p.name.lower())
    if not found:
        warnings.warn(f"dino_weights='auto' found no *SurgeNet*{size}*.pth under {list(search_roots)}: fine-tuning "
                      "starts from timm's DINOv2 weights instead. Attach the SurgeNet checkpoint or set dino_weights.")
        return ""
    return str(found[0])


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temp file, then rename), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a Figure (creating the folder) and release pyplot's hold on it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_sample_grid(images: pd.DataFrame, per_class: int = 4, seed: int = 0, thumb: int = 160):
    """A grid of `per_class` random images for each label (rows in LABELS order); returns a Figure."""
    import matplotlib.pyplot as plt

    labels = [lab for lab in LABELS if (images["label"] == lab).any()]
    fig, axes = plt.subplots(len(labels), per_class, figsize=(per_class * 2.0, len(labels) * 1.6), squeeze=False)
    for r, lab in enumerate(labels):
        rows = images[images["label"] == lab]
        pick = rows.sample(min(per_class, len(rows)), random_state=seed)
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(pick):
                ax.imshow(load_thumbnail(pick.iloc[c]["path"], thumb))
        axes[r][0].set_title(lab, loc="left", fontsize=9)
    fig.tight_layout()
    return fig


# =============================================================================================
# 6. BiomedCLIP: embeddings and prototypes
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 6.1 BiomedCLIP constants
# ---------------------------------------------------------------------------------------------

# open_clip hub name of BiomedCLIP (Zhang et al. 2023, arXiv:2303.00915), the paper's CLIP model.
BIOMEDCLIP_HUB_ID: str = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

# Hub repo of BiomedCLIP's text tower (its open_clip_config.json `text_cfg.hf_model_name`); offline
# users copy its config.json + vocab.txt next to the BiomedCLIP weights (see load_clip).
BIOMEDCLIP_TEXT_HUB_ID: str = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"

# A tiny random CLIP for CPU tests and dry runs (project's own sizes): open_clip's native ViT and
# text transformer with the bundled BPE SimpleTokenizer (vocab 49408), so nothing is downloaded.
TINY_CLIP_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# Checkpoint names open_clip's `local-dir:` loader prefers (open_clip 3.x factory._find_checkpoint_in_dir).
CLIP_CHECKPOINT_NAMES: tuple[str, ...] = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
# Files a Hugging Face BERT tokenizer/config is read from (transformers AutoConfig / AutoTokenizer).
HF_TEXT_FILES: tuple[str, ...] = (
    "config.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

# Prompt templates for text prototypes. The paper does not publish its prompts: these follow CLIP's
# prompt ensembling (Radford et al. 2021; open_clip zero_shot_metadata.py) and the zero-shot
# template of BiomedCLIP's model card ("this is a photo of {}").
PROMPT_TEMPLATES: tuple[str, ...] = (
    "this is a photo of {}.",  # BiomedCLIP model card
    "an endoscopic image of the {}.",
    "an ENT endoscopy image of the {}.",
    "an otolaryngology endoscopic view of the {}.",
)

# What each of the paper's 4 coarse regions shows through the endoscope (project wording, ENT
# anatomy; regions from ../shared/ENTREP.md). Keys are utils.COARSE_CLASSES.
COARSE_CLASS_TEXTS: dict[str, tuple[str, ...]] = {
    "ear": ("ear canal and tympanic membrane", "ear", "eardrum"),
    "nose": ("nasal cavity", "nose", "nasal septum and turbinates"),
    "vc": ("vocal cords", "larynx and glottis", "vocal folds"),
    "throat": ("throat", "oropharynx", "pharynx and tonsils"),
}

# The same for the 7 official labels (keys are utils.LABELS; side = patient's side).
FINE_CLASS_TEXTS: dict[str, tuple[str, ...]] = {
    "nose-right": ("right nasal cavity", "right side of the nose"),
    "nose-left": ("left nasal cavity", "left side of the nose"),
    "ear-right": ("right ear canal and tympanic membrane", "right ear"),
    "ear-left": ("left ear canal and tympanic membrane", "left ear"),
    "vc-open": ("open vocal cords during breathing", "abducted vocal folds"),
    "vc-closed": ("closed vocal cords during phonation", "adducted vocal folds"),
    "throat": ("throat", "oropharynx"),
}

# Grids searched on validation data (project's choice): joint weight 0 = text only, 1 = image only;
# softmax temperatures around CLIP's 0.01 (logit scale 100).
PROTOTYPE_WEIGHT_GRID: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
PROTOTYPE_TEMPERATURE_GRID: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
# Region-agreement re-ranking boosts tried (cosine units; 0 = no re-ranking).
RERANK_BETA_GRID: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


# ---------------------------------------------------------------------------------------------
# 6.2 BiomedCLIP loading
# ---------------------------------------------------------------------------------------------

def load_clip(
    name: str = BIOMEDCLIP_HUB_ID,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Load an open_clip model in eval mode on `device`: returns (model, preprocess, tokenizer).

    name: `hf-hub:<repo>` (downloads, or the HF cache when offline); `local-dir:<folder>` holding
    open_clip_config.json + open_clip_pytorch_model.bin (a Kaggle dataset, internet off): a BERT text
    tower is resolved to a local folder first (see resolve_local_clip_dir); or `tiny`: a random
    TINY_CLIP_CFG model built offline from `seed`, for tests. cache_dir: hub download cache and the
    place for the offline copy of a local-dir config (default: the system temp folder).
    """
    device = torch.device(device)
    if name == "tiny":
        model, preprocess, tokenizer = build_tiny_clip(seed)
    elif name.startswith("local-dir:"):
        staging_root = Path(cache_dir or tempfile.gettempdir()) / "entrep_open_clip_local"
        folder = resolve_local_clip_dir(Path(name[len("local-dir:"):]), staging_root)
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}", device="cpu")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    elif name.startswith("hf-hub:"):
        cache = None if cache_dir is None else str(cache_dir)
        model, preprocess = open_clip.create_model_from_pretrained(name, device="cpu", cache_dir=cache)
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cache)
    else:
        raise ValueError(
            f"Unknown CLIP name {name!r}: use 'hf-hub:<org>/<repo>' (e.g. {BIOMEDCLIP_HUB_ID}), "
            "'local-dir:<folder with open_clip_config.json + weights>' or 'tiny'."
        )
    return model.to(device).eval(), preprocess, tokenizer


def build_tiny_clip(seed: int = 0) -> tuple[torch.nn.Module, Callable, Callable]:
    """A small random open_clip CLIP (TINY_CLIP_CFG), its eval preprocess and SimpleTokenizer.

    Weights depend only on `seed` (drawn inside a forked RNG: the global RNG is left untouched).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CFG)
    pp_cfg = PreprocessCfg(size=TINY_CLIP_CFG["vision_cfg"]["image_size"])
    open_clip.set_model_preprocess_cfg(model, asdict(pp_cfg))
    preprocess = image_transform_v2(pp_cfg, is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
    return model, preprocess, tokenizer


def resolve_local_clip_dir(model_dir: Path, staging_root: Path) -> Path:
    """A folder open_clip's `local-dir:` can load with no network access.

    open_clip builds a Hugging Face text tower from `text_cfg.hf_model_name` (a hub id: network) and
    reads the tokenizer from the local-dir itself. When the config names such a tower, this finds a
    local folder holding its config.json + vocab.txt/tokenizer.json (find_text_tower_dir) and writes
    an offline copy under `staging_root`: the config rewritten to that folder, plus links to the
    weights and tokenizer files. `model_dir` is never modified (it may be read-only).
    """
    config_path = model_dir / "open_clip_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: a local-dir: folder needs open_clip_config.json and "
            "open_clip_pytorch_model.bin from the hub repo of the model (e.g. "
            f"{BIOMEDCLIP_HUB_ID[len('hf-hub:'):]})."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return model_dir  # open_clip's own text tower: nothing to fetch
    text_dir = find_text_tower_dir(model_dir, text_cfg["hf_model_name"])
    if text_dir is None:
        hub_id = text_cfg["hf_model_name"]
        raise FileNotFoundError(
            f"{model_dir}: the text tower {hub_id!r} needs its BERT config.json and vocab.txt offline. "
            f"Download them from https://huggingface.co/{hub_id} and put them in a sub-folder, e.g. "
            f"{model_dir / Path(hub_id).name}/config.json and .../vocab.txt (or set text_cfg."
            "hf_model_name in open_clip_config.json to a folder holding them)."
        )
    checkpoint = find_clip_checkpoint(model_dir)
    identity = f"{model_dir.resolve()}|{text_dir.resolve()}|{config_path.read_text(encoding='utf-8')}"
    key = hashlib.sha1(identity.encode()).hexdigest()
    staged = staging_root / f"{model_dir.name}-{key[:12]}"
    shutil.rmtree(staged, ignore_errors=True)  # no stale links from an earlier layout
    staged.mkdir(parents=True)
    local_text = str(text_dir.resolve())
    text_cfg = {**text_cfg, "hf_model_name": local_text, "hf_tokenizer_name": local_text}
    config["model_cfg"] = {**config["model_cfg"], "text_cfg": text_cfg}
    _write_text_atomic(staged / "open_clip_config.json", json.dumps(config, indent=2))
    _link_or_copy(checkpoint, staged / checkpoint.name)
    for file_name in HF_TEXT_FILES:
        if (text_dir / file_name).is_file():
            _link_or_copy(text_dir / file_name, staged / file_name)
    return staged


def find_text_tower_dir(model_dir: Path, hf_model_name: str) -> Path | None:
    """The local folder holding the HF text tower's config.json + vocab.txt/tokenizer.json, or None.

    Looked for, in order: `hf_model_name` as a path, `model_dir/<hf_model_name>`,
    `model_dir/<repo name>`, `model_dir` itself, any direct sub-folder of `model_dir`, and the
    Hugging Face cache (a copy downloaded earlier; read without network).
    """
    repo_name = Path(hf_model_name).name
    candidates = [Path(hf_model_name), model_dir / hf_model_name, model_dir / repo_name, model_dir]
    candidates += sorted(p for p in model_dir.iterdir() if p.is_dir())
    for folder in candidates:
        if _is_hf_text_dir(folder):
            return folder
    if re.fullmatch(r"[\w.-]+/[\w.-]+", hf_model_name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hf_model_name, "config.json")
        if isinstance(cached, str) and _is_hf_text_dir(Path(cached).parent):
            return Path(cached).parent
    return None


def _is_hf_text_dir(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        return False
    try:
        return "model_type" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def find_clip_checkpoint(model_dir: Path) -> Path:
    """The open_clip weights file in `model_dir` (CLIP_CHECKPOINT_NAMES first, else the only one)."""
    for file_name in CLIP_CHECKPOINT_NAMES:
        if (model_dir / file_name).is_file():
            return model_dir / file_name
    others = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in model_dir.glob(ext))
    if len(others) == 1:
        return others[0]
    raise FileNotFoundError(
        f"{model_dir}: expected one open_clip weights file ({', '.join(CLIP_CHECKPOINT_NAMES)}), found "
        f"{[p.name for p in others]}. Copy open_clip_pytorch_model.bin from the model's hub repo there."
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    """Symlink `dst` -> `src` (replacing `dst`); copy where symlinks are not allowed."""
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then os.replace it: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# 6.3 Embeddings and their cache
# ---------------------------------------------------------------------------------------------

class ImagePathDataset(Dataset):
    """Images decoded with utils.load_rgb and passed through `preprocess` (a CLIP transform)."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Callable):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_rgb(self.paths[i]))



def transform_id(transform: Callable | None) -> str:
    """A preprocessing pipeline's repr without memory addresses: part of every cache key, so
    changed preprocessing never reuses rows computed with the old one."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def model_identity(model: torch.nn.Module, preprocess: Callable | None = None, n_samples: int = 64) -> str:
    """Identity of a model + preprocessing for caches: SHA-1 of every tensor's name, shape, dtype and
    `n_samples` evenly spaced values, plus the preprocess repr (memory addresses removed).

    A change that touches none of the sampled values (e.g. one weight) is not seen: pass
    model_id yourself (e.g. a checkpoint's file_sha1) when that matters.
    """
    h = hashlib.sha1(transform_id(preprocess).encode())
    for key, tensor in model.state_dict().items():
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            idx = torch.linspace(0, flat.numel() - 1, min(n_samples, flat.numel()), device=flat.device).long()
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


def encode_batches(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Run `encode` on each input batch under inference_mode (+ autocast): [N, D] float32 unit rows
    on the CPU. Rows stay on `device` until the end (N x D floats) and come back in one copy, so a
    GPU is never stalled by a per-batch sync while the next batch is queued."""
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for x in batches:
            feats = encode(x.to(device, non_blocking=True))
            out.append(F.normalize(feats.float(), dim=-1))  # (B, D) on device
    return torch.cat(out).cpu() if out else torch.empty(0, 0)


def embed_images(
    model: torch.nn.Module,
    preprocess: Callable,
    paths: Sequence[str | os.PathLike],
    device: str | torch.device,
    batch_size: int = 64,
    num_workers: int | None = None,
    amp_dtype: str | torch.dtype | None = "auto",
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """CLIP image embeddings [N, D] (float32, L2-normalised, CPU), in the order of `paths`.

    With `cache_dir`, embeddings are stored per file content (utils.file_sha1) in one safetensors
    file per model identity (model_id, default model_identity(model)) + preprocess + amp dtype: a
    rerun encodes nothing, a changed file re-encodes only that file, another model gets its own file.
    num_workers: DataLoader workers (default min(4, CPUs)).
    """
    device = torch.device(device)
    amp = resolve_amp_dtype(amp_dtype, device)
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers

    def encode_paths(todo: Sequence[str | os.PathLike]) -> torch.Tensor:
        loader = DataLoader(
            ImagePathDataset(todo, preprocess), batch_size=batch_size, num_workers=workers,
            pin_memory=device.type == "cuda", shuffle=False,
        )
        batches = tqdm(loader, desc="CLIP images", disable=not progress or not todo)
        return encode_batches(model.encode_image, batches, device, amp)

    if cache_dir is None:
        return encode_paths(paths)
    key = hashlib.sha1(f"{model_id or model_identity(model)}|{transform_id(preprocess)}|{amp}".encode()).hexdigest()
    return cached_rows(paths, encode_paths, Path(cache_dir) / f"clip_image_feats_{key[:20]}.safetensors", key)


def cached_rows(
    paths: Sequence[str | os.PathLike],
    compute: Callable[[list], torch.Tensor],
    cache_path: Path,
    key: str,
) -> torch.Tensor:
    """Rows [N, D] for `paths`, kept per file content (file_sha1) in the safetensors cache at
    `cache_path`, made under `key` (the identity of whatever computes them). Rows already there are
    read; `compute(paths) -> [M, D]` runs once per new content and the cache is rewritten
    atomically. A cache made under another key, truncated or edited is reported and rebuilt."""
    sha1s = [file_sha1(p) for p in paths]
    cached = load_feature_cache(cache_path, key)
    todo = {s: p for s, p in zip(sha1s, paths) if s not in cached}  # one path per new content
    if todo:
        new = compute(list(todo.values()))  # (M, D)
        cached.update(zip(todo, new))
        save_feature_cache(cache_path, key, cached)
    return torch.stack([cached[s] for s in sha1s]) if sha1s else torch.empty(0, 0)


def load_feature_cache(path: Path, key: str) -> dict[str, torch.Tensor]:
    """{content sha1: [D] embedding} from a cache file, or {} when absent; a truncated, corrupt or
    foreign file is reported with a warning and treated as empty (it is rebuilt on save)."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            feats = f.get_tensor("feats")
        sha1s = json.loads(meta["sha1s"])
        if meta.get("key") != key or feats.ndim != 2 or len(sha1s) != feats.shape[0]:
            raise ValueError("key or shapes do not match")
        if meta.get("sha256") != _tensor_digest(feats, sha1s):
            raise ValueError("content digest does not match (edited or damaged)")
        if not torch.isfinite(feats).all():
            raise ValueError("non-finite values")
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        warnings.warn(f"{path}: unreadable cache ({type(e).__name__}: {e}); rebuilding it.")
        return {}
    return dict(zip(sha1s, feats.float()))


def _tensor_digest(feats: torch.Tensor, sha1s: Sequence[str]) -> str:
    """SHA-256 over an embedding table's float32 bytes and its row keys: detects edited caches."""
    h = hashlib.sha256(json.dumps(list(sha1s)).encode())
    h.update(feats.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_feature_cache(path: Path, key: str, feats: Mapping[str, torch.Tensor]) -> None:
    """Write {sha1: embedding} as safetensors atomically (temp file in the same folder + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    table = torch.stack(list(feats.values())).float().contiguous()
    meta = {"key": key, "sha1s": json.dumps(list(feats)), "format": "entrep-row-cache-2",
            "sha256": _tensor_digest(table, list(feats))}
    save_file({"feats": table}, tmp, metadata=meta)
    os.replace(tmp, path)


def embed_texts(
    model: torch.nn.Module,
    tokenizer: Callable,
    texts: Sequence[str],
    device: str | torch.device,
    batch_size: int = 256,
    amp_dtype: str | torch.dtype | None = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """CLIP text embeddings [T, D] (float32, L2-normalised, CPU), in the order of `texts`. Not cached:
    a few hundred prompts take seconds."""
    device = torch.device(device)
    tokens = tokenizer(list(texts))  # (T, context_length)
    batches = tqdm(torch.split(tokens, batch_size), desc="CLIP texts", disable=not progress)
    return encode_batches(model.encode_text, batches, device, resolve_amp_dtype(amp_dtype, device))


# ---------------------------------------------------------------------------------------------
# 6.4 Prototypes and the prototype classifier
# ---------------------------------------------------------------------------------------------


def build_class_prompts(
    class_names: Sequence[str],
    class_texts: Mapping[str, Sequence[str]],
    templates: Sequence[str] = PROMPT_TEMPLATES,
) -> dict[str, list[str]]:
    """{class: every template filled with every wording of the class}, in `class_names` order."""
    return {c: [t.format(text) for text in class_texts[c] for t in templates] for c in class_names}


def add_description_prompts(
    prompts: Mapping[str, Sequence[str]],
    labels: Sequence[str],
    descriptions: Sequence[str],
    label_map: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Add the data's English finding lines (DescriptionEN) to their class's prompts, deduplicated.

    labels[i] is the label string of descriptions[i]; label_map maps it to the prompt class (e.g.
    utils.LABEL_TO_COARSE for the coarse level). Labels outside `prompts` are ignored. Use training
    descriptions only: validation text would leak into the prototypes.
    """
    out = {c: list(p) for c, p in prompts.items()}
    for label, text in zip(labels, descriptions):
        cls = label_map.get(label, label) if label_map else label
        if cls in out:
            out[cls] += [line for line in split_finding_lines(text) if line not in out[cls]]
    return out


def image_prototypes(
    feats: torch.Tensor, labels: Sequence[int] | torch.Tensor, n_classes: int, allow_empty: bool = False
) -> torch.Tensor:
    """Normalised class means of unit features: [N, D], labels [N] in 0..C-1 -> [C, D].

    A class with no sample raises ValueError; with allow_empty=True its row is all zeros instead (its
    logit is 0 for every image, and joint_prototypes then falls back to its text prototype).
    """
    labels = labels.long() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.array(labels), dtype=torch.long)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must be class ids 0..{n_classes - 1}; got {labels.min()}..{labels.max()}.")
    onehot = F.one_hot(labels, n_classes).to(feats.dtype)  # (N, C)
    sums = onehot.T @ feats  # (C, D)
    empty = torch.nonzero(onehot.sum(0) == 0).flatten().tolist()
    if empty and not allow_empty:
        raise ValueError(
            f"No samples for class ids {empty}: pass allow_empty=True for zero prototypes, or merge/drop "
            "those classes."
        )
    return F.normalize(sums, dim=-1)  # zero rows stay zero


def text_prototypes(
    model: torch.nn.Module,
    tokenizer: Callable,
    class_prompts: Mapping[str, Sequence[str]],
    device: str | torch.device,
    class_names: Sequence[str] | None = None,
    amp_dtype: str | torch.dtype | None = "auto",
) -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised prompt embeddings, renormalised (CLIP prompt
    ensembling). Rows follow `class_names` (default: the dict's order)."""
    names = list(class_prompts) if class_names is None else list(class_names)
    if empty := [c for c in names if not class_prompts.get(c)]:
        raise ValueError(f"No prompts for classes {empty}: give each class at least one prompt.")
    texts = [p for c in names for p in class_prompts[c]]
    feats = embed_texts(model, tokenizer, texts, device, amp_dtype=amp_dtype)  # (T, D)
    owner = torch.tensor([i for i, c in enumerate(names) for _ in class_prompts[c]])
    return image_prototypes(feats, owner, len(names))  # same normalised-mean rule


def joint_prototypes(img_protos: torch.Tensor, txt_protos: torch.Tensor, weight: float) -> torch.Tensor:
    """The paper's joint vision-language prototypes: normalise(weight*image + (1-weight)*text), [C, D].
    weight 1 = image prototypes only, 0 = text prototypes only."""
    return F.normalize(weight * img_protos + (1.0 - weight) * txt_protos, dim=-1)


def prototype_logits(feats: torch.Tensor, protos: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """scale * cosine similarity: [N, D] x [C, D] -> [N, C]."""
    return scale * feats @ protos.T  # (N, C)


def prototype_classify(feats: torch.Tensor, protos: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Class probabilities [N, C] = softmax(cosine / temperature)."""
    return prototype_logits(feats, protos, 1.0 / temperature).softmax(dim=-1)  # (N, C)


def prototype_confidence(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [N] = top probability, margin [N] = top minus second probability)."""
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values  # (N, 2)
    second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros_like(top2[:, 0])
    return top2[:, 0], top2[:, 0] - second


@dataclass(frozen=True)
class PrototypeChoice:
    """Joint weight and temperature chosen on validation data, with the whole grid's scores."""

    weight: float
    temperature: float
    table: pd.DataFrame  # one row per (weight, temperature): accuracy, macro_f1, log_loss


def choose_prototype_weight(
    feats: torch.Tensor,
    labels: Sequence[int],
    img_protos: torch.Tensor,
    txt_protos: torch.Tensor,
    weights: Sequence[float] = PROTOTYPE_WEIGHT_GRID,
    temperatures: Sequence[float] = PROTOTYPE_TEMPERATURE_GRID,
) -> PrototypeChoice:
    """Pick the joint weight by validation macro F1 (first best in grid order), then the temperature
    by validation log loss at that weight (the temperature never changes the argmax, only the
    confidence the hybrid rule thresholds). Give it validation data; img_protos from training data."""
    labels = np.asarray(labels)
    n_classes = img_protos.shape[0]
    rows = []
    for w in weights:
        cosine = prototype_logits(feats.double(), joint_prototypes(img_protos, txt_protos, w).double(), 1.0)
        cosine = cosine.numpy()  # (N, C); numpy below: no torch/BLAS thread hand-offs in the loop
        pred = cosine.argmax(1)  # the same for every temperature
        accuracy = float((pred == labels).mean())
        macro_f1 = f1_score(labels, pred, labels=range(n_classes), average="macro", zero_division=0)
        for t in temperatures:
            probs = softmax(cosine / t, axis=1)  # = prototype_classify(feats, protos, t)
            rows.append({"weight": float(w), "temperature": float(t), "accuracy": accuracy,
                         "macro_f1": macro_f1, "log_loss": log_loss(labels, probs, labels=range(n_classes))})
    table = pd.DataFrame(rows)
    best_w = table.loc[table["macro_f1"].idxmax(), "weight"]
    at_w = table[table["weight"] == best_w]
    best_t = at_w.loc[at_w["log_loss"].idxmin(), "temperature"]
    return PrototypeChoice(float(best_w), float(best_t), table)



@dataclass(frozen=True)
class PrototypeClassifier:
    """Joint vision-language prototypes [C, D] with the temperature and weight chosen on validation."""

    class_names: tuple[str, ...]
    protos: torch.Tensor  # (C, D) unit rows
    temperature: float
    weight: float  # joint weight: 1 = image prototypes only, 0 = text prototypes only
    with_descriptions: bool  # whether the data's English descriptions joined the class prompts
    table: pd.DataFrame  # the validation grid behind the choice

    def predict_proba(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C) class probabilities of unit features [N, D]."""
        return prototype_classify(feats, self.protos, self.temperature)


def fit_prototype_classifier(
    model: torch.nn.Module, tokenizer: Callable, device: torch.device | str,
    train_feats: torch.Tensor, train_y: Sequence[int], val_feats: torch.Tensor, val_y: Sequence[int],
    class_names: Sequence[str], class_texts: Mapping[str, Sequence[str]],
    train_labels: Sequence[str] = (), train_descriptions: Sequence[str] = (),
    label_map: Mapping[str, str] | None = None,
) -> PrototypeClassifier:
    """The paper's prototype classifier at one level (coarse or fine).

    Image prototypes are class means of training embeddings; text prototypes come from the prompt
    templates, with and without the training images' English descriptions (`train_labels[i]` is
    the label string of `train_descriptions[i]`, mapped by `label_map`); the joint weight, the
    temperature and whether descriptions help are all chosen on validation (macro F1).
    """
    img = image_prototypes(train_feats, train_y, len(class_names), allow_empty=True)
    base = build_class_prompts(class_names, class_texts)
    candidates = {False: base}
    if any(d.strip() for d in train_descriptions):
        candidates[True] = add_description_prompts(base, train_labels, train_descriptions, label_map)
    best = None
    for with_desc, prompts in candidates.items():
        txt = text_prototypes(model, tokenizer, prompts, device, class_names=list(class_names))
        choice = choose_prototype_weight(val_feats, val_y, img, txt)
        score = choice.table["macro_f1"].max()
        if best is None or score > best[0]:
            best = (score, with_desc, txt, choice)
    _, with_desc, txt, choice = best
    return PrototypeClassifier(tuple(class_names), joint_prototypes(img, txt, choice.weight), choice.temperature,
                               choice.weight, with_desc, choice.table)


def take(feats: torch.Tensor, index: Mapping[str, int], paths: Iterable[str]) -> torch.Tensor:
    """Rows of a feature table [N, D] for `paths`, through a {path: row} index: [len(paths), D]."""
    return feats[[index[str(p)] for p in paths]]

# =============================================================================================
# 7. DINOv2 (SurgeNet) fine-tuning
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 7.1 Constants
# ---------------------------------------------------------------------------------------------

# The paper's backbone: DINOv2 ViT-B/14 with 4 registers, pretrained on SurgeNetXL at 336 px
# (SurgeNetDINO release, ENTREP.md "Weights"). Any timm `vit_*_patch14_reg4_dinov2` name works.
DINO_MODEL_NAME: str = "vit_base_patch14_reg4_dinov2"

# `build_dino("tiny")`: a small random ViT of the same family (patch 14, 4 registers, layer
# scale, no pos-embed for prefix tokens) for offline tests and the demo run; never a real result.
DINO_TINY_ARCH: str = "vit_small_patch14_reg4_dinov2"
# init_values=1.0: DINOv2's LayerScale starts at 1e-5, which leaves a random tiny model's CLS token
# nearly the same for every image; at 1.0 the demo's tiny model learns within seconds.
DINO_TINY_KWARGS: Mapping[str, float] = {"embed_dim": 96, "depth": 3, "num_heads": 3, "init_values": 1.0}

# Outer wrappers and key prefixes of DINO checkpoints: DINOv2 training saves {"teacher":
# {"backbone.*", "dino_head.*"}}, generic trainers {"model": ...} / {"state_dict": ...}, DDP
# "module.", torch.compile "_orig_mod.". Unwrapped in this order.
CHECKPOINT_WRAPPER_KEYS: tuple[str, ...] = ("teacher", "model", "state_dict", "module")
CHECKPOINT_KEY_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "backbone.")
# Checkpoint entries that are not part of the backbone (DINO/iBOT projection heads, a classifier).
IGNORED_CHECKPOINT_PREFIXES: tuple[str, ...] = ("head.", "dino_head.", "ibot_head.")

# Training augmentation (applied to the cached square image). The crop keeps >= 70% of the
# field of view so the anatomy that decides the region stays in frame; rotation of +-15 deg mimics
# scope roll; black fill matches the endoscope background. Horizontal flip is done by
# FlipSwapDataset (with the label swap), never by timm (hflip=0).
DINO_TRAIN_AUGMENT: Mapping[str, object] = {
    "scale": (0.7, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "rotate_degrees": 15.0,
    "color_jitter": 0.2,
}
# Training images are cached a bit larger than the input so random crops keep native detail.
TRAIN_CACHE_SCALE: float = 1.15

# ---------------------------------------------------------------------------------------------
# 7.2 Backbone
# ---------------------------------------------------------------------------------------------


def build_dino(
    model_name: str = DINO_MODEL_NAME,
    weights: str | os.PathLike = "",
    image_size: int = 224,
    device: "torch.device | str | None" = None,
    seed: int = 0,
) -> nn.Module:
    """A timm DINOv2 ViT backbone (no classifier, forward -> (B, D) CLS features).

    `weights`: a SurgeNet(DINO) `.pth` path or URL, loaded with `load_dino_weights` (timm's own
    DINOv2 key conversion, registers kept, position embedding resampled to `image_size`, every
    backbone key checked). Empty -> no SurgeNet: timm's own pretrained DINOv2 weights (LVD-142M,
    downloaded from the hub, so internet is needed). "random" -> random init (smoke tests only).
    `model_name="tiny"` builds a small random ViT offline (seeded by `seed`) and ignores `weights`.
    `image_size` must be a multiple of the patch size (14).
    """
    if model_name == "tiny":
        with torch.random.fork_rng(devices=[]):  # same tiny model every call, global RNG untouched
            torch.default_generator.manual_seed(seed)
            model = timm.create_model(
                DINO_TINY_ARCH, pretrained=False, img_size=image_size, num_classes=0, **DINO_TINY_KWARGS
            )
    else:
        model = _create_timm_backbone(model_name, pretrained=not weights, image_size=image_size)
    patch = model.patch_embed.patch_size[0]
    if image_size % patch:
        raise ValueError(
            f"image_size={image_size} is not a multiple of {model_name}'s patch size {patch}; "
            f"use e.g. {patch * round(image_size / patch)} (224 and 336 are multiples of 14)."
        )
    if model_name != "tiny" and weights == "random":
        warnings.warn(f"build_dino({model_name!r}, weights='random'): the backbone is random (smoke tests only).")
    elif model_name != "tiny" and weights:
        load_dino_weights(model, weights)
    return model.to(device) if device is not None else model


def _create_timm_backbone(model_name: str, pretrained: bool, image_size: int) -> nn.Module:
    """timm.create_model without a classifier; a failed hub download says what to do instead."""
    try:
        return timm.create_model(model_name, pretrained=pretrained, img_size=image_size, num_classes=0)
    except (OSError, RuntimeError) as e:  # huggingface_hub raises OSError subclasses when offline
        if not pretrained:
            raise
        raise RuntimeError(
            f"Could not download timm's pretrained weights for {model_name!r} ({type(e).__name__}: {e}). "
            "Turn internet on, set dino_weights to a local SurgeNet .pth, or dino_weights='random' for a smoke test."
        ) from e


def read_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.pth/.pt via torch.load(weights_only=True), .safetensors) or
    URL (downloaded once into the torch hub cache), unwrapped by `unwrap_state_dict`."""
    source = os.fspath(source)
    if urlparse(source).scheme in ("http", "https"):
        name = os.path.basename(urlparse(source).path)
        obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True, file_name=name)
    elif not os.path.isfile(source):
        raise FileNotFoundError(
            f"DINOv2 weights not found: {source}. Download e.g. DINOv2_ViTb14_size336_SurgeNetXL.pth "
            "(SurgeNetDINO release) and pass its path, or use model_name='tiny' for a smoke test."
        )
    elif source.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(source)
    else:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Strip CHECKPOINT_WRAPPER_KEYS dicts and CHECKPOINT_KEY_PREFIXES (keeping only prefixed keys,
    e.g. a DINO teacher's "backbone.*" and not its "dino_head.*")."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in CHECKPOINT_WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    state = dict(obj)
    for prefix in CHECKPOINT_KEY_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_dino_weights(model: VisionTransformer, weights: str | os.PathLike | Mapping) -> None:
    """Load DINOv2-format weights into a timm ViT, in place, and fail loudly unless every key fits.

    Same steps as `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`
    in timm 1.0.x (`_builder.load_pretrained`): `checkpoint_filter_fn` -> `_convert_dinov2` drops
    `mask_token`, maps `register_tokens` -> `reg_token`, folds the CLS position into `cls_token`
    (cls + pos_embed[:, 0]) and keeps `pos_embed[:, 1:]`, which is then resampled (bicubic) to the
    model's grid (24x24 at 336 px -> 16x16 at 224 px). timm only logs missing keys when loading is
    not strict, so the load result is checked here: no backbone key may be missing, and only
    DINO/iBOT head entries may be left over. A plain (no-register) model asked to load a
    register checkpoint, or the reverse, is refused before timm tries.
    """
    where = weights if isinstance(weights, (str, os.PathLike)) else "the given state dict"
    state = read_state_dict(weights) if isinstance(weights, (str, os.PathLike)) else unwrap_state_dict(weights)
    ckpt_regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    original_format = "mask_token" in state or "register_tokens" in state  # DINOv2 release keys
    if original_format and ckpt_regs != model.num_reg_tokens:
        raise ValueError(
            f"{where} has {ckpt_regs} register tokens but the model has {model.num_reg_tokens}; "
            "registers would be silently dropped or left random. Use a matching timm name: "
            "vit_{small,base,large}_patch14_reg4_dinov2 for SurgeNet/DINOv2-reg4 weights, "
            "vit_*_patch14_dinov2 for weights without registers."
        )
    try:
        result = model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=False)
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatches raise even when not strict
        raise ValueError(
            f"{where} does not fit {type(model).__name__} (embed_dim {model.embed_dim}, "
            f"{model.num_reg_tokens} registers): use the timm name of the checkpoint's size (ViT-S/B/L) "
            f"and register count. timm said: {str(e)[:500]}"
        ) from e
    unexpected = [k for k in result.unexpected_keys if not k.startswith(IGNORED_CHECKPOINT_PREFIXES)]
    if result.missing_keys or unexpected:
        raise ValueError(
            f"{where} does not fit the backbone: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}. Use the "
            "DINOv2 backbone checkpoint (keys cls_token, register_tokens, pos_embed, blocks.N.*, norm.*) "
            "with the timm name of the same size (ViT-S/B/L) and register count."
        )


def dino_image_size(model: nn.Module) -> int:
    """Input side length (px) a timm ViT backbone, or an ENTRepNet around one, was built for."""
    return int(getattr(model, "backbone", model).patch_embed.img_size[0])


def dino_transforms(
    model: nn.Module, image_size: int, train: bool, augment: Mapping[str, object] | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """The backbone's own preprocessing (timm resolve_model_data_config + create_transform: mean/std
    and interpolation from its pretrained_cfg) at `image_size`, PIL -> (3, S, S) float.

    Eval: resize + centre crop (crop_pct 1.0 for DINOv2). Train: random rotation, then timm's
    random-resized-crop + colour jitter with hflip=0 (FlipSwapDataset flips and swaps labels).
    """
    augment = DINO_TRAIN_AUGMENT if augment is None else augment
    backbone = getattr(model, "backbone", model)
    cfg = timm.data.resolve_model_data_config(backbone, args={"input_size": (3, image_size, image_size)})
    if not train:
        return timm.data.create_transform(**cfg, is_training=False)
    timm_train = timm.data.create_transform(
        **cfg,
        is_training=True,
        hflip=0.0,
        scale=tuple(augment["scale"]),
        ratio=tuple(augment["ratio"]),
        color_jitter=augment["color_jitter"],
    )
    rotate = T.RandomRotation(augment["rotate_degrees"], interpolation=T.InterpolationMode.BILINEAR, fill=0)
    return T.Compose([rotate, timm_train])


# ---------------------------------------------------------------------------------------------
# 7.3 Heads and loss
# ---------------------------------------------------------------------------------------------


class ENTRepNet(nn.Module):
    """One shared backbone, four linear heads (the paper's coarse classifier + three binary ones).

    forward(x (B, 3, S, S)) -> {"coarse": (B, 4) in COARSE_CLASSES order,
    "ear"/"nose"/"vc": (B, 2) logits over FINE_TASKS[task] (index 1 = "second label")}.
    Heads are initialised from `init_seed` (trunc-normal 0.02, zero bias), so the same backbone
    always gives the same model (needed for the run hash in `train_dino`).
    """

    def __init__(self, backbone: nn.Module, init_seed: int = 0):
        super().__init__()
        self.backbone = backbone
        sizes = {"coarse": len(COARSE_CLASSES), **{task: len(pair) for task, pair in FINE_TASKS.items()}}
        self.heads = nn.ModuleDict({name: nn.Linear(backbone.num_features, k) for name, k in sizes.items()})
        generator = torch.Generator().manual_seed(init_seed)
        for head in self.heads.values():
            nn.init.trunc_normal_(head.weight, std=0.02, generator=generator)
            nn.init.zeros_(head.bias)
        self.heads.to(next(backbone.parameters()).device)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)  # (B, D)
        return {name: head(feats) for name, head in self.heads.items()}


def region_targets(labels7: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Official label ids (B,) -> coarse ids (B,) and, per fine task, (mask (B,) bool: sample is of
    that region, binary target (B,): index in FINE_TASKS[task], -1 outside the region)."""
    device = labels7.device
    coarse = torch.tensor(LABEL_ID_TO_COARSE_ID, device=device)[labels7]
    fine = {}
    for task, pair in FINE_TASKS.items():
        target_of = torch.tensor([pair.index(name) if name in pair else -1 for name in LABELS], device=device)
        fine[task] = (coarse == COARSE_TO_ID[task], target_of[labels7])
    return coarse, fine


def multitask_loss(
    outputs: Mapping[str, torch.Tensor],
    labels7: torch.Tensor,
    class_weights: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Coarse CE over the batch + for each fine task the CE over only that region's samples.

    An ear image adds nothing to the nose / vc terms; a term whose region is absent from the batch
    is 0 (as `logits.sum() * 0`, so the graph stays whole). `class_weights` (from
    `class_weights_from_labels`) weight each CE by class; weighted means as in F.cross_entropy.
    """
    weights = class_weights or {}
    coarse, fine = region_targets(labels7)
    loss = F.cross_entropy(outputs["coarse"].float(), coarse, weight=weights.get("coarse"))
    for task, (mask, target) in fine.items():
        logits = outputs[task].float()
        if mask.any():
            loss = loss + F.cross_entropy(logits[mask], target[mask], weight=weights.get(task))
        else:
            loss = loss + logits.sum() * 0.0
    return loss


def class_weights_from_labels(label_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """Class-imbalance weights per head from training label ids: sklearn's "balanced" rule
    n_samples / (n_classes * count_c) over the classes of that head (coarse: 4 regions; fine task:
    its 2 labels among that region's samples). A class absent from training gets weight 1.

    Chosen over a balanced sampler: the data order stays a plain (seed, epoch) permutation, so
    resume is exact, and each epoch still sees every image once.
    """
    labels = torch.as_tensor(list(label_ids), dtype=torch.long)
    coarse, fine = region_targets(labels)
    groups = {"coarse": (coarse, len(COARSE_CLASSES))}
    groups.update({task: (target[mask], 2) for task, (mask, target) in fine.items()})
    weights = {}
    for name, (y, k) in groups.items():
        counts = torch.bincount(y, minlength=k).double()
        balanced = len(y) / (max(int((counts > 0).sum()), 1) * counts.clamp(min=1))
        weights[name] = torch.where(counts > 0, balanced, torch.ones_like(balanced)).float()
    return weights


# ---------------------------------------------------------------------------------------------
# 7.4 Data pipeline
# ---------------------------------------------------------------------------------------------


def decode_square(path: str | os.PathLike, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Decode (utils.load_rgb), take the centre square (the endoscope's circular field of view is
    about the frame height, centred: the side bars are black) and resize -> uint8 (3, size, size).
    Same geometry as timm's eval transform at crop_pct 1.0 (resize shorter side + centre crop)."""
    resample = timm.data.str_to_pil_interp(interpolation)
    im = ImageOps.fit(load_rgb(path), (size, size), method=resample)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_square_images(
    paths: Sequence[str | os.PathLike],
    size: int,
    interpolation: str = "bicubic",
    num_threads: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Decode every image once -> one uint8 tensor (N, 3, size, size) held in memory.

    PIL releases the GIL while decoding, so a thread pool scales with cores. ~0.2 MB per image at
    256 px, ~0.44 MB at 384 px (1,857 ENTRep images at 384 px: ~0.8 GB).
    """
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    num_threads = num_threads or min(8, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        decoded = pool.map(partial(decode_square, size=size, interpolation=interpolation), paths)
        for i, image in enumerate(tqdm(decoded, total=len(paths), desc=f"decode {size}px", disable=not progress)):
            out[i] = image
    return out


def flip_label_id(label_id: int) -> int:
    """Official id of the mirrored image's label (ear/nose left <-> right; vc, throat unchanged).
    -1 (unlabelled) stays -1."""
    return label_id if label_id < 0 else LABEL_TO_ID[FLIP_LABEL[LABELS[label_id]]]


@contextlib.contextmanager
def seeded_rng(seed: int | None) -> Iterator[None]:
    """Run the block with the CPU torch and python `random` RNGs seeded by `seed`, restoring both
    afterwards (timm/torchvision transforms draw from those globals). None: leave them alone."""
    if seed is None:
        yield
        return
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class FlipSwapDataset(Dataset):
    """Images + official label ids, decoded once into a uint8 cache, with horizontal flip WITH
    label swap (utils.FLIP_LABEL: ear/nose left <-> right, vc state and throat unchanged).

    `transform`: PIL -> tensor (`dino_transforms`). `cache_size`: side of the cached square (a bit
    over the input size for training, `train_cache_size`). `flip_p`: flip probability (0 for eval).
    Item key: an index, or (index, seed) as yielded by EpochSampler, in which case the flip and all
    transform randomness come from `seed` alone (same sample whatever the worker count).
    Returns (image (3, S, S) float, label id; -1 when `label_ids` is None).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        label_ids: Sequence[int] | None,
        transform: Callable[[Image.Image], torch.Tensor],
        cache_size: int,
        flip_p: float = 0.0,
        interpolation: str = "bicubic",
        num_threads: int | None = None,
        progress: bool = True,
    ):
        self.label_ids = [int(y) for y in label_ids] if label_ids is not None else [-1] * len(paths)
        if len(self.label_ids) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(self.label_ids)} labels; pass one label id per image.")
        self.images = decode_square_images(paths, cache_size, interpolation, num_threads, progress)  # (N,3,C,C)
        self.transform = transform
        self.flip_p = flip_p

    def __len__(self) -> int:
        return len(self.label_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.images[index], self.label_ids[index]  # (3, C, C) uint8
        with seeded_rng(seed):
            if self.flip_p > 0 and torch.rand(()) < self.flip_p:
                image, label = image.flip(-1), flip_label_id(label)
            x = self.transform(Image.fromarray(image.permute(1, 2, 0).numpy()))
        return x, label


def train_cache_size(image_size: int) -> int:
    """Side of the cached training square: TRAIN_CACHE_SCALE over the input size."""
    return math.ceil(image_size * TRAIN_CACHE_SCALE)


def epoch_shard(
    n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
) -> list[tuple[int, int]]:
    """(index, sample_seed) pairs that process `rank` of `world_size` trains on in `epoch`.

    The epoch's permutation of range(n) and the per-sample seeds are a pure function of
    (seed, epoch). For DDP the list is padded by wrapping round to a multiple of `world_size`
    (as torch's DistributedSampler does), then rank r takes every world_size-th pair from r on:
    every rank gets ceil(n / world_size) pairs (DDP hangs when ranks run different step counts),
    together they cover every index (a few padded ones twice), and with per-rank batches of
    batch_size / world_size, step b's batches together are the single process's batch b.
    """
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    seeds = torch.randint(0, 2**62, (n,), generator=generator)
    pairs = list(zip(order.tolist(), seeds.tolist()))
    padded = (pairs * world_size)[: math.ceil(n / world_size) * world_size]
    return padded[rank::world_size]


class EpochSampler(Sampler):
    """Yields `epoch_shard` pairs (index, sample_seed); order and seeds depend only on (seed, epoch).

    Call `set_epoch(epoch)` before each epoch (as with DistributedSampler). A run resumed at epoch
    e therefore sees exactly the batches and augmentations an uninterrupted run sees. With
    `world_size` > 1 it yields this `rank`'s share of the epoch (DDP, see `train_dino`).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(epoch_shard(self.n, self.seed, self.epoch, self.rank, self.world_size, self.shuffle))


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers: 0 on CPU (the model needs the cores), else one per available core up to
    8 (Kaggle: 4 CPUs -> 4; the GPU waits on augmentation otherwise)."""
    return 0 if device.type == "cpu" else min(8, len(os.sched_getaffinity(0)))


def _loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, **kw) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# 7.5 Training
# ---------------------------------------------------------------------------------------------



def amp_autocast(device: torch.device, dtype: "torch.dtype | None") -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype` on `device`, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def dino_param_groups(
    model: ENTRepNet, lr_head: float, lr_backbone: float, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """AdamW groups: heads at `lr_head`, backbone at `lr_backbone` (x layer_decay**depth-from-top
    when given, timm's BEiT-style layer decay); no weight decay on biases, norms, tokens, pos-embed
    (timm's param-group helpers + the backbone's no_weight_decay())."""
    skip = model.backbone.no_weight_decay() if hasattr(model.backbone, "no_weight_decay") else ()
    if layer_decay is None:
        backbone = timm.optim.param_groups_weight_decay(model.backbone, weight_decay, no_weight_decay_list=skip)
        for group in backbone:
            group["lr"] = lr_backbone
    else:
        backbone = timm.optim.param_groups_layer_decay(
            model.backbone, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
        )
        for group in backbone:
            group["lr"] = lr_backbone * group.pop("lr_scale")
    heads = timm.optim.param_groups_weight_decay(model.heads, weight_decay)
    for group in heads:
        group["lr"] = lr_head
    groups = [{**g, "name": "backbone"} for g in backbone] + [{**g, "name": "heads"} for g in heads]
    return [g for g in groups if len(g["params"])]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps` optimizer steps, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of every state_dict tensor (name, shape, dtype, bytes): identifies the initial model
    (architecture, image size, pretrained weights, head init) in the run hash."""
    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_config_hash(config: Mapping) -> str:
    """Stable SHA-1 of a JSON-able run configuration."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict:
    """python / numpy / torch (CPU and CUDA) RNG states as tensors, lists and ints only, so a
    checkpoint holding them loads with torch.load(weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError):
    """A checkpoint that is truncated, tampered with or not ours: never used, the run is redone."""


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside `path`, then os.replace: a crash never leaves half a file.
    A `<name>.sha256` digest is written after it, so load_torch_checkpoint can tell a complete,
    untouched file from a truncated or edited one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    digest = file_digest(tmp, "sha256")
    os.replace(tmp, path)
    tmp_digest = path.with_name(f".{path.name}.sha256.{os.getpid()}.tmp")
    tmp_digest.write_text(digest)
    os.replace(tmp_digest, path.with_name(path.name + ".sha256"))


def load_torch_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) onto the CPU after checking the file against its `.sha256`
    digest; raises CheckpointError (saying which file and why) when it does not match or load."""
    path = Path(path)
    digest_path = path.with_name(path.name + ".sha256")
    if not digest_path.is_file() or digest_path.read_text().strip() != file_digest(path, "sha256"):
        raise CheckpointError(f"{path}: missing digest or content changed since it was written (truncated or edited).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged file, or a non-tensor object
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(e).__name__}: {e}).") from e


def _resumable_run(last_path: Path, best_path: Path, config_hash: str) -> dict | None:
    """The saved state of an earlier run with this configuration, or None to start afresh. A
    damaged last.pt, or a best.pt a resume would need, is reported and not used."""
    if not last_path.exists():
        return None
    try:
        ckpt = load_torch_checkpoint(last_path)
        if ckpt.get("config_hash") != config_hash:
            raise CheckpointError(f"{last_path} belongs to another configuration.")
        if ckpt["best_epoch"] > 0:
            load_torch_checkpoint(best_path)
        return ckpt
    except CheckpointError as e:
        warnings.warn(f"train_dino: {e} Training this configuration again from the start.")
        return None


def dino_train_epoch(
    model: ENTRepNet,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: "torch.dtype | None",
    class_weights: Mapping[str, torch.Tensor],
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    desc: str = "train",
) -> float:
    """One pass over `loader`; an optimizer + scheduler step every `grad_accum` batches (the last
    group may be shorter; its loss is averaged over its own size). Returns the mean batch loss."""
    model.train()
    n_batches, total = len(loader), 0.0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for i, (x, y) in enumerate(bar):
        group_size = min(grad_accum, n_batches - (i // grad_accum) * grad_accum)
        steps = (i + 1) % grad_accum == 0 or i + 1 == n_batches
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # under DDP, gradients are all-reduced once per optimizer step, not per accumulated batch
        with model.no_sync() if not steps and hasattr(model, "no_sync") else contextlib.nullcontext():
            with amp_autocast(device, amp_dtype):
                loss = multitask_loss(model(x), y, class_weights)
            scaler.scale(loss / group_size).backward()
        if steps:
            if max_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scaler.get_scale() >= scale:  # fp16: a step skipped on inf/NaN gradients lowers the scale;
                scheduler.step()  # the schedule then waits for the optimizer (as transformers' Trainer does)
        total += loss.item()
        bar.set_postfix(loss=f"{total / (i + 1):.4f}")
    return total / max(n_batches, 1)


def dino_evaluate(
    model: ENTRepNet,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: "torch.dtype | None",
    class_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Validation loss, 7-class accuracy and macro F1 (sklearn; labels present in truth or
    prediction) of the fused prediction argmax dino_fine_probs."""
    logits, labels = collect_outputs(model, loader, device, amp_dtype, progress=False)
    weights = {k: v.cpu() for k, v in (class_weights or {}).items()}
    loss = multitask_loss(logits, labels, weights).item()
    pred = dino_fine_probs(task_probs(logits)).argmax(1)
    y = labels.numpy()
    return {
        "loss": float(loss),
        "acc": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }


def dino_items(items: Sequence[tuple[str | os.PathLike, int | str]], name: str = "items") -> list[list]:
    """(path, label) pairs -> [[path str, official id], ...]; labels may be ids or LABELS strings."""
    unknown = sorted({label for _, label in items if isinstance(label, str) and label not in LABEL_TO_ID})
    if unknown:
        raise ValueError(f"{name}: unknown labels {unknown[:5]}; use official ids 0-6 or one of {LABELS}.")
    rows = [[os.fspath(path), LABEL_TO_ID[label] if isinstance(label, str) else int(label)] for path, label in items]
    if not rows:
        raise ValueError(f"{name} is empty: pass (path, label id) pairs (a validation split is required).")
    bad = [r for r in rows if not 0 <= r[1] < len(LABELS)]
    if bad:
        raise ValueError(f"{name}: label ids must be official ids 0..{len(LABELS) - 1}; got e.g. {bad[:3]}.")
    return rows


def dino_loaders(
    model: nn.Module,
    train_rows: Sequence[Sequence],
    val_rows: Sequence[Sequence],
    batch_size: int,
    seed: int,
    flip_p: float,
    num_workers: int,
    device: torch.device,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Training loader (FlipSwapDataset cached at train_cache_size, train transforms, EpochSampler:
    call `loader.sampler.set_epoch(e)`) and validation loader (cached at the input size, eval
    transforms, file order). Decodes every image once here. `batch_size` is per process: with
    `world_size` > 1 the training loader yields this `rank`'s share of each epoch (`epoch_shard`)."""
    size = dino_image_size(model)
    train_set = FlipSwapDataset([r[0] for r in train_rows], [r[1] for r in train_rows],
                                dino_transforms(model, size, train=True), train_cache_size(size), flip_p,
                                progress=progress)
    val_set = FlipSwapDataset([r[0] for r in val_rows], [r[1] for r in val_rows],
                              dino_transforms(model, size, train=False), size, progress=progress)
    # the generator only seeds worker processes; all sample randomness comes from EpochSampler
    sampler = EpochSampler(len(train_set), seed, rank=rank, world_size=world_size)
    train_loader = _loader(train_set, batch_size, num_workers, device, sampler=sampler,
                           generator=torch.Generator().manual_seed(seed))
    return train_loader, _loader(val_set, batch_size, num_workers, device, shuffle=False)


def dino_optimizer(
    model: ENTRepNet,
    lr_head: float,
    lr_backbone: float,
    weight_decay: float,
    layer_decay: float | None,
    warmup_epochs: float,
    epochs: int,
    steps_per_epoch: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `dino_param_groups` and a per-optimizer-step warmup + cosine schedule."""
    optimizer = torch.optim.AdamW(dino_param_groups(model, lr_head, lr_backbone, weight_decay, layer_decay))
    schedule = partial(warmup_cosine, warmup_steps=round(warmup_epochs * steps_per_epoch),
                       total_steps=epochs * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def training_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    **meta,
) -> dict:
    """Everything a resume needs (all loadable with weights_only=True), plus `meta`
    (config_hash, epoch, finished, history, best_metric, best_epoch)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_state(), **meta}


def restore_training(
    ckpt: Mapping,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load a `training_checkpoint` back into the live objects and the global RNGs."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:  # empty when the scaler is disabled (bf16 / fp32)
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])


def resolve_world_size(world_size: int | str, device: torch.device) -> int:
    """Training processes for `train_dino`: "auto" -> every visible GPU when `device` is CUDA
    (Kaggle T4 x2: 2), else 1. An int is checked against the GPUs there are."""
    if world_size == "auto":
        return max(torch.cuda.device_count(), 1) if device.type == "cuda" else 1
    if isinstance(world_size, str) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: use 'auto' or a number of processes >= 1.")
    if world_size > 1 and device.type not in ("cuda", "cpu"):
        raise ValueError(f"world_size={world_size} needs device 'cuda' (NCCL) or 'cpu' (gloo), not {device}.")
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"world_size={world_size} but {torch.cuda.device_count()} GPU(s) are visible; "
                         "use 'auto' (one process per GPU) or a smaller number.")
    return world_size


@dataclass(frozen=True)
class _DinoRun:
    """Everything one training process needs: `train_dino`'s resolved arguments (picklable, so a
    spawned DDP rank gets it whole). `batch_size` is the global batch, `num_workers` per process."""

    train_rows: list
    val_rows: list
    epochs: int
    batch_size: int
    lr_head: float
    lr_backbone: float
    layer_decay: float | None
    weight_decay: float
    warmup_epochs: float
    grad_accum: int
    max_grad_norm: float | None
    amp: torch.dtype | None
    device: torch.device
    seed: int
    patience: int | None
    flip_p: float
    num_workers: int
    progress: bool
    world_size: int
    config_hash: str
    run_dir: Path


def _mean_over_ranks(value: float, world_size: int, device: torch.device) -> float:
    """Mean of `value` over the DDP ranks (all-reduce); `value` itself in a single process."""
    if world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.item() / world_size


def _rank0_decides(flag: bool, world_size: int, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (broadcast), so all ranks stop after the same epoch."""
    if world_size == 1:
        return flag
    decision = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(decision, src=0)
    return bool(decision.item())


def _train_loop(model: ENTRepNet, run: _DinoRun, rank: int = 0, ckpt: Mapping | None = None) -> list[dict]:
    """`train_dino`'s epoch loop, from `ckpt` (a last.pt to resume) or from scratch. Run by the single
    process, or by every DDP rank of a process group already set up (CUDA: rank r on cuda:r). Each
    rank trains its `epoch_shard` with batch_size / world_size; rank 0 evaluates the whole
    validation set, writes best.pt / last.pt and decides when to stop. Returns rank 0's history."""
    device = torch.device("cuda", rank) if run.world_size > 1 and run.device.type == "cuda" else run.device
    main = rank == 0
    model.to(device)
    val_rows = run.val_rows if main else []  # only rank 0 evaluates
    train_loader, val_loader = dino_loaders(model, run.train_rows, val_rows, run.batch_size // run.world_size,
                                            run.seed, run.flip_p, run.num_workers, device, run.progress and main,
                                            rank, run.world_size)
    class_weights = {k: v.to(device) for k, v in class_weights_from_labels([r[1] for r in run.train_rows]).items()}
    optimizer, scheduler = dino_optimizer(model, run.lr_head, run.lr_backbone, run.weight_decay, run.layer_decay,
                                          run.warmup_epochs, run.epochs,
                                          steps_per_epoch=math.ceil(len(train_loader) / run.grad_accum))
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)
    start_epoch, history, best_metric, best_epoch = 0, [], -1.0, 0
    if ckpt is not None:
        restore_training(ckpt, model, optimizer, scheduler, scaler)
        start_epoch, history = ckpt["epoch"], list(ckpt["history"])
        best_metric, best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
    else:  # the global RNGs only drive drop-path / dropout, if the backbone has any
        random.seed(run.seed)
        np.random.seed(run.seed)
        torch.manual_seed(run.seed)
    # DDP averages gradients over ranks in backward; evaluation and checkpoints use the bare model
    net = model if run.world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    best_path, last_path = run.run_dir / "best.pt", run.run_dir / "last.pt"
    epoch_bar = tqdm(range(start_epoch, run.epochs), desc="DINOv2", initial=start_epoch, total=run.epochs,
                     disable=not (run.progress and main))
    for epoch in epoch_bar:
        start = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        train_loss = dino_train_epoch(net, train_loader, optimizer, scheduler, scaler, device, run.amp, class_weights,
                                      run.grad_accum, run.max_grad_norm, run.progress and main,
                                      desc=f"epoch {epoch + 1}")
        train_loss = _mean_over_ranks(train_loss, run.world_size, device)
        finished = False
        if main:
            val = dino_evaluate(model, val_loader, device, run.amp, class_weights)
            lr = {name: max(g["lr"] for g in optimizer.param_groups if g["name"] == name)
                  for name in ("heads", "backbone")}
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                            "val_acc": val["acc"], "val_macro_f1": val["macro_f1"], "lr": lr["heads"],
                            "lr_backbone": lr["backbone"], "seconds": time.perf_counter() - start})
            if val["macro_f1"] > best_metric:
                best_metric, best_epoch = val["macro_f1"], epoch + 1
                atomic_torch_save({"model": model.state_dict(), "epoch": best_epoch, "val_macro_f1": best_metric,
                                   "config_hash": run.config_hash}, best_path)
            finished = epoch + 1 == run.epochs or bool(run.patience) and epoch + 1 - best_epoch >= run.patience
            atomic_torch_save(training_checkpoint(model, optimizer, scheduler, scaler, config_hash=run.config_hash,
                                                  epoch=epoch + 1, finished=finished, history=history,
                                                  best_metric=best_metric, best_epoch=best_epoch), last_path)
            epoch_bar.set_postfix(train_loss=f"{train_loss:.3f}", val_f1=f"{val['macro_f1']:.3f}", best=best_epoch)
        if _rank0_decides(finished, run.world_size, device):
            break
    return history


def _ddp_worker(rank: int, model: ENTRepNet, run: _DinoRun, init_method: str, resume: bool) -> None:
    """One DDP rank of `train_dino`, started by torch.multiprocessing (spawn): joins the process
    group (NCCL on CUDA, gloo on CPU), loads last.pt when resuming, runs `_train_loop`, and always
    leaves the group."""
    import copy  # kept local to this section, like socket in _spawn_ranks

    # torch hands spawned processes CPU tensors in shared memory: without a private copy, CPU
    # ranks would all step the same weights (every update applied world_size times)
    model = copy.deepcopy(model)
    if run.device.type == "cuda":
        torch.cuda.set_device(rank)
    else:  # the ranks share the cores (torchrun sets OMP_NUM_THREADS=1 for the same reason)
        torch.set_num_threads(max(1, torch.get_num_threads() // run.world_size))
    backend = "nccl" if run.device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=run.world_size)
    try:
        ckpt = load_torch_checkpoint(run.run_dir / "last.pt") if resume else None
        _train_loop(model, run, rank, ckpt)
    finally:
        torch.distributed.destroy_process_group()


def _spawn_ranks(model: ENTRepNet, run: _DinoRun, resume: bool) -> None:
    """Run `_ddp_worker` in `run.world_size` spawned processes and wait for them. The rendezvous is
    a free localhost TCP port. A failing rank stops the others and raises here
    (torch.multiprocessing.ProcessRaisedException, with the rank's traceback)."""
    import socket  # only multi-process runs need it; kept local to this section

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_ddp_worker, args=(model, run, f"tcp://127.0.0.1:{port}", resume),
                                          nprocs=run.world_size, join=True, start_method="spawn")


def train_dino(
    model: ENTRepNet,
    train_items: Sequence[tuple[str | os.PathLike, int | str]],
    val_items: Sequence[tuple[str | os.PathLike, int | str]],
    *,
    checkpoint_dir: str | os.PathLike,
    epochs: int = 20,
    batch_size: int = 32,
    lr_head: float = 1e-3,
    lr_backbone: float = 2e-5,
    layer_decay: float | None = None,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    amp_dtype: "str | torch.dtype | None" = "auto",
    device: "torch.device | str" = "auto",
    world_size: int | str = 1,
    seed: int = 0,
    patience: int | None = 5,
    flip_p: float = 0.5,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, Path]:
    """Fine-tune `model` (pass a freshly built one) on (path, label) pairs; early-stop on validation
    7-class macro F1. Returns (history: epoch, train_loss, val_loss, val_acc, val_macro_f1, lr,
    lr_backbone, seconds; best checkpoint path). On return the model holds the best weights.

    Recipe: AdamW (heads `lr_head`, backbone `lr_backbone`, optional layer decay, no decay on
    norms/biases/tokens), linear warmup + cosine per optimizer step, class-weighted losses
    (`class_weights_from_labels`), flip with label swap, autocast (`resolve_amp_dtype`; fp16 adds a
    GradScaler), `grad_accum` batches per step, grad-norm clipping, `patience` epochs (None: off).

    Checkpoints: `checkpoint_dir/dino_<hash>/`, <hash> over the initial model weights, the data and
    every setting that changes the result (not device / num_workers / progress). `last.pt` (model,
    optimizer, scheduler, scaler, epoch, history, best metric, RNG states) is written atomically
    after every epoch, `best.pt` (model) whenever val macro F1 improves, `config.json` holds the
    resolved configuration. A rerun with the same config resumes an unfinished run, or loads best.pt
    of a finished one without training; another config gets its own folder. Data order and
    augmentation depend only on (seed, epoch), so an interrupted and resumed run ends with the same
    weights as an uninterrupted one (exact on CPU; on GPU up to non-deterministic kernels).

    Two GPUs (Kaggle T4 x2): `world_size="auto"` (or 2) trains with torch's DistributedDataParallel,
    one process per GPU (rank r on cuda:r, NCCL; on CPU, gloo, for tests). The processes are
    started with torch.multiprocessing's "spawn", never "fork": the notebook has already used CUDA
    (BiomedCLIP) and a forked child cannot; spawn works from Jupyter because the worker function
    lives in this importable module. `batch_size` stays the global batch: each rank takes
    batch_size / world_size (it must divide) of every step from its `epoch_shard` of the same
    (seed, epoch) permutation, and `num_workers` is split between the ranks. Rank 0 evaluates the
    whole validation set, writes the checkpoints (the bare model's state_dict, no "module." prefix)
    and decides when to stop; the others follow. The workers' progress bars go to the kernel's
    log, not to the cell. A failing rank stops the others and raises here with its traceback.
    Numerically a 2-process run is not the 1-process run: DDP averages the ranks' gradients, and
    each rank's class-weighted, region-masked loss is a mean over its own half-batch, so the step
    differs from the one over the whole batch. world_size > 1 is therefore part of the run hash
    (resume continues with the same count); 1 is left out, so earlier single-process runs keep
    their folders.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    amp = resolve_amp_dtype(amp_dtype, device)
    world_size = resolve_world_size(world_size, device)
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} does not split over world_size={world_size} processes: use a "
                         f"multiple of {world_size} (batch_size is the global batch, batch_size / world_size a rank's).")
    train_rows, val_rows = dino_items(train_items, "train_items"), dino_items(val_items, "val_items")
    config = {
        "model_fingerprint": model_fingerprint(model), "image_size": dino_image_size(model),
        "train": train_rows, "val": val_rows, "epochs": epochs, "batch_size": batch_size, "lr_head": lr_head,
        "lr_backbone": lr_backbone, "layer_decay": layer_decay, "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs, "grad_accum": grad_accum, "max_grad_norm": max_grad_norm,
        "amp_dtype": str(amp), "seed": seed, "patience": patience, "flip_p": flip_p,
        "augment": {k: list(v) if isinstance(v, tuple) else v for k, v in DINO_TRAIN_AUGMENT.items()},
        "class_weighting": "balanced",
        **({"world_size": world_size} if world_size > 1 else {}),
    }
    config_hash = run_config_hash(config)
    run_dir = Path(checkpoint_dir) / f"dino_{config_hash[:12]}"
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    ckpt = _resumable_run(last_path, best_path, config_hash)
    if ckpt is not None and ckpt["finished"]:
        tqdm.write(f"train_dino: reusing finished run {run_dir} (best epoch {ckpt['best_epoch']}).")
        model.to(device).load_state_dict(load_torch_checkpoint(best_path)["model"])
        return pd.DataFrame(ckpt["history"]), best_path

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"config_hash": config_hash, **config}, indent=1))
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    run = _DinoRun(train_rows=train_rows, val_rows=val_rows, epochs=epochs, batch_size=batch_size, lr_head=lr_head,
                   lr_backbone=lr_backbone, layer_decay=layer_decay, weight_decay=weight_decay,
                   warmup_epochs=warmup_epochs, grad_accum=grad_accum, max_grad_norm=max_grad_norm, amp=amp,
                   device=device, seed=seed, patience=patience, flip_p=flip_p,
                   num_workers=math.ceil(num_workers / world_size), progress=progress, world_size=world_size,
                   config_hash=config_hash, run_dir=run_dir)
    if ckpt is not None:
        tqdm.write(f"train_dino: resuming {run_dir} after epoch {ckpt['epoch']}/{epochs}.")
    if world_size == 1:
        history = _train_loop(model, run, ckpt=ckpt)
    else:
        tqdm.write(f"train_dino: DDP over {world_size} processes ({device.type}), progress in the kernel's log.")
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give rank 0 (on cuda:0) back what this process cached there
        _spawn_ranks(model, run, resume=ckpt is not None)
        history = load_torch_checkpoint(last_path)["history"]
    model.to(device).load_state_dict(load_torch_checkpoint(best_path)["model"])
    return pd.DataFrame(history), best_path


# ---------------------------------------------------------------------------------------------
# 7.6 Inference
# ---------------------------------------------------------------------------------------------


def collect_outputs(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: "torch.dtype | None",
    flip: bool = False,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run `model` (eval mode, no grad) over `loader`; `flip` mirrors each batch first.
    Returns ({output name: (N, k) float32 CPU}, labels (N,)). A model returning one tensor is
    reported under "features"."""
    model.eval()
    outputs, labels = {}, []
    with torch.inference_mode(), amp_autocast(device, amp_dtype):
        for x, y in tqdm(loader, desc="predict", leave=False, disable=not progress):
            x = x.to(device, non_blocking=True)
            out = model(x.flip(-1) if flip else x)
            out = out if isinstance(out, Mapping) else {"features": out}
            for name, value in out.items():
                outputs.setdefault(name, []).append(value.float().cpu())
            labels.append(torch.as_tensor(y))
    return {k: torch.cat(v) for k, v in outputs.items()}, torch.cat(labels)


def task_probs(logits: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """ENTRepNet logits -> {"coarse": (N, 4) softmax, task: (N,) p(FINE_TASKS[task][1])}."""
    probs = {"coarse": logits["coarse"].softmax(-1).numpy()}
    probs.update({task: logits[task].softmax(-1)[:, 1].numpy() for task in FINE_TASKS})
    return probs


def flip_tta_probs(probs: Mapping[str, np.ndarray], probs_flipped: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Average an image's probabilities with its mirror's, read through FLIP_LABEL: for ear/nose
    p(right | x) is averaged with p(left | mirror x) = 1 - p(right | mirror x); vc state and the
    coarse region are plain averages."""
    out = {"coarse": (probs["coarse"] + probs_flipped["coarse"]) / 2}
    for task, (first, second) in FINE_TASKS.items():
        mirrored = 1.0 - probs_flipped[task] if FLIP_LABEL[second] == first else probs_flipped[task]
        out[task] = (probs[task] + mirrored) / 2
    return out


def dino_fine_probs(probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Task probabilities -> 7-class probabilities (N, 7) in LABELS order:
    p(label) = p(region) * p(label | region); throat = p(throat). Rows sum to 1."""
    coarse = np.asarray(probs["coarse"])  # (N, 4)
    out = np.zeros((len(coarse), len(LABELS)), dtype=np.float64)
    for region, r in COARSE_TO_ID.items():
        pair = FINE_TASKS.get(region)
        if pair is None:
            out[:, [LABEL_TO_ID[n] for n in LABELS if LABEL_TO_COARSE[n] == region]] = coarse[:, [r]]
            continue
        p_second = np.asarray(probs[region], dtype=np.float64)  # (N,)
        out[:, LABEL_TO_ID[pair[0]]] = coarse[:, r] * (1.0 - p_second)
        out[:, LABEL_TO_ID[pair[1]]] = coarse[:, r] * p_second
    return out


def _eval_loader(model: nn.Module, paths: Sequence, batch_size: int, num_workers: int,
                 device: torch.device, progress: bool) -> DataLoader:
    size = dino_image_size(model)
    dataset = FlipSwapDataset(paths, None, dino_transforms(model, size, train=False), cache_size=size, progress=progress)
    return _loader(dataset, batch_size, num_workers, device, shuffle=False)


def _dino_cached(model: nn.Module, paths: Sequence, kind: str, compute: Callable[[list], torch.Tensor],
                 cache_dir, model_id: str | None, amp, tta_flip: bool) -> torch.Tensor:
    """compute(paths) -> (N, D), or through cached_rows under `cache_dir` when given. The key holds
    the model (model_id, e.g. a checkpoint's SHA-256, else model_identity), its eval transform,
    the AMP dtype, flip TTA and `kind`."""
    if cache_dir is None:
        return compute(list(paths))
    transform = transform_id(dino_transforms(model, dino_image_size(model), train=False))
    key = hashlib.sha1(f"{kind}|{model_id or model_identity(model)}|{transform}|{amp}|tta={tta_flip}".encode()).hexdigest()
    return cached_rows(paths, compute, Path(cache_dir) / f"{kind}_{key[:20]}.safetensors", key)


def predict_dino(
    model: ENTRepNet,
    paths: Sequence[str | os.PathLike],
    device: "torch.device | str" = "auto",
    batch_size: int = 64,
    tta_flip: bool = False,
    amp_dtype: "str | torch.dtype | None" = "auto",
    num_workers: int = 0,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
) -> dict[str, np.ndarray]:
    """Probabilities for images: {"coarse": (N, 4) over COARSE_CLASSES, "ear"/"nose"/"vc": (N,)
    p(FINE_TASKS[task][1]) i.e. p(ear-right), p(nose-right), p(vc-closed)}. `tta_flip` averages
    with the mirrored image (`flip_tta_probs`). Feed the result to `dino_fine_probs` for (N, 7).
    With `cache_dir`, probabilities are kept per file content (cached_rows) under the model's
    identity (`model_id`, e.g. the checkpoint's SHA-256): a rerun predicts only new files."""
    device = resolve_device(device) if isinstance(device, str) else device
    amp = resolve_amp_dtype(amp_dtype, device)

    def compute(todo: list) -> torch.Tensor:
        loader = _eval_loader(model, todo, batch_size, num_workers, device, progress)
        probs = task_probs(collect_outputs(model, loader, device, amp, progress=progress)[0])
        if tta_flip:
            probs = flip_tta_probs(probs, task_probs(collect_outputs(model, loader, device, amp, True, progress)[0]))
        return torch.from_numpy(np.column_stack([probs["coarse"], *(probs[t] for t in FINE_TASKS)])).float()

    rows = _dino_cached(model, paths, "dino_probs", compute, cache_dir, model_id, amp, tta_flip)  # (N, 4 + tasks)
    rows = rows.reshape(len(paths), len(COARSE_CLASSES) + len(FINE_TASKS)).numpy()
    n = len(COARSE_CLASSES)
    return {"coarse": rows[:, :n], **{task: rows[:, n + i] for i, task in enumerate(FINE_TASKS)}}


def dino_features(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    device: "torch.device | str" = "auto",
    batch_size: int = 64,
    tta_flip: bool = False,
    amp_dtype: "str | torch.dtype | None" = "auto",
    num_workers: int = 0,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
) -> torch.Tensor:
    """L2-normalised backbone embeddings (N, D) float32 on CPU (CLS token after the final norm) of
    an ENTRepNet or a bare backbone. `tta_flip` averages with the mirror's embedding (side-blind).
    `cache_dir` / `model_id`: as for predict_dino."""
    device = resolve_device(device) if isinstance(device, str) else device
    amp = resolve_amp_dtype(amp_dtype, device)
    backbone = getattr(model, "backbone", model)

    def compute(todo: list) -> torch.Tensor:
        loader = _eval_loader(backbone, todo, batch_size, num_workers, device, progress)
        feats = collect_outputs(backbone, loader, device, amp, progress=progress)[0]["features"]  # (M, D)
        if tta_flip:
            feats = feats + collect_outputs(backbone, loader, device, amp, True, progress)[0]["features"]
        return F.normalize(feats, dim=-1)

    return _dino_cached(backbone, paths, "dino_feats", compute, cache_dir, model_id, amp, tta_flip)


# ---------------------------------------------------------------------------------------------
# 7.7 Plots
# ---------------------------------------------------------------------------------------------


def plot_learning_curve(history: pd.DataFrame) -> plt.Figure:
    """Train/val loss and val accuracy / macro F1 per epoch, best epoch (max val macro F1) marked."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o", label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="multi-task loss", title="Loss")
    ax_metric.plot(history["epoch"], history["val_acc"], marker="o", label="val accuracy")
    ax_metric.plot(history["epoch"], history["val_macro_f1"], marker="o", label="val macro F1")
    ax_metric.set(xlabel="epoch", ylabel="7-class score", title="Validation", ylim=(0, 1.02))
    best = history.loc[history["val_macro_f1"].idxmax()]
    for ax in (ax_loss, ax_metric):
        ax.axvline(best["epoch"], color="grey", linestyle="--", linewidth=1, label=f"best epoch {int(best['epoch'])}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# =============================================================================================
# 8. Hybrid inference, metrics, result plots and submissions
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 8.1 Hybrid inference
# ---------------------------------------------------------------------------------------------

# A fine head's p(second label of FINE_TASKS[region]) above this picks the second label; exactly
# 0.5 picks the first, as argmax over [1 - p, p] does (the paper's binary heads: sigmoid at 0.5).
FINE_DECISION_THRESHOLD: float = 0.5


# Candidate values that validation chooses among (never tuned on test).
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(101))  # 0.00 .. 1.00
WEIGHT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))  # 0.00 .. 1.00


def _coarse_probs(probs, name: str, n: int | None = None) -> np.ndarray:
    """`probs` as a float64 (N, 4) array in COARSE_CLASSES order, or a ValueError saying what to pass."""
    a = np.asarray(probs, dtype=np.float64)
    k = len(COARSE_CLASSES)
    if a.ndim != 2 or a.shape[1] != k or (n is not None and a.shape[0] != n):
        want = f"[{n if n is not None else 'N'}, {k}]"
        raise ValueError(f"{name} must be {want} probabilities in COARSE_CLASSES order {COARSE_CLASSES}; got shape {a.shape}.")
    return a


def _fine_probs(dino_fine_probs: Mapping[str, object], region: str, n: int) -> np.ndarray:
    """DINOv2's (N,) p(FINE_TASKS[region][1]), checked."""
    if region not in dino_fine_probs:
        raise ValueError(
            f"dino_fine_probs has no {region!r}; pass {{region: p(second label)}} for every region of "
            f"FINE_TASKS {tuple(FINE_TASKS)} (e.g. {region!r}: p({FINE_TASKS[region][1]}))."
        )
    p = np.asarray(dino_fine_probs[region], dtype=np.float64).reshape(-1)
    if p.shape[0] != n:
        raise ValueError(f"dino_fine_probs[{region!r}] has {p.shape[0]} values; expected one per image ({n}).")
    return p


def coarse_to_label7(coarse_ids, dino_fine_probs: Mapping[str, object]) -> np.ndarray:
    """The paper's second stage: a 7-class id per image from its coarse region and DINOv2's fine decision.

    coarse_ids (N,) ids in COARSE_CLASSES order; dino_fine_probs {region: (N,) p(second label of
    FINE_TASKS[region])} for ear, nose and vc. Throat has no fine decision. p > 0.5 picks the second
    label, p <= 0.5 the first (FINE_DECISION_THRESHOLD). Returns (N,) int64 ids in LABELS order.
    """
    coarse_ids = np.asarray(coarse_ids).reshape(-1)
    labels = np.full(coarse_ids.shape, -1, dtype=np.int64)  # (N,)
    for region, region_id in COARSE_TO_ID.items():
        in_region = coarse_ids == region_id  # (N,)
        if region in FINE_TASKS:
            first, second = FINE_TASKS[region]
            p_second = _fine_probs(dino_fine_probs, region, len(coarse_ids))
            picks = np.where(p_second > FINE_DECISION_THRESHOLD, LABEL_TO_ID[second], LABEL_TO_ID[first])
            labels[in_region] = picks[in_region]
        else:  # a one-label region (throat)
            (only,) = [name for name, r in LABEL_TO_COARSE.items() if r == region]
            labels[in_region] = LABEL_TO_ID[only]
    if (labels < 0).any():
        raise ValueError(f"coarse ids must be in 0..{len(COARSE_CLASSES) - 1} (COARSE_CLASSES order).")
    return labels


def hybrid_predict(
    proto_coarse_probs, dino_coarse_probs, dino_fine_probs: Mapping[str, object], threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's rule: prototypes give the coarse region when confident, else DINOv2; then DINOv2's fine label.

    proto_coarse_probs, dino_coarse_probs (N, 4) in COARSE_CLASSES order. The prototype's confidence
    is its top probability; at exactly `threshold` the prototype is used (conf >= threshold), so
    threshold 0 never falls back and threshold > 1 always does (a NaN confidence falls back).
    Argmax ties go to the first region in COARSE_CLASSES order.
    Returns labels7 (N,) int64 ids in LABELS order and used_fallback (N,) bool (True: DINOv2's coarse).
    """
    proto = _coarse_probs(proto_coarse_probs, "proto_coarse_probs")  # (N, 4)
    dino = _coarse_probs(dino_coarse_probs, "dino_coarse_probs", n=len(proto))  # (N, 4)
    used_fallback = ~(proto.max(axis=1) >= threshold)  # (N,)
    coarse = np.where(used_fallback, dino.argmax(axis=1), proto.argmax(axis=1))  # (N,)
    return coarse_to_label7(coarse, dino_fine_probs), used_fallback


def soft_fusion_predict(
    proto_coarse_probs, dino_coarse_probs, dino_fine_probs: Mapping[str, object], weight: float
) -> np.ndarray:
    """Soft variant: coarse region = argmax of weight * proto + (1 - weight) * dino, then DINOv2's fine label.

    weight in [0, 1]: 1 is prototypes only, 0 is DINOv2 only. Returns (N,) int64 ids in LABELS order.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1] (1 = prototypes only, 0 = DINOv2 only); got {weight}.")
    proto = _coarse_probs(proto_coarse_probs, "proto_coarse_probs")  # (N, 4)
    dino = _coarse_probs(dino_coarse_probs, "dino_coarse_probs", n=len(proto))  # (N, 4)
    fused = weight * proto + (1.0 - weight) * dino  # (N, 4)
    return coarse_to_label7(fused.argmax(axis=1), dino_fine_probs)


# ---------------------------------------------------------------------------------------------
# 8.2 Choosing the threshold / weight on validation (cross-fitted)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FusionChoice:
    """A fusion parameter chosen on validation data only.

    param         "threshold" or "weight"
    chosen        value chosen on ALL validation data: freeze it and apply it to the test set once
    fold_values   value chosen on the other folds, one per fold (fold id order)
    fold_of       (N,) fold id of each validation image
    oof_pred      (N,) out-of-fold 7-class ids: image i predicted with fold_values[fold_of[i]], chosen
                  without its own label. Report validation figures from these (honest).
    oof_fallback  (N,) bool, out-of-fold "fell back to DINOv2" (None for soft fusion)
    sweep         per grid value on all validation data (in-sample, optimistic at its peak):
                  param, accuracy, macro_f1[, fallback_fraction]
    """

    param: str
    chosen: float
    fold_values: tuple[float, ...]
    fold_of: np.ndarray
    oof_pred: np.ndarray
    oof_fallback: np.ndarray | None
    sweep: pd.DataFrame


def stratified_fold_ids(y_true, n_splits: int = 5, seed: int = 0) -> np.ndarray:
    """(N,) fold id per sample, stratified by label and shuffled with `seed`: grouped_fold_ids
    with one group per sample (fewer folds when the data is too small for n_splits)."""
    y_true = np.asarray(y_true)
    return grouped_fold_ids(y_true, np.arange(len(y_true)), n_splits, seed)


def best_grid_value(grid: Sequence[float], macro_f1, accuracy) -> float:
    """The grid value with the highest macro F1; ties -> higher accuracy; still tied -> the middle
    of the tied values in grid order (the upper middle for an even count), the centre of a plateau,
    which is least sensitive to where exactly the plateau ends."""
    grid = np.asarray(grid, dtype=np.float64)
    f1 = np.round(np.asarray(macro_f1, dtype=np.float64), 12)  # rounding: equal scores compare equal
    acc = np.where(f1 == f1.max(), np.round(np.asarray(accuracy, dtype=np.float64), 12), -np.inf)
    tied = np.sort(grid[acc == acc.max()])
    return float(tied[len(tied) // 2])


def cross_fit_choice(
    grid_preds,
    y_true,
    grid: Sequence[float],
    param: str,
    n_splits: int = 5,
    seed: int = 0,
    fold_of=None,
    grid_fallback=None,
) -> FusionChoice:
    """Choose one value of `grid` by macro F1, with honest out-of-fold predictions (cross-fitting).

    grid_preds (G, N) 7-class ids of every validation image under every grid value; the rule must be
    per image (an image's prediction does not depend on the others), as both fusion rules are, so a
    fold's predictions are the fold's columns. For each fold the value is chosen on the other folds
    (best_grid_value) and the fold is predicted with it; `chosen` uses all validation data.
    fold_of (N,) fold ids (default stratified_fold_ids(y_true, n_splits, seed)); pass your own, e.g.
    grouped by examination. grid_fallback (G, N) bool, optional. Test data never enters.
    """
    grid = np.asarray(grid, dtype=np.float64)
    preds = np.asarray(grid_preds)  # (G, N)
    y_true = np.asarray(y_true)
    if preds.shape != (len(grid), len(y_true)):
        raise ValueError(f"grid_preds must be [len(grid), N] = [{len(grid)}, {len(y_true)}]; got {preds.shape}.")
    fold_of = stratified_fold_ids(y_true, n_splits, seed) if fold_of is None else np.asarray(fold_of)
    folds = np.unique(fold_of)
    if len(folds) < 2:
        raise ValueError("cross-fitting needs at least 2 folds; pass n_splits >= 2 or fold ids with 2+ values.")
    fallback = None if grid_fallback is None else np.asarray(grid_fallback, dtype=bool)  # (G, N)

    sweep = _sweep_table(preds, y_true, grid, param, fallback)
    chosen = best_grid_value(grid, sweep["macro_f1"], sweep["accuracy"])
    oof_pred = np.empty_like(y_true, dtype=np.int64)
    oof_fallback = None if fallback is None else np.empty(len(y_true), dtype=bool)
    fold_values = []
    for k in folds:
        held_out, rest = fold_of == k, fold_of != k
        scores = batched_classification_scores(y_true[rest], preds[:, rest])  # each (G,)
        value = best_grid_value(grid, scores["macro_f1"], scores["accuracy"])
        g = int(np.flatnonzero(grid == value)[0])
        oof_pred[held_out] = preds[g, held_out]
        if fallback is not None:
            oof_fallback[held_out] = fallback[g, held_out]
        fold_values.append(value)
    return FusionChoice(param, chosen, tuple(fold_values), fold_of, oof_pred, oof_fallback, sweep)


def _sweep_table(preds: np.ndarray, y_true: np.ndarray, grid: np.ndarray, param: str, fallback) -> pd.DataFrame:
    """One row per grid value: param, accuracy, macro_f1[, fallback_fraction] on all given images."""
    scores = batched_classification_scores(y_true, preds)  # each (G,)
    sweep = pd.DataFrame({param: grid, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]})
    if fallback is not None:
        sweep["fallback_fraction"] = fallback.mean(axis=1)
    return sweep


def choose_threshold_cv(
    proto_coarse_probs,
    dino_coarse_probs,
    dino_fine_probs: Mapping[str, object],
    y_true,
    grid: Sequence[float] = THRESHOLD_GRID,
    n_splits: int = 5,
    seed: int = 0,
    fold_of=None,
) -> FusionChoice:
    """The hybrid rule's confidence threshold, chosen on validation data by cross-fitting.

    All inputs are validation arrays (N images); see cross_fit_choice for the protocol and
    best_grid_value for the tie rule. Freeze `.chosen` for the test set; report `.oof_pred`.
    """
    runs = [hybrid_predict(proto_coarse_probs, dino_coarse_probs, dino_fine_probs, t) for t in grid]
    preds = np.stack([labels for labels, _ in runs])  # (G, N)
    fallback = np.stack([used for _, used in runs])  # (G, N)
    return cross_fit_choice(preds, y_true, grid, "threshold", n_splits, seed, fold_of, fallback)


def choose_weight_cv(
    proto_coarse_probs,
    dino_coarse_probs,
    dino_fine_probs: Mapping[str, object],
    y_true,
    grid: Sequence[float] = WEIGHT_GRID,
    n_splits: int = 5,
    seed: int = 0,
    fold_of=None,
) -> FusionChoice:
    """The soft-fusion weight, chosen on validation data by cross-fitting (as choose_threshold_cv)."""
    preds = np.stack([soft_fusion_predict(proto_coarse_probs, dino_coarse_probs, dino_fine_probs, w) for w in grid])
    return cross_fit_choice(preds, y_true, grid, "weight", n_splits, seed, fold_of)


# ---------------------------------------------------------------------------------------------
# 8.3 Metrics
# ---------------------------------------------------------------------------------------------


def _ids(y, name: str, n_classes: int | None = None) -> np.ndarray:
    """Integer class ids as an int64 array, checked to lie in 0..n_classes-1."""
    a = np.asarray(y)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids (LABELS order); got dtype {a.dtype}.")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or (n_classes is not None and a.max() >= n_classes)):
        raise ValueError(f"{name} ids must be in 0..{(n_classes or 1) - 1}; got {a.min()}..{a.max()}.")
    return a


def coarse_of(labels7) -> np.ndarray:
    """(N,) coarse region ids (COARSE_CLASSES order) of (N,) 7-class ids (LABELS order)."""
    return np.asarray(LABEL_ID_TO_COARSE_ID, dtype=np.int64)[_ids(labels7, "labels7", len(LABELS))]


def summary_metrics(y_true, y_pred) -> dict[str, float]:
    """Accuracy, macro F1 and weighted F1 (scikit-learn; averages over classes present in either)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted")),
    }


def classification_table(y_true, y_pred, labels: Sequence[str] = LABELS) -> pd.DataFrame:
    """Per-class precision / recall / F1 / support (one row per name in `labels`, ids = positions),
    plus "macro avg" and "weighted avg" rows. The averages are over the classes present in y_true or
    y_pred (scikit-learn's default), so they equal summary_metrics; an absent class shows support 0.
    """
    y_true, y_pred = _ids(y_true, "y_true", len(labels)), _ids(y_pred, "y_pred", len(labels))
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    table = pd.DataFrame({"precision": p, "recall": r, "f1": f, "support": s}, index=pd.Index(list(labels), name="class"))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        table.loc[f"{average} avg"] = [p, r, f, len(y_true)]
    return table.astype({"support": int})


def batched_classification_scores(y_true, y_pred) -> dict[str, np.ndarray]:
    """Accuracy, macro F1 and weighted F1 of B prediction rows at once, equal to scikit-learn's per row.

    y_true (N,) or (B, N), y_pred (B, N) non-negative int ids -> {"accuracy", "macro_f1",
    "weighted_f1"}, each (B,). Macro F1 averages over the classes present in that row's y_true or
    y_pred (scikit-learn's default labels); weighted F1 weights by true support.
    """
    y_pred = np.atleast_2d(_ids(y_pred, "y_pred"))  # (B, N)
    y_true = np.broadcast_to(_ids(y_true, "y_true"), y_pred.shape)  # (B, N)
    b, n = y_pred.shape
    k = int(max(y_true.max(), y_pred.max())) + 1
    offset = np.arange(b)[:, None] * k  # (B, 1): one block of k bins per row
    hit = y_true == y_pred  # (B, N)
    tp = np.bincount((offset + y_true)[hit], minlength=b * k).reshape(b, k)  # (B, K)
    support = np.bincount((offset + y_true).ravel(), minlength=b * k).reshape(b, k)  # (B, K)
    predicted = np.bincount((offset + y_pred).ravel(), minlength=b * k).reshape(b, k)  # (B, K)
    present = (support + predicted) > 0  # (B, K)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros((b, k)), where=present)  # (B, K)
    return {
        "accuracy": hit.mean(axis=1),
        "macro_f1": f1.sum(axis=1) / present.sum(axis=1),
        "weighted_f1": (f1 * support).sum(axis=1) / n,
    }


def _default_metric_fns() -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """{name: fn(y_true (B, N), y_pred (B, N)) -> (B,)} for accuracy, macro F1 and weighted F1."""
    names = ("accuracy", "macro_f1", "weighted_f1")
    return {name: (lambda t, p, name=name: batched_classification_scores(t, p)[name]) for name in names}


def bootstrap_ci(
    y_true,
    y_pred,
    metric_fns: Mapping[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Percentile bootstrap confidence intervals: the N (true, pred) pairs resampled with replacement.

    metric_fns {name: fn(y_true (B, N), y_pred (B, N)) -> (B,)}, vectorised over resamples; default
    accuracy, macro F1 and weighted F1. The resamples depend only on (seed, N), so models scored on
    the same images with the same seed are compared on the same resamples (paired).
    Returns a DataFrame indexed by metric: estimate (full sample), low, high ((1 - alpha) interval).
    """
    y_true, y_pred = _ids(y_true, "y_true"), _ids(y_pred, "y_pred")
    if len(y_true) == 0 or len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred must be non-empty and equally long; got {len(y_true)} and {len(y_pred)}.")
    metric_fns = _default_metric_fns() if metric_fns is None else metric_fns
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y_true), size=(n_boot, len(y_true)))  # (B, N)
    rows = {}
    for name, fn in metric_fns.items():
        boot = np.asarray(fn(y_true[idx], y_pred[idx]), dtype=np.float64)  # (B,)
        low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        rows[name] = {"estimate": float(np.asarray(fn(y_true[None], y_pred[None]))[0]), "low": low, "high": high}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("metric")


def comparison_table(
    predictions: Mapping[str, object], y_true, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> pd.DataFrame:
    """One row per model ({name: (N,) predicted ids}): accuracy, macro_f1, weighted_f1, each with
    its bootstrap `_low` / `_high` bounds (paired resamples: same seed for every model)."""
    rows = {}
    for name, y_pred in predictions.items():
        ci = bootstrap_ci(y_true, y_pred, n_boot=n_boot, seed=seed, alpha=alpha)
        rows[name] = {
            f"{metric}{suffix}": ci.loc[metric, column]
            for metric in ci.index
            for suffix, column in (("", "estimate"), ("_low", "low"), ("_high", "high"))
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def branch_accuracy(y_true, y_pred, used_fallback) -> pd.DataFrame:
    """How many images each branch of the hybrid rule decided, and its accuracy.

    Rows "prototype" (confident prototypes), "DINOv2 fallback" and "all"; columns n, fraction,
    accuracy (NaN for an empty branch).
    """
    correct = _ids(y_true, "y_true") == _ids(y_pred, "y_pred")  # (N,)
    used_fallback = np.asarray(used_fallback, dtype=bool)
    branches = {"prototype": ~used_fallback, "DINOv2 fallback": used_fallback, "all": np.ones_like(used_fallback)}
    rows = {
        name: {"n": int(mask.sum()), "fraction": mask.mean(), "accuracy": correct[mask].mean() if mask.any() else np.nan}
        for name, mask in branches.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("branch")


# ---------------------------------------------------------------------------------------------
# 8.4 Result plots (each returns a matplotlib Figure; the notebook saves / shows it)
# ---------------------------------------------------------------------------------------------


def plot_confusion(
    y_true, y_pred, label_names: Sequence[str] = LABELS, normalize: str | None = None, title: str = ""
) -> Figure:
    """Confusion matrix heatmap, rows = true, columns = predicted (ids = positions in label_names).

    normalize: None (counts), "true" (each row sums to 1: recall on the diagonal) or "both" (two
    panels, counts then row-normalised).
    """
    if normalize not in (None, "true", "both"):
        raise ValueError(f"normalize must be None, 'true' or 'both'; got {normalize!r}.")
    modes = [None, "true"] if normalize == "both" else [normalize]
    ids = list(range(len(label_names)))
    side = 1.0 + 0.6 * len(label_names)
    fig = Figure(figsize=(side * len(modes), side), layout="constrained")
    for ax, mode in zip(fig.subplots(1, len(modes), squeeze=False)[0], modes):
        cm = confusion_matrix(y_true, y_pred, labels=ids, normalize=mode)  # (C, C)
        sns.heatmap(cm, annot=True, fmt=".2f" if mode else "d", cmap="Blues", cbar=False, square=True,
                    vmin=0, xticklabels=label_names, yticklabels=label_names, ax=ax)
        ax.set(xlabel="predicted", ylabel="true", title="row-normalised" if mode else "counts")
    if title:
        fig.suptitle(title)
    return fig


def plot_threshold_sweep(sweep: pd.DataFrame, chosen: float, title: str = "") -> Figure:
    """Accuracy and macro F1 (and fallback fraction, if present) against the swept parameter (the
    sweep's first column, e.g. FusionChoice.sweep), with the chosen value marked."""
    param = sweep.columns[0]
    sweep = sweep.sort_values(param)
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for column, name in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        line, = ax.plot(sweep[param], sweep[column], label=name)
        ax.plot([chosen], [np.interp(chosen, sweep[param], sweep[column])], "o", color=line.get_color())
    if "fallback_fraction" in sweep:
        ax.plot(sweep[param], sweep["fallback_fraction"], "--", color="gray", label="fraction to DINOv2")
    ax.axvline(chosen, color="black", linestyle=":", label=f"chosen {param} = {chosen:g}")
    ax.set(xlabel=param, ylabel="validation score (in-sample)", ylim=(0, 1.02), title=title or f"{param} sweep")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_misclassified_grid(
    paths: Sequence[str | os.PathLike], y_true, y_pred, label_names: Sequence[str] = LABELS,
    max_images: int = 16, ncols: int = 4,
) -> Figure:
    """The first `max_images` misclassified images (in input order), each titled "true / pred".

    An image that cannot be read shows the reason instead of crashing the report.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    wrong = np.flatnonzero(y_true != y_pred)
    shown = wrong[:max_images]
    if len(shown) == 0:
        fig = Figure(figsize=(4, 1.5), layout="constrained")
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        ax.axis("off")
        return fig
    ncols = min(ncols, len(shown))
    nrows = -(-len(shown) // ncols)
    fig = Figure(figsize=(3 * ncols, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(shown):]:
        fig.delaxes(ax)
    for ax, i in zip(axes, shown):
        try:
            ax.imshow(load_thumbnail(paths[i], 320))
        except (ImageDecodeError, FileNotFoundError) as e:
            ax.text(0.5, 0.5, f"cannot load\n{Path(paths[i]).name}\n{type(e).__name__}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{label_names[y_true[i]]} / {label_names[y_pred[i]]}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"misclassified (true / pred): {len(shown)} of {len(wrong)} shown")
    return fig


# ---------------------------------------------------------------------------------------------
# 8.5 Submissions (ENTREP.md "Submission files": each zip holds exactly one .json at its root)
# ---------------------------------------------------------------------------------------------

TRACK1_JSON: str = "submission.json"  # {"<image file>": <int 0-6>}
TRACK2_JSON: str = "submission_i2i.json"  # {"<query image>": "<retrieved image>"}, never itself
TRACK3_JSON: str = "submission_t2i.json"  # {"<query text exactly as given>": "<image file>"}


def write_submission_zip(mapping: Mapping[str, object], zip_path: str | os.PathLike, json_name: str) -> Path:
    """Write `mapping` as the only file, `json_name`, at the root of the zip `zip_path`.

    UTF-8 JSON with ensure_ascii=False (non-ASCII query texts stay as given), keys in the mapping's
    order. Written to a temporary file beside zip_path and moved into place with os.replace, so an
    interrupted write never leaves a half-written zip; fixed timestamp, so reruns give identical bytes.
    Keys must be str and values plain JSON types (int / str): convert numpy values first.
    """
    if not json_name.endswith(".json") or "/" in json_name or "\\" in json_name:
        raise ValueError(f"json_name must be a bare file name ending in .json (e.g. {TRACK1_JSON!r}); got {json_name!r}.")
    try:
        text = json.dumps(dict(mapping), ensure_ascii=False, indent=1)
    except TypeError as e:
        raise ValueError(f"{zip_path}: submission values must be plain int or str ({e}); convert numpy values "
                         "with int(x) / str(x), as write_track1/2/3 do.") from e
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    info = zipfile.ZipInfo(json_name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    fd, tmp = tempfile.mkstemp(dir=zip_path.parent, prefix=f".{zip_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr(info, text.encode("utf-8"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, zip_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return zip_path


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted(k for k, c in Counter(keys).items() if c > 1)
    if repeated:
        raise ValueError(f"the JSON repeats keys {_examples(repeated)}")
    return dict(pairs)


def read_submission_zip(zip_path: str | os.PathLike) -> tuple[str, dict]:
    """(json name, mapping) of a submission zip, checking it holds exactly one .json at its root
    and that the JSON is a UTF-8 object without repeated keys; else a ValueError naming the zip."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
            if len(names) != 1 or "/" in names[0] or not names[0].endswith(".json"):
                raise ValueError(f"it must hold exactly one .json at its root; it holds {names}")
            mapping = json.loads(zf.read(names[0]).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{zip_path} is not a valid submission zip: {e}. Write it with write_track1/2/3.") from e
    if not isinstance(mapping, dict):
        raise ValueError(f"{zip_path}: {names[0]} must hold a JSON object {{query: answer}}; it holds a {type(mapping).__name__}.")
    return names[0], mapping


def _examples(items, k: int = 3) -> str:
    items = list(items)
    return ", ".join(repr(x) for x in items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")


def _query_problems(mapping: Mapping[str, object], queries: Sequence[str], what: str) -> list[str]:
    """Missing and unexpected keys: the JSON must hold each unique query exactly once."""
    expected = set(queries)
    missing = [q for q in dict.fromkeys(queries) if q not in mapping]
    extra = [k for k in mapping if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} {what}s missing: {_examples(missing)}")
    if extra:
        problems.append(f"{len(extra)} keys are not listed {what}s: {_examples(extra)}")
    return problems


def _answer_problems(mapping: Mapping[str, object], gallery: set[str], no_self_match: bool) -> list[str]:
    """Values that are not gallery images, or (Track 2) a query matched to itself."""
    outside = [f"{k} -> {v!r}" for k, v in mapping.items() if not isinstance(v, str) or v not in gallery]
    problems = [f"{len(outside)} answers are not gallery images: {_examples(outside)}"] if outside else []
    if no_self_match:
        selves = [k for k, v in mapping.items() if k == v]
        if selves:
            problems.append(f"{len(selves)} queries retrieve themselves (never allowed): {_examples(selves)}")
    return problems


def _checked_submission(zip_path, json_name: str, problems_of: Callable[[dict], list[str]]) -> dict:
    """Re-read the zip, check its JSON name and content; ValueError naming the zip and every problem."""
    name, mapping = read_submission_zip(zip_path)
    problems = [f"the JSON is named {name!r}; this track needs {json_name!r}"] if name != json_name else []
    problems += problems_of(mapping)
    if problems:
        raise ValueError(f"{zip_path} is not a valid submission:\n- " + "\n- ".join(problems)
                         + "\nFix the predictions and write it again; do not upload this file.")
    return mapping


def validate_track1(zip_path: str | os.PathLike, image_names: Sequence[str]) -> dict[str, int]:
    """Check a Track 1 zip: submission.json, every listed image exactly once, values int ids 0-6."""
    def problems_of(mapping: dict) -> list[str]:
        bad = [f"{k}: {v!r}" for k, v in mapping.items() if type(v) is not int or not 0 <= v < len(LABELS)]
        range_problem = [f"{len(bad)} values are not integer label ids 0-{len(LABELS) - 1}: {_examples(bad)}"]
        return _query_problems(mapping, image_names, "image") + (range_problem if bad else [])

    return _checked_submission(zip_path, TRACK1_JSON, problems_of)


def validate_track2(
    zip_path: str | os.PathLike, query_images: Sequence[str], gallery_images: Sequence[str] | None = None
) -> dict[str, str]:
    """Check a Track 2 zip: submission_i2i.json, every query once, never itself, answers in the
    gallery (default: the query images, as in the challenge's i2i.csv)."""
    gallery = set(query_images if gallery_images is None else gallery_images)
    return _checked_submission(
        zip_path, TRACK2_JSON,
        lambda m: _query_problems(m, query_images, "query image") + _answer_problems(m, gallery, no_self_match=True),
    )


def validate_track3(
    zip_path: str | os.PathLike, query_texts: Sequence[str], gallery_images: Sequence[str]
) -> dict[str, str]:
    """Check a Track 3 zip: submission_t2i.json, every query text once (exactly as given), answers
    in the gallery."""
    gallery = set(gallery_images)
    return _checked_submission(
        zip_path, TRACK3_JSON,
        lambda m: _query_problems(m, query_texts, "query text") + _answer_problems(m, gallery, no_self_match=False),
    )


def _unique_mapping(queries: Sequence[str], answers: Sequence[object], what: str) -> dict[str, object]:
    """{query: answer} in query order. A JSON object holds a key once, so a repeated query keeps its
    first answer; repeats (and repeats with differing answers) are reported with a warning."""
    queries, answers = list(queries), list(answers)
    if len(queries) != len(answers):
        raise ValueError(f"{what}: {len(queries)} queries but {len(answers)} answers; pass one answer per query.")
    not_str = [q for q in queries if not isinstance(q, str)]
    if not_str:
        raise ValueError(f"{what}: queries must be str exactly as listed in the test CSV; got {_examples(not_str)}.")
    mapping: dict[str, object] = {}
    seen_answers: defaultdict[str, set] = defaultdict(set)
    for query, answer in zip(queries, answers):
        mapping.setdefault(str(query), answer)
        seen_answers[str(query)].add(answer)
    repeated = {q: c for q, c in Counter(map(str, queries)).items() if c > 1}
    if repeated:
        conflicting = [q for q in repeated if len(seen_answers[q]) > 1]
        warnings.warn(
            f"{what}: {len(repeated)} queries are listed more than once ({_examples(f'{q!r} x{c}' for q, c in repeated.items())}); "
            f"the JSON holds each once with its first answer. Differing answers for {len(conflicting)}: {_examples(conflicting)}.",
            stacklevel=3,
        )
    return mapping


def _write_validated(mapping: dict, zip_path, json_name: str, validate: Callable[[Path], object]) -> Path:
    """Write the zip, re-read and validate it; an invalid zip is removed before the error is raised."""
    zip_path = write_submission_zip(mapping, zip_path, json_name)
    try:
        validate(zip_path)
    except ValueError:
        zip_path.unlink(missing_ok=True)
        raise
    return zip_path


def _label_id(value) -> int:
    try:
        return operator.index(value)
    except TypeError as e:
        raise ValueError(f"Track 1 answers must be integer label ids 0-{len(LABELS) - 1}; got {value!r}.") from e


def _name(value) -> object:
    return str(value) if isinstance(value, str) else value  # np.str_ -> str; anything else fails validation


def write_track1(image_names: Sequence[str], labels7, zip_path: str | os.PathLike) -> Path:
    """Track 1 zip {image file: int id 0-6} for the images of cls.csv, validated after writing."""
    mapping = _unique_mapping(image_names, [_label_id(v) for v in np.asarray(labels7).tolist()], "Track 1")
    return _write_validated(mapping, zip_path, TRACK1_JSON, lambda p: validate_track1(p, image_names))


def write_track2(
    query_images: Sequence[str], retrieved: Sequence[str], zip_path: str | os.PathLike,
    gallery_images: Sequence[str] | None = None,
) -> Path:
    """Track 2 zip {query image: retrieved image} for the queries of i2i.csv, validated after writing."""
    mapping = _unique_mapping(query_images, [_name(v) for v in retrieved], "Track 2")
    return _write_validated(mapping, zip_path, TRACK2_JSON, lambda p: validate_track2(p, query_images, gallery_images))


def write_track3(
    query_texts: Sequence[str], retrieved: Sequence[str], zip_path: str | os.PathLike, gallery_images: Sequence[str]
) -> Path:
    """Track 3 zip {query text exactly as given: image file} for the texts of t2i.csv, validated after writing."""
    mapping = _unique_mapping(query_texts, [_name(v) for v in retrieved], "Track 3")
    return _write_validated(mapping, zip_path, TRACK3_JSON, lambda p: validate_track3(p, query_texts, gallery_images))


# =============================================================================================
# 9. Retrieval: Track 2 (image to image) and Track 3 (text to image)
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 9.1 Retrieval (Track 2) and text-to-image (Track 3)
# ---------------------------------------------------------------------------------------------

def cosine_topk(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    k: int,
    exclude_self: bool = False,
    query_ids: Sequence | None = None,
    gallery_ids: Sequence | None = None,
    chunk_size: int = 1024,
    gallery_chunk_size: int = 32768,
    index: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items by cosine for each query: (scores [Q, k], indices [Q, k]), best first.

    Self-matches are never returned: exclude_self=True when the query set IS the gallery (same order),
    or pass query_ids/gallery_ids (file names, content hashes) and every pair with equal ids is
    excluded. Ties are broken by the lower gallery index. k is clipped to the gallery size less one
    when excluding.

    Exact search (index=None) multiplies blocks of chunk_size queries by gallery_chunk_size gallery
    rows and keeps a running top-k, so memory is bounded by chunk_size x gallery_chunk_size scores
    (128 MiB at the defaults) whatever the gallery size. index: a FAISS index over the same
    gallery rows (utils.faiss_index) searches with it instead: exact for kind="flat", approximate
    for "ivf" (which may return fewer than k items: missing slots hold index -1, score -inf).
    """
    n_q, n_g = query_feats.shape[0], gallery_feats.shape[0]
    if exclude_self and query_ids is None:
        if n_q != n_g:
            raise ValueError(
                f"exclude_self needs the query set to be the gallery ({n_q} != {n_g} rows): pass query_ids "
                "and gallery_ids instead."
            )
        query_ids, gallery_ids = range(n_q), range(n_g)
    q_codes = g_codes = None
    if query_ids is not None:
        codes = {v: i for i, v in enumerate(dict.fromkeys([*query_ids, *gallery_ids]))}
        q_codes = torch.tensor([codes[v] for v in query_ids], dtype=torch.long)
        g_codes = torch.tensor([codes[v] for v in gallery_ids], dtype=torch.long)
    k = max(0, min(k, n_g - 1 if q_codes is not None else n_g))
    if index is not None:
        return _faiss_topk(index, query_feats, n_g, k, q_codes, g_codes)
    scores, indices = [torch.empty(0, k)], [torch.empty(0, k, dtype=torch.long)]
    for start in range(0, n_q, chunk_size):
        q = query_feats[start:start + chunk_size].float()
        best_s = torch.empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.long)
        for g_start in range(0, n_g, gallery_chunk_size):
            sim = q @ gallery_feats[g_start:g_start + gallery_chunk_size].float().T  # (q, g)
            if q_codes is not None:
                same = q_codes[start:start + chunk_size, None] == g_codes[None, g_start:g_start + sim.shape[1]]
                sim.masked_fill_(same, float("-inf"))
            s, i = _block_topk(sim, k)
            best_s, best_i = _merge_ranked(best_s, best_i, s, i + g_start, k)
        scores.append(best_s)
        indices.append(best_i)
    return torch.cat(scores), torch.cat(indices)


def _block_topk(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top min(k, columns) of each row of a score block, best first, ties by lower column. torch.topk
    may keep any of several equal scores at the cut: rows where a tie straddles it are redone
    with a stable sort, so the result always equals a full stable sort's first k."""
    k = min(k, sim.shape[1])
    if k == 0:
        return sim[:, :0], torch.empty(sim.shape[0], 0, dtype=torch.long)
    if 4 * k >= sim.shape[1]:
        s, i = torch.sort(sim, dim=1, descending=True, stable=True)
        return s[:, :k], i[:, :k]
    s, i = torch.topk(sim, k + 1, dim=1)  # (q, k + 1): the extra one is the best score left out
    straddles = s[:, k] == s[:, k - 1]  # a score equal to the k-th was left out: a tie at the cut
    s, i = _ties_by_lower_index(s[:, :k], i[:, :k])
    if straddles.any():
        rows = straddles.nonzero().squeeze(1)
        rs, ri = torch.sort(sim[rows], dim=1, descending=True, stable=True)
        s[rows], i[rows] = rs[:, :k], ri[:, :k]
    return s, i


def _ties_by_lower_index(s: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row of (scores, indices) best first, equal scores by lower index: sort by index,
    then a stable sort by score."""
    i, order = i.sort(dim=1)
    s, order = torch.sort(s.gather(1, order), dim=1, descending=True, stable=True)
    return s, i.gather(1, order)


def _merge_ranked(s1: torch.Tensor, i1: torch.Tensor, s2: torch.Tensor, i2: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two ranked lists per row (each best first, ties by lower index; every index in the
    first below every index in the second) into the best k."""
    s, i = torch.cat([s1, s2], dim=1), torch.cat([i1, i2], dim=1)
    s, order = torch.sort(s, dim=1, descending=True, stable=True)
    return s[:, :k], i.gather(1, order)[:, :k]


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "FAISS is not installed: `pip install faiss-cpu` (or faiss-gpu on a CUDA machine), or search "
            "exactly with utils.cosine_topk(..., index=None)."
        ) from e
    return faiss


def faiss_index(
    gallery_feats: torch.Tensor,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int = 32,
    seed: int = 0,
) -> object:
    """A FAISS inner-product index (a faiss.Index) over L2-normalised gallery rows [G, D] (cosine =
    inner product), for utils.cosine_topk(..., index=...). FAISS is imported here, only when asked for.

    kind="flat": exact (IndexFlatIP), a copy of the gallery. kind="ivf": IndexIVFFlat, approximate:
    k-means cells (nlist, default about 4 sqrt(G), at most 1024, trained on a seeded sample of
    64 rows per cell) of which `nprobe` are scanned per query; for galleries beyond ~100k images,
    where an exact scan costs G x D multiply-adds per query.
    """
    faiss = _import_faiss()
    x = np.ascontiguousarray(gallery_feats.detach().float().cpu().numpy())  # (G, D)
    n, dim = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or int(np.clip(4 * math.sqrt(n), 1, min(1024, max(1, n // 39))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = np.random.default_rng(seed).choice(n, size=min(n, 64 * nlist), replace=False)
        index.train(x[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"kind={kind!r}: use 'flat' (exact) or 'ivf' (approximate, large galleries).")
    index.add(x)
    return index


def _faiss_topk(index, query_feats: torch.Tensor, n_g: int, k: int, q_codes: torch.Tensor | None,
                g_codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cosine_topk through a FAISS index: asks for as many extra items as a query can exclude, drops
    the excluded ones, and orders equal scores by lower index, as the exact search does."""
    if index.ntotal != n_g:
        raise ValueError(f"the FAISS index holds {index.ntotal} rows but the gallery has {n_g}: build it with "
                         "utils.faiss_index(gallery_feats).")
    extra = int(torch.bincount(g_codes).max()) if g_codes is not None and len(g_codes) else 0
    q = np.ascontiguousarray(query_feats.detach().float().cpu().numpy())  # (Q, D)
    if len(q) == 0 or k == 0:
        return torch.empty(len(q), k), torch.empty(len(q), k, dtype=torch.long)
    s, i = index.search(q, min(k + extra, n_g))  # (Q, k + extra), best first
    s, i = torch.from_numpy(s), torch.from_numpy(i.astype(np.int64))
    drop = i < 0
    if q_codes is not None:
        drop |= q_codes[:, None] == g_codes[i.clamp(min=0)]
    s = s.masked_fill(drop, float("-inf"))
    i = i.masked_fill(drop, n_g)  # sorts after every real index among equal scores
    s, i = _ties_by_lower_index(s, i)
    s, i = s[:, :k], i[:, :k]
    return s, i.masked_fill(i == n_g, -1)


def _relevant_sets(relevant: Sequence[int | Iterable[int]]) -> list[set[int]]:
    return [{int(r)} if isinstance(r, (int, np.integer)) else {int(x) for x in r} for r in relevant]


def retrieval_hits(ranked: torch.Tensor | np.ndarray, relevant: Sequence[int | Iterable[int]]) -> np.ndarray:
    """[Q, K] bool: ranked[q, j] is relevant to query q. relevant[q]: one gallery index or several."""
    ranked = np.asarray(ranked)
    sets = _relevant_sets(relevant)
    if len(sets) != len(ranked):
        raise ValueError(f"{len(ranked)} rankings but {len(sets)} relevance entries: give one per query.")
    hits = [[int(g) in s for g in row] for row, s in zip(ranked, sets)]
    return np.array(hits, dtype=bool).reshape(ranked.shape)


def recall_at_k(ranked: torch.Tensor | np.ndarray, relevant: Sequence[int | Iterable[int]], k: int) -> float:
    """Fraction of queries with a relevant item in their top k (Track 2/3 Recall@k). A query with no
    relevant item counts as a miss: drop such queries first if they should not count."""
    return float(retrieval_hits(ranked, relevant)[:, :k].any(axis=1).mean())


def mean_reciprocal_rank(ranked: torch.Tensor | np.ndarray, relevant: Sequence[int | Iterable[int]]) -> float:
    """Mean over queries of 1 / rank of the first relevant item in the ranking (0 when none is in it;
    so MRR@K for rankings of length K). Ranks follow the ranking given (cosine_topk: ties by index)."""
    hits = retrieval_hits(ranked, relevant)
    first = hits.argmax(axis=1)
    return float(np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0).mean())


def retrieval_metrics(
    ranked: torch.Tensor | np.ndarray, relevant: Sequence[int | Iterable[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """{"R@1": ..., "R@5": ..., "MRR": ...} for one ranking."""
    recalls = {f"R@{k}": recall_at_k(ranked, relevant, k) for k in ks}
    return {**recalls, "MRR": mean_reciprocal_rank(ranked, relevant)}


def rerank_by_region(
    scores: torch.Tensor,
    indices: torch.Tensor,
    query_region_probs: torch.Tensor,
    gallery_region_probs: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-region agreement re-ranking of each query's shortlist: score + beta * P(same region),
    P = sum_c p_query[c] * p_candidate[c] from the coarse prototype classifier (true i2i partners share
    the region but often not the side/state). Returns the shortlist re-sorted (a permutation of each
    row; ties keep the previous order)."""
    agree = (query_region_probs[:, None, :] * gallery_region_probs[indices]).sum(-1)  # (Q, K)
    new_scores = scores + beta * agree
    order = torch.sort(new_scores, dim=1, descending=True, stable=True).indices
    return new_scores.gather(1, order), indices.gather(1, order)


def alpha_query_expansion(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    scores: torch.Tensor,
    indices: torch.Tensor,
    n: int,
    alpha: float = 3.0,
) -> torch.Tensor:
    """alpha-QE (Radenovic et al., TPAMI 2019): q' = normalise(q + sum_{i<n} max(s_i, 0)^alpha g_i) over
    the query's top-n neighbours of a first search (self already excluded). [Q, D]; n=0 gives q.
    Search again with cosine_topk(q', gallery, ...) and the same exclusion."""
    w = scores[:, :n].clamp(min=0) ** alpha  # (Q, n)
    expanded = query_feats + (w[:, :, None] * gallery_feats[indices[:, :n]]).sum(1)
    return F.normalize(expanded, dim=-1)


def choose_rerank_beta(
    scores: torch.Tensor,
    indices: torch.Tensor,
    query_region_probs: torch.Tensor,
    gallery_region_probs: torch.Tensor,
    relevant: Sequence[int | Iterable[int]],
    betas: Sequence[float] = RERANK_BETA_GRID,
) -> tuple[float, pd.DataFrame]:
    """Region re-ranking boost chosen on validation pairs: best R@1, then MRR, then the smallest beta.
    Uses only the shortlists and relevance given. Returns (beta, table of R@1/R@5/MRR per beta)."""
    rows = []
    for beta in sorted(betas):
        _, ranked = rerank_by_region(scores, indices, query_region_probs, gallery_region_probs, beta)
        rows.append({"beta": float(beta), **retrieval_metrics(ranked, relevant, ks=(1, 5))})
    table = pd.DataFrame(rows)
    best = table.sort_values(["R@1", "MRR"], ascending=False, kind="stable").iloc[0]
    return float(best["beta"]), table


def choose_query_expansion(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    relevant: Sequence[int | Iterable[int]],
    ns: Sequence[int] = (0, 1, 2, 3, 5),
    alpha: float = 3.0,
    k: int = 10,
    exclude_self: bool = False,
    query_ids: Sequence | None = None,
    gallery_ids: Sequence | None = None,
) -> tuple[int, pd.DataFrame]:
    """Number of alpha-QE neighbours chosen on validation pairs (n=0: no expansion): best R@1, then
    MRR, then the smallest n. Returns (n, table of R@1/R@5/MRR per n)."""
    search = dict(exclude_self=exclude_self, query_ids=query_ids, gallery_ids=gallery_ids)
    scores, indices = cosine_topk(query_feats, gallery_feats, max(k, *ns), **search)
    rows = []
    for n in sorted(ns):
        expanded = alpha_query_expansion(query_feats, gallery_feats, scores, indices, n, alpha)
        _, ranked = cosine_topk(expanded, gallery_feats, k, **search)
        rows.append({"n": int(n), **retrieval_metrics(ranked, relevant, ks=(1, 5))})
    table = pd.DataFrame(rows)
    best = table.sort_values(["R@1", "MRR"], ascending=False, kind="stable").iloc[0]
    return int(best["n"]), table


def split_finding_lines(description: str) -> list[str]:
    """A description's finding lines (split on \\r\\n / \\n / \\r), stripped, empties dropped."""
    lines = (line.strip(" \t-\u2022") for line in re.split(r"\r\n|\r|\n", description or ""))
    return [line for line in lines if line]


def i2i_eval_set(i2i: pd.DataFrame) -> tuple[list[str], list[int], list[set[int]]]:
    """Track 2 evaluation from annotated pairs: the gallery is every image of the pairs (as the
    test's query set is its own gallery); each pair's query is a query, its match relevant.
    Returns (gallery_paths, query_rows into the gallery, relevant row sets)."""
    gallery = sorted(set(i2i["query_path"]) | set(i2i["match_path"]))
    row = {p: i for i, p in enumerate(gallery)}
    relevant: dict[int, set[int]] = defaultdict(set)
    for q, m in zip(i2i["query_path"], i2i["match_path"]):
        if q != m:
            relevant[row[q]].add(row[m])
    queries = sorted(relevant)
    return gallery, queries, [relevant[q] for q in queries]


def evaluate_i2i(feats: Mapping[str, torch.Tensor], region_probs: torch.Tensor, queries: Sequence[int],
                 relevant: Sequence[set[int]], held_out: Sequence[int], k: int = 10) -> tuple[pd.DataFrame, dict]:
    """Track 2 on annotated pairs for each candidate embedding {name: [G, D]} of one gallery.

    Plain cosine ranking (the query itself excluded) and region re-ranking (region_probs [G, C]),
    whose beta is chosen on the `held_out` pairs (positions into `queries`: pairs no model trained
    on); the embedding is then chosen on the same pairs by R@1, then MRR. Those rows are therefore
    optimistic, the "all pairs" rows include training images. Returns (table: embedding, pairs,
    ranking, n, R@1, R@5, R@10, MRR; choice: embedding, beta, ranked [Q, k] of the chosen one).
    """
    queries = list(queries)
    choose_on = list(held_out) or list(range(len(queries)))
    query_region = region_probs[queries]  # (Q, C), the same for every embedding
    rows, ranked_by = [], {}
    for name, f in feats.items():
        scores, ranked = cosine_topk(f[queries], f, k=k, query_ids=queries, gallery_ids=range(len(f)))
        beta, _ = choose_rerank_beta(scores[choose_on], ranked[choose_on], query_region[choose_on],
                                     region_probs, [relevant[i] for i in choose_on])
        reranked = rerank_by_region(scores, ranked, query_region, region_probs, beta)[1]
        ranked_by[name] = (beta, reranked)
        for subset, idx in (("held-out pairs (choice)", choose_on), ("all pairs", list(range(len(queries))))):
            for variant, r in (("plain", ranked), ("region re-rank", reranked)):
                rows.append({"embedding": name, "pairs": subset, "ranking": variant, "beta": beta if variant != "plain" else 0.0,
                             "n": len(idx), **retrieval_metrics(r[idx], [relevant[i] for i in idx])})
    table = pd.DataFrame(rows)
    pick = table[(table.pairs == "held-out pairs (choice)") & (table.ranking == "region re-rank")]
    best = pick.sort_values(["R@1", "MRR"], ascending=False, kind="stable").iloc[0]
    beta, ranked = ranked_by[best.embedding]
    return table, {"embedding": best.embedding, "beta": beta, "ranked": ranked}


def description_queries(descriptions: Sequence[str]) -> tuple[list[str], list[set[int]]]:
    """Track 3 evaluation from the public set: every distinct finding line of the English
    descriptions is a query, and every image (index into `descriptions`) carrying it is relevant.
    Lines are deduplicated case- and space-insensitively and without end punctuation; the first
    spelling seen is kept as the query text."""
    relevant: dict[str, set[int]] = {}
    spelling: dict[str, str] = {}
    for i, text in enumerate(descriptions):
        for line in split_finding_lines(text):
            key = re.sub(r"\s+", " ", line.casefold()).strip(" .,;:")
            spelling.setdefault(key, line)
            relevant.setdefault(key, set()).add(i)
    return [spelling[k] for k in relevant], list(relevant.values())


def text_to_image(
    model: torch.nn.Module,
    tokenizer: Callable,
    texts: Sequence[str],
    image_feats: torch.Tensor,
    device: str | torch.device,
    k: int = 10,
    amp_dtype: str | torch.dtype | None = "auto",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Track 3: embed `texts` and rank the gallery `image_feats` [G, D]: (scores, indices) [T, k]."""
    text_feats = embed_texts(model, tokenizer, texts, device, amp_dtype=amp_dtype)  # (T, D)
    return cosine_topk(text_feats, image_feats, k, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------
# 9.2 BiomedCLIP plots
# ---------------------------------------------------------------------------------------------

def plot_retrieval_gallery(
    query_paths: Sequence[str | os.PathLike],
    ranked_paths: Sequence[Sequence[str | os.PathLike]],
    hits: np.ndarray,
    k: int = 5,
    scores: np.ndarray | None = None,
) -> Figure:
    """One row per query: the query (blue frame) then its top-k, relevant ones framed green, others red.
    hits: [Q, >=k] bool (retrieval_hits); scores: optional [Q, >=k] shown above each candidate."""
    n_q = len(query_paths)
    fig, axes = plt.subplots(n_q, k + 1, figsize=(2.0 * (k + 1), 2.1 * n_q), squeeze=False)
    for q in range(n_q):
        _show_framed(axes[q, 0], query_paths[q], "tab:blue", "query")
        for j in range(k):
            title = f"#{j + 1}" + ("" if scores is None else f"  {float(scores[q][j]):.3f}")
            _show_framed(axes[q, j + 1], ranked_paths[q][j], "tab:green" if hits[q][j] else "tab:red", title)
    fig.tight_layout()
    return fig


def _show_framed(ax: plt.Axes, path: str | os.PathLike, color: str, title: str) -> None:
    ax.imshow(load_thumbnail(path, 256))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(4)
    ax.set_title(title, fontsize=8)


def plot_embedding_projection(
    feats: torch.Tensor | np.ndarray,
    labels: Sequence[int],
    label_names: Sequence[str],
    protos: torch.Tensor | np.ndarray | None = None,
    proto_names: Sequence[str] | None = None,
    method: str = "pca",
    seed: int = 0,
) -> Figure:
    """2-D projection of embeddings coloured by class, prototypes as labelled stars.

    method "pca" (fit on the images, prototypes projected with it) or "tsne" (fit on images and
    prototypes together, `seed` fixes it)."""
    x = np.asarray(feats, dtype=np.float64)
    p = np.zeros((0, x.shape[1])) if protos is None else np.asarray(protos, dtype=np.float64)
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(x)
        xy, pxy = pca.transform(x), pca.transform(p) if len(p) else np.zeros((0, 2))
    elif method == "tsne":
        both = np.concatenate([x, p])
        tsne = TSNE(2, perplexity=min(30.0, len(both) - 1.0), random_state=seed, init="pca")
        xy_all = tsne.fit_transform(both)
        xy, pxy = xy_all[: len(x)], xy_all[len(x):]
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', not {method!r}")
    palette = sns.color_palette("tab10", len(label_names))
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for c, name in enumerate(label_names):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=12, alpha=0.7, color=palette[c], label=f"{name} (n={m.sum()})")
    names = proto_names or [f"proto {i}" for i in range(len(pxy))]
    for i, (px, py) in enumerate(pxy):
        color = palette[i] if len(pxy) == len(label_names) else "black"
        ax.scatter(px, py, marker="*", s=320, color=color, edgecolor="black", linewidth=1.0, zorder=3)
        ax.annotate(names[i], (px, py), xytext=(5, 5), textcoords="offset points", fontsize=8, weight="bold")
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    return fig
