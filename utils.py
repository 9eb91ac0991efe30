"""Helpers for the ENTRep prototypical + DINOv2 pipeline (entrep-prototypical.ipynb).

Pure, explicit helpers: every function takes what it uses (model, device, paths, seed) as
arguments; nothing happens at import time. Sections follow the notebook's order:

1. Constants            label ids, coarse regions, fine decisions
2. Images               decoding any pixel mode to RGB, content hashes
3. Data                 finding and loading every ENTRep layout, problems, leakage, split
4. Demo data            the synthetic ENTRep-shaped data set (never real data)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import unicodedata
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps
import operator
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold

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


def file_sha1(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-1 of a file's bytes: the identity used for leakage checks and caches."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    """Accumulates rows and problems while annotation files are read."""

    def __init__(self, root: Path, check_images: bool):
        self.index = FileIndex.build(root)
        self.check_images = check_images
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
            info = {"sha1": file_sha1(path)}
            error = ""
            if self.check_images:
                try:
                    im = load_rgb(path)
                    info.update(width=im.width, height=im.height)
                except ImageDecodeError as e:
                    error = str(e)
            self._image_status[path] = (error, info)
        return self._image_status[path]


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


def load_entrep(root: str | os.PathLike, check_images: bool = True, strict_labels: bool = False) -> EntrepData:
    """Find and load every ENTRep layout under `root` (see ENTREP.md "Data layouts seen").

    Train release (cls/i2i/t2i.json), public release (data.json), test query lists
    (cls/i2i/t2i.csv) and class-folder trees are read wherever they sit; image files are found by
    name anywhere under root, case-insensitively. Nothing is dropped silently: every referenced
    image is in `inventory` as loaded or skipped with a reason, and each problem has a message
    naming the file and the fix. With strict_labels, an unknown label raises instead.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_path '{root}' is not a folder. Point data_path at the unpacked ENTRep "
                                "data, or use data_path='demo' for the synthetic demo set.")
    col = _Collector(root, check_images)
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


def split_train_val(images: pd.DataFrame, i2i: pd.DataFrame, val_fraction: float = 0.15,
                    seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, label-stratified train/validation split by group (see split_groups).

    Returns (train_index, val_index) as positions into `images`. scikit-learn's
    StratifiedGroupKFold with round(1/val_fraction) folds; the first fold is validation.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / val_fraction))
    groups = split_groups(images, i2i)
    labels = images["label_id"].to_numpy()
    min_count = np.bincount(labels).max() if len(labels) else 0
    if len(images) < n_splits or min_count < 2:
        raise ValueError(f"{len(images)} labelled images are too few for a {val_fraction:.0%} validation split.")
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than folds; that class then sits on one side.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train_idx, val_idx = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return np.sort(train_idx), np.sort(val_idx)


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
    for name in rng.permutation(sorted(views))[:n_t2i]:
        t2i.setdefault(demo_caption(views[name])[0], str(name))

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

DEMO_VERSION = 1  # bump when make_demo_dataset changes, so a cached demo set is rebuilt


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
                im = load_rgb(pick.iloc[c]["path"])
                im.thumbnail((thumb, thumb))
                ax.imshow(im)
        axes[r][0].set_title(lab, loc="left", fontsize=9)
    fig.tight_layout()
    return fig


# =============================================================================================
# 8. Hybrid inference, metrics, result plots and submissions
# =============================================================================================

# =============================================================================================
# Hybrid inference
# =============================================================================================

# A fine head's p(second label of FINE_TASKS[region]) above this picks the second label; exactly
# 0.5 picks the first, as argmax over [1 - p, p] does (the paper's binary heads: sigmoid at 0.5).
FINE_DECISION_THRESHOLD: float = 0.5

# Coarse region id of each official label id, from LABEL_TO_COARSE: (1, 1, 0, 0, 2, 2, 3).
LABEL_ID_TO_COARSE_ID: tuple[int, ...] = tuple(COARSE_TO_ID[LABEL_TO_COARSE[name]] for name in LABELS)

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


# =============================================================================================
# Choosing the threshold / weight on validation (cross-fitted)
# =============================================================================================


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
    """(N,) fold id in 0..n_splits-1 per sample: scikit-learn's StratifiedKFold, shuffled with `seed`."""
    y_true = np.asarray(y_true)
    fold_of = np.empty(len(y_true), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(y_true)), y_true)):
        fold_of[held_out] = k
    return fold_of


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


# =============================================================================================
# Metrics
# =============================================================================================


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


# =============================================================================================
# Result plots (each returns a matplotlib Figure; the notebook saves / shows it)
# =============================================================================================


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
            image = load_rgb(paths[i])
            image.thumbnail((320, 320))
            ax.imshow(np.asarray(image))
        except (ImageDecodeError, FileNotFoundError) as e:
            ax.text(0.5, 0.5, f"cannot load\n{Path(paths[i]).name}\n{type(e).__name__}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{label_names[y_true[i]]} / {label_names[y_pred[i]]}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"misclassified (true / pred): {len(shown)} of {len(wrong)} shown")
    return fig


# =============================================================================================
# Submissions (ENTREP.md "Submission files": each zip holds exactly one .json at its root)
# =============================================================================================

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
