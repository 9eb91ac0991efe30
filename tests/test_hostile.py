"""Hostile and partial input, through the whole notebook (tiny models): a data set holding every kind of bad
input at once, data sets holding only some releases, and an image whose content changes between two runs.
Every item is predicted or listed as skipped with its reason, every run finishes with metrics.json and the
submissions it can write, and nothing computed from old content is reused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_notebook import FAST, log_of, run_notebook

import demo_data
import retrieval
import utils

QUERY_TEXTS = ['a spur on the septum', 'he said "open", then closed', 'polyp, left side', 'viêm họng cấp',
               'two\nlines', '  leading and trailing spaces  ']


def _convert(src: Path, dst: Path, mode: str) -> str:
    im = Image.open(src).convert("RGB")
    if mode == "I;16":
        Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257).save(dst)
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
    """A small demo set rewritten to hold every bad input of the reliability issue. Returns what the tests
    expect: {file: expected status or reason} and the test lists as written."""
    demo_data.make_demo_dataset(root, seed=5, n_train=70, n_public=16, n_test=10, n_i2i_pairs=10, n_t2i=6, n_unlisted=4)
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
    # Test lists: BOM + CRLF, bad and odd test images, hostile query texts, an empty list; an unreadable
    # image that no list names sits in the test folder too.
    cls_list = (root / "Track1_Public" / "cls.csv").read_text().split()
    (test_dir / "bad test.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (test_dir / "unlisted broken.png").write_bytes(b"\x89PNG\r\n\x1a\n also broken")
    shutil.copy(test_dir / cls_list[0], test_dir / "tên ảnh thử.png")
    cls_list += ["bad test.png", "tên ảnh thử.png", "gone.png"]
    (root / "Track1_Public" / "cls.csv").write_bytes(("\ufeff" + "\r\n".join(cls_list) + "\r\n").encode("utf-8"))
    i2i_list = (root / "Track2_Public" / "i2i.csv").read_text().split() + ["bad test.png"]
    (root / "Track2_Public" / "i2i.csv").write_text("\n".join(i2i_list) + "\n")
    quoted = "".join('"' + t.replace('"', '""') + '"\r\n' for t in QUERY_TEXTS)
    (root / "Track3_Public" / "t2i.csv").write_bytes(("\ufeff" + quoted).encode("utf-8"))
    (root / "Track3_Private").mkdir()
    (root / "Track3_Private" / "t2i.csv").write_text("")
    return {"labelled": expect, "cls": cls_list, "i2i": i2i_list}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    expect = build_hostile_dataset(root / "data")
    run_notebook(root / "out", data_path=str(root / "data"), **FAST)
    return root / "data", root / "out", expect


def test_every_labelled_input_is_loaded_or_skipped_with_its_reason(hostile_run):
    data_root, out, expect = hostile_run
    data = utils.load_entrep(data_root)
    inv = data.inventory[data.inventory.role == "labelled"].set_index("item")
    for name, status in expect["labelled"].items():
        row = inv.loc[name]
        assert (row.status if status == "loaded" else row.reason) == status, (name, row.to_dict())
    assert {n for n, s in expect["labelled"].items() if s != "loaded"} <= set(data.problems["item"])
    loaded = data.images.set_index("file")
    assert loaded.loc["exif rotated.jpg", ["width", "height"]].tolist() == [640, 480]  # EXIF honoured
    assert loaded.loc["tiny8.png", "width"] == 8 and loaded.loc["huge 8000x6000.png", "width"] == 8000
    assert "vc-closed" not in set(loaded.label) and (loaded.label == "throat").sum() == 1
    folder = data.inventory[data.inventory.item == "unlisted broken.png"].iloc[0]
    assert (folder.role, folder.status, folder.reason) == ("test-folder", "skipped", "undecodable")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["inventory"] == len(data.inventory)
    assert len(metrics["data"]["skipped"]) == int((data.inventory.status == "skipped").sum())


def test_hostile_submissions_answer_every_listed_item_exactly_once(hostile_run):
    data_root, out, expect = hostile_run
    data = utils.load_entrep(data_root)
    gallery = retrieval.gallery_images(data, utils.select_test_queries(data.queries, "Public"), "test_folders").file
    track1 = utils.check_submission(out / "submission.zip", "track1", expect["cls"])
    assert sorted(track1) == sorted(expect["cls"])
    track2 = utils.check_submission(out / "submission_i2i.zip", "track2", expect["i2i"], gallery)
    assert sorted(track2) == sorted(expect["i2i"]) and "unlisted broken.png" not in set(track2.values())
    track3 = utils.check_submission(out / "submission_t2i.zip", "track3", QUERY_TEXTS, gallery)
    assert list(track3) == QUERY_TEXTS  # exactly as given: quotes, commas, non-ASCII, newlines, spaces
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["skipped_test_items"]["track1"]) == ["bad test.png", "gone.png"]
    assert metrics["skipped_test_items"]["track2"] == ["bad test.png"]


# Partial data sets: (folders kept from a demo set, submissions expected, a line the run must print).
PARTIAL = {
    "train release only": (["train"], [], "Track 1 not answered: no cls.csv test list"),
    "public release only": (["public"], [], "Track 2 validation skipped: no annotated i2i pairs"),
    "public release and test lists": (["public", "PublicData", "Track1_Public", "Track2_Public", "Track3_Public"],
                                      ["track1", "track2", "track3"], "Track 2 validation skipped"),
    "test lists only": (["PublicData", "Track1_Public", "Track2_Public", "Track3_Public"], ["track2", "track3"],
                        "Track 1 not answered: no folds: 0 labelled image(s)"),
    "no test lists": (["train", "public"], [], "Track 3 not answered"),
}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    return demo_data.make_demo_dataset(tmp_path_factory.mktemp("small"), seed=7, n_train=50, n_public=20, n_test=8,
                                       n_i2i_pairs=8, n_t2i=6, n_unlisted=4)


@pytest.mark.parametrize("case", list(PARTIAL))
def test_runs_finish_on_partial_data_sets_with_every_submission_they_can_write(case, small_demo, tmp_path):
    keep, expected, line = PARTIAL[case]
    data_root = tmp_path / "data"
    for folder in keep:
        shutil.copytree(small_demo / folder, data_root / folder)
    log = log_of(run_notebook(tmp_path / "out", data_path=str(data_root), **FAST))
    assert line in log, log[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sorted(metrics["submissions"]) == expected
    written = {track for track, (name, _) in utils.SUBMISSIONS.items() if (tmp_path / "out" / name).exists()}
    assert written == set(expected)


def test_changed_image_content_is_never_served_from_a_stale_run(small_demo, tmp_path):
    """The same path with new content: a rerun into the same output_dir trains and predicts afresh and
    ends exactly where a fresh run on the changed data ends."""
    data_root = tmp_path / "data"
    shutil.copytree(small_demo, data_root)
    run_notebook(tmp_path / "reused", data_path=str(data_root), **FAST)
    labelled = sorted(json.loads((data_root / "train" / "cls.json").read_text()))  # images DINOv2 learns from
    imgs = data_root / "train" / "imgs"
    old = utils.file_sha1(imgs / labelled[0])
    # new content, same name
    Image.open(imgs / labelled[1]).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(imgs / labelled[0])
    log = log_of(run_notebook(tmp_path / "reused", data_path=str(data_root), **FAST))
    assert "dino_shared" in log and log.count("reusing finished run") < log.count("dino_shared: ")  # some retrain
    models = json.loads((tmp_path / "reused" / "metrics.json").read_text())["dino"]["models"].values()
    for model in models:  # a fold that trained on the old content is never reused; one that predicts it may be
        identity = json.loads((Path(model["checkpoint"]).parent / "config.json").read_text())
        assert old not in {sha for sha, _ in identity["train"] + identity["val"]}
    run_notebook(tmp_path / "fresh", data_path=str(data_root), **FAST)
    reused, fresh = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("reused", "fresh"))
    assert reused["val_predictions"] == fresh["val_predictions"]
    for name, _ in utils.SUBMISSIONS.values():
        assert (tmp_path / "reused" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
