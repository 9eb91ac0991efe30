"""Hostile input: a data set in the official layouts holding every kind of bad input at once, run
through the whole notebook (tiny models). Each item is predicted or listed as skipped with its
reason, the run completes, and the submissions stay valid."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import yaml
from PIL import Image

import utils

ROOT = Path(__file__).resolve().parents[1]
QUERY_TEXTS = ['a spur on the septum', 'he said "open", then closed', 'polyp, left side', 'viêm họng cấp',
               'two\nlines', '  leading and trailing spaces  ']


def _convert(src: Path, dst: Path, mode: str) -> str:
    im = Image.open(src).convert("RGB")
    if mode == "I;16":
        Image.fromarray((np.asarray(im.convert("L"), dtype=np.uint16) * 257)).save(dst)
    elif mode == "CMYK":
        im.convert("CMYK").save(dst, "JPEG")
    elif mode == "EXIF":
        exif = Image.Exif()
        exif[0x0112] = 8  # stored rotated; viewers (and load_rgb) turn it back
        im.transpose(Image.Transpose.ROTATE_270).save(dst, "JPEG", exif=exif)
    elif mode == "big":
        im.resize((8000, 6000)).save(dst, compress_level=1)
    elif mode == "tiny":
        im.resize((8, 8)).save(dst)
    else:
        im.convert(mode).save(dst)
    return dst.name


def build_hostile_dataset(root: Path) -> dict:
    """A small demo set rewritten to hold every bad input of the reliability issue. Returns what
    the test expects: {file: expected status or reason}."""
    utils.make_demo_dataset(root, seed=5, n_train=70, n_public=16, n_test=10, n_i2i_pairs=10, n_t2i=6)
    imgs, test_dir = root / "train" / "imgs", root / "PublicData" / "PublicTest"
    cls = json.loads((root / "train" / "cls.json").read_text())
    expect = {}
    # Pixel modes, sizes, orientation, odd names: converted copies of labelled train images.
    sources = [name for name, lab in cls.items() if utils.LABEL_TO_COARSE[lab] in ("nose", "ear")]
    for src, (mode, name) in zip(sources, [("L", "gray.png"), ("LA", "gray alpha.png"), ("P", "palette.png"),
                                           ("RGBA", "rgba.png"), ("I;16", "sixteen bit.png"), ("CMYK", "cmyk.jpg"),
                                           ("EXIF", "exif rotated.jpg"), ("big", "huge 8000x6000.png"),
                                           ("tiny", "tiny8.png"), ("RGB", "ảnh nội soi số 1.png")]):
        cls[_convert(imgs / src, imgs / name, mode)] = cls.pop(src)
        (imgs / src).unlink()
        expect[name] = "loaded"
    # Broken files, a missing file, odd and unknown labels.
    good = next(iter(cls))
    (imgs / "truncated.png").write_bytes((imgs / good).read_bytes()[:3000])
    (imgs / "zero.png").write_bytes(b"")
    (imgs / "text.png").write_text("not an image at all")
    cls.update({"truncated.png": "ear-left", "zero.png": "nose-right", "text.png": "throat", "absent.png": "vc-open"})
    expect.update({"truncated.png": "undecodable", "zero.png": "undecodable", "text.png": "undecodable",
                   "absent.png": "missing"})
    odd = next(n for n, lab in cls.items() if lab == "nose-left" and n not in expect)
    cls[odd] = "  Nose_LEFT "
    expect[odd] = "loaded"
    unknown = next(n for n, lab in cls.items() if lab == "nose-right" and n not in expect)
    cls[unknown] = "nose-middle"
    expect[unknown] = "unknown-label"
    # One throat image left, no vc-closed image at all (a class with none in training).
    throats = [n for n, lab in cls.items() if lab == "throat" and n not in expect]
    for n in throats[1:] + [n for n, lab in cls.items() if lab == "vc-closed"]:
        del cls[n]
    (root / "train" / "cls.json").write_text(json.dumps(cls, ensure_ascii=False))
    records = json.loads((root / "public" / "data.json").read_text())
    records = [r for r in records if r["Classification"] not in ("vc-closed", "throat")]
    (root / "public" / "data.json").write_text(json.dumps(records, ensure_ascii=False))
    # Test lists: BOM + CRLF, bad and odd test images, hostile query texts, an empty list.
    cls_list = (root / "Track1_Public" / "cls.csv").read_text().split()
    (test_dir / "bad test.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    shutil.copy(test_dir / cls_list[0], test_dir / "tên ảnh thử.png")
    cls_list += ["bad test.png", "tên ảnh thử.png", "gone.png"]
    (root / "Track1_Public" / "cls.csv").write_bytes(("\ufeff" + "\r\n".join(cls_list) + "\r\n").encode("utf-8"))
    i2i_list = (root / "Track2_Public" / "i2i.csv").read_text().split() + ["bad test.png"]
    (root / "Track2_Public" / "i2i.csv").write_text("\n".join(i2i_list) + "\n")
    quoted = "".join('"' + t.replace('"', '""') + '"\r\n' for t in QUERY_TEXTS)
    (root / "Track3_Public" / "t2i.csv").write_bytes(("\ufeff" + quoted).encode("utf-8"))
    (root / "Track3_Private").mkdir()
    (root / "Track3_Private" / "t2i.csv").write_text("")
    return {"labelled": expect, "cls": cls_list, "i2i": i2i_list, "kept_throat": throats[:1]}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    expect = build_hostile_dataset(root / "data")
    out = root / "out"
    params = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    params.update(data_path=str(root / "data"), output_dir=str(out), epochs=2, image_size=56)
    out.mkdir()
    pm.execute_notebook(str(ROOT / "entrep-prototypical.ipynb"), str(out / "executed.ipynb"),
                        parameters=params, cwd=str(ROOT), progress_bar=False)
    return root / "data", out, expect


def test_every_labelled_input_is_loaded_or_skipped_with_its_reason(hostile_run):
    data_root, out, expect = hostile_run
    data = utils.load_entrep(data_root)
    inv = data.inventory[data.inventory.role == "labelled"].set_index("item")
    for name, status in expect["labelled"].items():
        row = inv.loc[name]
        assert (row.status if status == "loaded" else row.reason) == status, (name, row.to_dict())
    problem_items = set(data.problems["item"])
    assert {n for n, s in expect["labelled"].items() if s != "loaded"} <= problem_items
    loaded = data.images.set_index("file")
    assert loaded.loc["exif rotated.jpg", ["width", "height"]].tolist() == [640, 480]  # EXIF honoured
    assert loaded.loc["tiny8.png", "width"] == 8 and loaded.loc["huge 8000x6000.png", "width"] == 8000
    assert "vc-closed" not in set(loaded.label) and (loaded.label == "throat").sum() == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["referenced_images"] == len(data.inventory)
    assert metrics["data"]["skipped_images"] == int((data.inventory.status == "skipped").sum())


def test_hostile_submissions_answer_every_listed_item_exactly_once(hostile_run):
    data_root, out, expect = hostile_run
    with zipfile.ZipFile(out / "submission.zip") as z:
        track1 = json.loads(z.read("submission.json"))
    assert sorted(track1) == sorted(expect["cls"]) and all(0 <= v <= 6 for v in track1.values())
    with zipfile.ZipFile(out / "submission_i2i.zip") as z:
        track2 = json.loads(z.read("submission_i2i.json"))
    assert sorted(track2) == sorted(expect["i2i"]) and all(k != v and v in expect["i2i"] for k, v in track2.items())
    with zipfile.ZipFile(out / "submission_t2i.zip") as z:
        track3 = json.loads(z.read("submission_t2i.json").decode("utf-8"))
    assert list(track3) == QUERY_TEXTS  # exactly as given: quotes, commas, non-ASCII, newlines, spaces
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["skipped_test_items"]["track1"]) == ["bad test.png", "gone.png"]
    assert metrics["skipped_test_items"]["track2"] == ["bad test.png"]
