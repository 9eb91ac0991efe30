"""The SYNTHETIC demo data set: drawn shapes in the official ENTRep file layouts, never real data.

Not part of the method: `data_path="demo"`, the tests and `make demo` import it so the whole pipeline
runs offline. Numbers measured on it only show that the pipeline works.

    demo_data.ensure_demo_dataset(folder, seed)   # made once per (seed, DEMO_VERSION), then reused
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from utils import FINE_TASKS, LABEL_TO_COARSE, LABELS

DEMO_VERSION = 5  # bump when make_demo_dataset changes, so a cached demo set is rebuilt
DEMO_NOTICE = ("SYNTHETIC DEMO DATA made by demo_data.make_demo_dataset: drawn shapes, not endoscopy. "
               "No real ENTRep image or annotation is in it; numbers on it say nothing about the method.")

# Visible findings drawn per region: English phrasings, and a Vietnamese gloss for the synthetic public-release
# descriptions (wording modelled on ENTREP.md's caption examples). A phrasing may name the side the image shows
# ({side}, ear and nose) and the drawn size of the finding ({size}: "small ", "large " or nothing), so that, as in
# the real release, many finding lines are rare and some are carried by held-out images only.
DEMO_FINDINGS: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "ear": {"perforation": (("a {size}perforated tympanic membrane", "a {size}perforation of the {side} eardrum",
                             "{side} tympanic membrane with a {size}perforation", "{size}eardrum perforation, {side}"),
                            "Thủng màng nhĩ"),
            "intact": (("the tympanic membrane is intact", "an intact {side} eardrum", "{side} eardrum intact",
                        "normal {side} tympanic membrane"), "Màng nhĩ nguyên vẹn"),
            "wax": (("{size}wax in the ear canal", "{size}wax in the {side} ear canal",
                     "{size}cerumen in the {side} ear", "{side} ear canal with {size}wax"), "Ráy tai trong ống tai")},
    "nose": {"spur": (("a {size}spur on the septum", "a {size}septal spur on the {side}", "{side} {size}septal spur",
                       "{size}bony spur of the {side} septum"), "Gai vách ngăn"),
             "polyp": (("a {size}polyp in the middle meatus", "a {size}polyp in the {side} middle meatus",
                        "{side} {size}nasal polyp", "{size}polyp, {side} nasal cavity"), "Polyp khe giữa"),
             "mucus": (("{size}mucus in the nasal cavity", "{size}mucus in the {side} nasal cavity",
                        "{size}discharge in the {side} nose", "{side} nasal cavity with {size}mucus"),
                       "Dịch nhầy trong hốc mũi")},
    "vc": {"open": (("the vocal cords are open", "an open glottis", "vocal folds abducted"), "Dây thanh mở"),
           "closed": (("incomplete glottic closure", "the glottis is closed", "vocal folds adducted"),
                      "Thanh môn đóng không kín"),
           "nodule": (("a {size}nodule on the vocal fold", "a {size}vocal fold nodule", "{size}nodule of the cord"),
                      "Hạt xơ dây thanh"),
           "red": (("red swollen vocal folds", "reddened vocal cords", "inflamed vocal folds"),
                   "Dây thanh phù nề, sung huyết")},
    "throat": {"tonsils": (("{size}enlarged tonsils", "{size}tonsillar hypertrophy", "{size}swollen tonsils"),
                           "Amidan quá phát"),
               "patches": (("{size}white patches on the tonsils", "{size}white spots on the tonsils",
                            "tonsils with {size}exudate"), "Mảng trắng trên amidan"),
               "normal": (("a normal oropharynx", "the throat looks normal", "unremarkable oropharynx"),
                          "Họng bình thường")},
}

# Class proportions of the real train release (cls.json counts, ENTREP.md).
REAL_CLS_COUNTS = {"nose-right": 325, "nose-left": 290, "vc-open": 159, "ear-right": 156,
                   "vc-closed": 147, "ear-left": 133, "throat": 81}
DEMO_SIZE = (640, 480)  # the real frames' size


def ensure_demo_dataset(root: str | os.PathLike, seed: int) -> Path:
    """The demo set under `root`, written once per (seed, DEMO_VERSION) and reused afterwards."""
    root = Path(root)
    stamp, want = root / "demo_stamp.json", {"seed": seed, "version": DEMO_VERSION}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(root, ignore_errors=True)
        make_demo_dataset(root, seed=seed)
        stamp.write_text(json.dumps(want))
    return root


def demo_exam(region: str, rng: np.random.Generator) -> dict:
    """A synthetic examination: one patient's look (tint, texture) and findings in one region."""
    f = {
        "ear": lambda: {"perforation": rng.random() < 0.35, "wax": rng.random() < 0.3},
        "nose": lambda: {"spur": rng.random() < 0.4, "polyp": rng.random() < 0.3, "mucus": rng.random() < 0.3},
        "vc": lambda: {"nodule": rng.random() < 0.3, "red": rng.random() < 0.3},
        "throat": lambda: {"tonsils": rng.random() < 0.5, "patches": rng.random() < 0.3},
    }[region]()
    return {"region": region, "findings": f, "size": float(rng.uniform(0.7, 1.3)),  # the findings' drawn size
            "tint": rng.uniform(0.8, 1.15, 3).tolist(), "texture_seed": int(rng.integers(2**31)),
            "anatomy": rng.uniform(-1, 1, 6).tolist()}


def demo_view(exam: dict, label: str, rng: np.random.Generator) -> dict:
    """One view of an examination: label (side/state), pose, blur, noise and glare of this shot, and how its
    findings are worded."""
    assert LABEL_TO_COARSE[label] == exam["region"], (label, exam["region"])
    return {**exam, "label": label, "angle": float(rng.uniform(-25, 25)), "scale": float(rng.uniform(0.85, 1.15)),
            "shift": rng.uniform(-30, 30, 2).tolist(), "blur": float(rng.uniform(0, 2.2)),
            "noise": float(rng.uniform(2, 10)), "noise_seed": int(rng.integers(2**31)),
            "glare": rng.uniform(0, 1, (int(rng.integers(0, 4)), 3)).tolist(),
            "gap": float(rng.uniform(0.55, 1.0) if label == "vc-open" else rng.uniform(0.0, 0.12)),
            "phrasing": int(rng.integers(2**31))}


def render_demo_image(view: dict) -> Image.Image:
    """Draw a 640x480 synthetic endoscopy frame for a view (see demo_view).

    Ear and nose are drawn as the right side; a left label is the exact mirror of the same
    scene, so a horizontal flip with a left<->right label swap is valid by construction.
    """
    w, h = DEMO_SIZE
    a = np.asarray(view["anatomy"])
    tint = np.asarray(view["tint"])
    tex_rng = np.random.default_rng(view["texture_seed"])
    base_rgb = {"ear": (150, 95, 80), "nose": (205, 120, 115), "vc": (170, 80, 85),
                "throat": (200, 85, 80)}[view["region"]]
    noise = (tex_rng.uniform(0.75, 1.15, (12, 16)) * 255 / 1.15).astype(np.uint8)
    texture = Image.fromarray(noise).resize((w, h), Image.BICUBIC)
    canvas = ImageChops.multiply(texture.convert("RGB"), Image.new("RGB", (w, h), _tinted(base_rgb, tint)))
    draw = ImageDraw.Draw(canvas)
    {"ear": _draw_ear, "nose": _draw_nose, "vc": _draw_vc, "throat": _draw_throat}[view["region"]](draw, view, a, tint)
    # Pose: rotation, scale and shift of the scene inside the fixed field of view.
    canvas = canvas.rotate(view["angle"], resample=Image.BILINEAR, translate=tuple(view["shift"]),
                           fillcolor=_tinted(base_rgb, tint * 0.8))
    s = view["scale"]
    cw, ch = int(w / s), int(h / s)
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    canvas = canvas.crop(box).resize((w, h), Image.BILINEAR)
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
    cx, cy, z = 320 + 15 * a[0], 240 + 10 * a[1], v["size"]
    rx, ry = 150 + 15 * a[2], 125 + 12 * a[3]
    d.ellipse((cx - rx - 30, cy - ry - 30, cx + rx + 30, cy + ry + 30), fill=_tinted((120, 70, 60), tint))
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_tinted((190, 175, 165), tint))
    d.line((cx - 35, cy - ry + 20, cx + 5, cy + 5), fill=_tinted((235, 225, 200), tint), width=14)  # malleus
    d.polygon([(cx + 10, cy + 15), (cx + rx * 0.75, cy + ry * 0.45), (cx + rx * 0.55, cy + ry * 0.75)],
              fill=(245, 245, 235))  # cone of light, anterior-inferior
    if v["findings"]["perforation"]:
        px, py = cx - rx * 0.35 + 20 * a[4], cy + ry * 0.3
        d.ellipse((px - 38 * z, py - 30 * z, px + 38 * z, py + 30 * z), fill=(40, 10, 10))
    if v["findings"]["wax"]:
        for k in range(3):
            wx, wy = cx + (rx + 10) * np.cos(2.0 + k * 0.7 + a[5]), cy + (ry + 10) * np.sin(2.0 + k * 0.7 + a[5])
            d.ellipse((wx - 25 * z, wy - 18 * z, wx + 25 * z, wy + 18 * z), fill=(120, 80, 20))


def _draw_nose(d: ImageDraw.ImageDraw, v: dict, a: np.ndarray, tint: np.ndarray) -> None:
    """Right nasal cavity: septum wall on the image's left, turbinates on the right, dark airway between."""
    sx, z = 230 + 20 * a[0], v["size"]
    d.polygon([(0, 0), (sx, 0), (sx - 30, 480), (0, 480)], fill=_tinted((215, 140, 135), tint))  # septum
    d.polygon([(sx, 40), (sx + 110, 30), (sx + 70, 460), (sx - 25, 470)], fill=(35, 12, 12))  # airway
    d.ellipse((sx + 80, 210 + 20 * a[1], 660, 470), fill=_tinted((200, 105, 105), tint))  # inferior turbinate
    d.ellipse((sx + 110, 20, 620, 190 + 15 * a[2]), fill=_tinted((190, 100, 100), tint))  # middle turbinate
    if v["findings"]["spur"]:
        d.polygon([(sx - 20, 265 - 35 * z), (sx + (60 + 10 * a[3]) * z, 265), (sx - 25, 265 + 35 * z)],
                  fill=_tinted((240, 175, 165), tint))
    if v["findings"]["polyp"]:
        d.ellipse((sx + 110 - 40 * z, 195 - 45 * z, sx + 110 + 40 * z, 195 + 45 * z), fill=(205, 200, 185))
    if v["findings"]["mucus"]:
        d.line((sx + 20, 80, sx + 40 + 20 * a[4], 420), fill=(230, 225, 150), width=round(9 * z))


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
        z = v["size"]
        d.ellipse((nx - 12 * z, ny - 10 * z, nx + 6 * z, ny + 10 * z), fill=(255, 255, 250))


def _draw_throat(d: ImageDraw.ImageDraw, v: dict, a: np.ndarray, tint: np.ndarray) -> None:
    """Oropharynx: dark cavity, uvula from the soft palate, tonsils either side, tongue below."""
    cx = 320 + 10 * a[0]
    d.ellipse((cx - 120, 120, cx + 120, 380), fill=(60, 15, 15))  # pharynx
    d.rounded_rectangle((cx - 22, 40, cx + 22, 210 + 20 * a[1]), radius=20, fill=_tinted((215, 100, 95), tint))
    z = v["size"]
    r = 70 * z if v["findings"]["tonsils"] else 40
    for side in (-1, 1):
        tx = cx + side * (150 - r * 0.4)
        d.ellipse((tx - r, 240 - r, tx + r, 240 + r), fill=_tinted((220, 90, 85), tint))
        if v["findings"]["patches"]:
            d.ellipse((tx - 15 * z, 237 - 12 * z, tx + 12 * z, 237 + 12 * z), fill=(245, 245, 225))
    d.ellipse((cx - 260, 360 + 15 * a[2], cx + 260, 640), fill=_tinted((225, 125, 120), tint))  # tongue


def _tinted(rgb: tuple[int, int, int], tint: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(min(255, c * t)) for c, t in zip(rgb, tint))


def demo_findings(view: dict) -> list[tuple[str, str]]:
    """(English, Vietnamese) finding lines that match what the view shows, one per finding, each worded by one of
    its phrasings (drawn from the view's "phrasing" seed): the side the image shows, the drawn size."""
    region, f = view["region"], view["findings"]
    if region == "ear":
        keys = ["perforation" if f["perforation"] else "intact"] + (["wax"] if f["wax"] else [])
    elif region == "nose":
        keys = [k for k in ("spur", "polyp", "mucus") if f[k]] or ["mucus"]
    elif region == "vc":
        keys = [k for k in ("nodule", "red") if f[k]] + ["open" if view["label"] == "vc-open" else "closed"]
    else:
        keys = [k for k in ("tonsils", "patches") if f[k]] or ["normal"]
    rng = np.random.default_rng(view["phrasing"])
    size = "small " if view["size"] < 0.85 else "large " if view["size"] > 1.15 else ""
    side = view["label"].rsplit("-", 1)[-1]  # left / right for ear and nose
    lines = []
    for k in keys:
        phrasings, vi = DEMO_FINDINGS[region][k]
        lines.append((phrasings[rng.integers(len(phrasings))].format(side=side, size=size), vi))
    return lines


def demo_caption(view: dict) -> str:
    """A t2i caption of the view: its first finding line (1-8 words, as the real captions)."""
    return demo_findings(view)[0][0]


def _demo_labels(n: int, rng: np.random.Generator) -> list[str]:
    """n labels drawn with the real train release's class proportions."""
    p = np.array([REAL_CLS_COUNTS[lab] for lab in LABELS], dtype=float)
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


def _write_lines(lines: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")


def make_demo_dataset(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 190, n_public: int = 160,
                      n_test: int = 60, n_i2i_pairs: int = 90, n_t2i: int = 160, n_unlisted: int = 12,
                      n_i2i_test: int = 24, workers: int | None = None) -> Path:
    """Write the synthetic demo set in the official layouts under out_dir and return its root.

    Layout (as the real releases, see ENTREP.md):
      train/imgs/<uuid4>.png + train/cls.json, train/i2i.json, train/t2i.json
      public/images/<8>_<18>_<3>_imageNN.png + public/data.json (one `_Image` case defect)
      PublicData/PublicTest/*.png with Track1_Public/cls.csv, Track2_Public/i2i.csv, Track3_Public/t2i.csv
    i2i pairs are two views of one examination; about half of the i2i images carry no cls label;
    one i2i target exists only in the test folder, one i2i query is missing; two test images are
    byte copies of train images (leakage). The Track 2 test list holds `n_i2i_test` examinations' two views,
    but only one view of the last four. As in the real test release, the test folder also holds images no
    list names (ENTREP.md "retrieval database"): those four partners and `n_unlisted` other views. The
    defaults make a test folder of about 4 images per Track 2 query, as the real one, and enough held-out
    pairs and finding lines (n_i2i_pairs, n_public, n_t2i) for the notebook's out-of-fold retrieval choice.
    All randomness is drawn up front from `seed`, so the same seed writes the same bytes whatever the
    number of render workers.
    """
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
        for name in ((), (a,), (b,), (a, b))[k % 4]:  # half of the i2i images carry a cls label (ENTREP.md)
            cls[name] = views[name]["label"]
        pairs.append((a, b))
    moved = pairs[0][1]  # an i2i target that sits only in the test folder, as in the real release
    cls.pop(moved, None)
    i2i["missing-0000.png"] = pairs[1][0]  # a one-way entry whose query file is absent: reported
    jobs += [(v, (test_dir if n == moved else imgs) / n) for n, v in views.items()]
    for name in rng.permutation(sorted(n for pair in pairs for n in pair if n != moved))[:n_t2i]:
        t2i.setdefault(demo_caption(views[name]), str(name))  # captions point at i2i images, as in the real set

    # Test release: Track 1 images; Track 2 queries are views of new examinations (both views
    # listed for some, only one for others: its partner sits unlisted in the folder); Track 3 captions.
    test_cls = []
    for label in _demo_labels(n_test, rng):
        test_cls.append(new_name())
        jobs.append((new_view(label), test_dir / test_cls[-1]))
    test_i2i = []
    for k, label in enumerate(_demo_labels(n_i2i_test, rng)):
        for j, view in enumerate(exam_pair(label)):
            name = new_name()
            jobs.append((view, test_dir / name))
            if k < n_i2i_test - 4 or j == 0:
                test_i2i.append(name)
    for label in _demo_labels(n_unlisted, rng):  # further unlisted views: distractors
        jobs.append((new_view(label), test_dir / new_name()))
    leaked = [(imgs / src, test_dir / new_name()) for src in list(cls)[:2]]  # byte copies: leakage
    test_captions = sorted({demo_caption(new_view(label)) for label in _demo_labels(8, rng)})

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
            en, vi = zip(*demo_findings(view))
            records.append({"Path": file, "Classification": view["label"], "Type": "abnormal",
                            "Description": "\r\n".join([*vi, "(dữ liệu tổng hợp)"]), "DescriptionEN": "\r\n".join(en)})

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
