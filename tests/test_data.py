"""The data layer: every ENTRep layout, bad input accounted for, leakage, the split, demo data."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import utils


def _png(path: Path, color=(200, 100, 90), size=(64, 48), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)
    return path


def _accounted(data: utils.EntrepData, n_referenced: int) -> None:
    inv = data.inventory
    assert len(inv) == n_referenced
    assert set(inv["status"]) <= {"loaded", "skipped"}
    assert (inv.loc[inv.status == "skipped", "reason"] != "").all()


# ---- constants ------------------------------------------------------------------------------

def test_label_constants_match_the_official_ids():
    assert utils.LABELS[0] == "nose-right" and utils.LABELS[6] == "throat"
    assert [utils.LABEL_TO_ID[x] for x in ("ear-right", "ear-left", "vc-open", "vc-closed")] == [2, 3, 4, 5]
    assert set(utils.LABEL_TO_COARSE.values()) == set(utils.COARSE_CLASSES)
    for region, pair in utils.FINE_TASKS.items():
        assert all(utils.LABEL_TO_COARSE[x] == region for x in pair)
    assert all(utils.FLIP_LABEL[utils.FLIP_LABEL[x]] == x for x in utils.LABELS)
    assert utils.FLIP_LABEL["ear-left"] == "ear-right" and utils.FLIP_LABEL["vc-open"] == "vc-open"


@pytest.mark.parametrize("raw, expected", [
    ("nose-right", "nose-right"), (" Nose_Right ", "nose-right"), ("EAR LEFT", "ear-left"),
    ("vc_open", "vc-open"), ("VC-Closed\n", "vc-closed"), ("Throat", "throat"),
    ("nose-middle", None), ("", None), (None, None), (3, None)])
def test_normalize_label_forgives_case_space_and_underscore(raw, expected):
    assert utils.normalize_label(raw) == expected


# ---- layouts --------------------------------------------------------------------------------

def test_train_release_layout(tmp_path):
    root = tmp_path / "Dataset" / "train"
    a, b, c = (_png(root / "imgs" / f"{n}.png", (40 * i, 90, 90)) for i, n in enumerate("abc"))
    (root / "cls.json").write_text(json.dumps({"a.png": "ear-left", "b.png": "nose-right"}))
    (root / "i2i.json").write_text(json.dumps({"a.png": "c.png", "c.png": "a.png"}))
    (root / "t2i.json").write_text(json.dumps({"the tympanic membrane is intact": "a.png"}))
    _png(tmp_path / "__MACOSX" / "train" / "imgs" / "._a.png")  # Mac zip junk is never data
    data = utils.load_entrep(tmp_path)
    assert sorted(data.images["file"]) == ["a.png", "b.png"]
    row = data.images.set_index("file").loc["a.png"]
    assert (row.label, row.label_id, row.coarse, row.release) == ("ear-left", 3, "ear", "train")
    assert Path(row.path) == a and row.width == 64 and row.height == 48
    assert data.i2i[["query", "match"]].values.tolist() == [["a.png", "c.png"], ["c.png", "a.png"]]
    assert data.t2i[["text", "file"]].values.tolist() == [["the tympanic membrane is intact", "a.png"]]
    assert data.problems.empty
    _accounted(data, 2 + 4 + 1)


def test_public_release_layout_with_case_defect(tmp_path):
    root = tmp_path / "public"
    _png(root / "images" / "12345678_123456789012345678_001_Image01.png")
    _png(root / "images" / "12345678_123456789012345678_001_image02(1).png", (10, 20, 30))
    records = [
        {"Path": "12345678_123456789012345678_001_image01.png", "Classification": "vc-open", "Type": "abnormal",
         "Description": "Dây thanh mở\r\nphù nề", "DescriptionEN": "open vocal cords\r\nswelling"},
        {"Path": "12345678_123456789012345678_001_image02(1).png", "Classification": "Throat", "Type": "",
         "Description": "Họng", "DescriptionEN": "throat"},
    ]
    (root / "data.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    data = utils.load_entrep(tmp_path)
    assert list(data.images["label"]) == ["vc-open", "throat"]
    first = data.images.iloc[0]
    assert first.file == "12345678_123456789012345678_001_Image01.png"  # the file on disk
    assert first.description_en == "open vocal cords\r\nswelling" and first.description_vi.startswith("Dây")
    assert first.type == "abnormal" and first.release == "public"
    assert data.problems["kind"].tolist() == ["name-case"]
    assert "case-insensitively" in data.problems["message"][0]


def test_test_lists_with_images_elsewhere(tmp_path):
    _png(tmp_path / "PublicData" / "PublicTest" / "x.png")
    _png(tmp_path / "PublicData" / "PublicTest" / "y.png", (1, 2, 3))
    (tmp_path / "Track1_Public").mkdir()
    (tmp_path / "Track1_Public" / "cls.csv").write_text("x.png\ny.png\n")
    (tmp_path / "Track2_Public").mkdir()
    (tmp_path / "Track2_Public" / "i2i.csv").write_bytes("\ufeffx.png\r\ny.png\r\n".encode("utf-8"))  # BOM + CRLF
    (tmp_path / "Track3_Public").mkdir()
    (tmp_path / "Track3_Public" / "t2i.csv").write_text(
        'a spur on the septum\n"polyp, left side"\n"he said ""open"""\nthe glottis, closed\nviêm họng\n"two\nlines"\n',
        encoding="utf-8")
    data = utils.load_entrep(tmp_path)
    assert data.queries["cls"]["file"].tolist() == ["x.png", "y.png"]
    assert data.queries["i2i"]["file"].tolist() == ["x.png", "y.png"]
    assert all(Path(p).exists() for p in data.queries["cls"]["path"])
    assert data.queries["t2i"]["text"].tolist() == [
        "a spur on the septum", "polyp, left side", 'he said "open"', "the glottis, closed", "viêm họng", "two\nlines"]
    assert data.images.empty and data.problems.empty


def test_csv_header_and_empty_list_are_reported(tmp_path):
    _png(tmp_path / "imgs" / "x.png")
    (tmp_path / "cls.csv").write_text("image\nx.png\n")
    (tmp_path / "i2i.csv").write_text("")
    data = utils.load_entrep(tmp_path)
    assert data.queries["cls"]["file"].tolist() == ["x.png"]
    assert set(data.problems["kind"]) == {"csv-header", "empty-list"}


def test_class_folder_tree(tmp_path):
    for i, (split, label) in enumerate([(s, lab) for s in ("train", "val") for lab in ("Ear_Left", "nose-right")]):
        _png(tmp_path / split / label / f"{split}-{label}.png", (40 * i, 9, 9))  # distinct bytes, no duplicates
    _png(tmp_path / "train" / "not-a-class" / "z.png")
    data = utils.load_entrep(tmp_path)
    assert sorted(data.images["label"]) == ["ear-left", "ear-left", "nose-right", "nose-right"]
    assert set(data.images["source"]) == {"train", "val"} and set(data.images["release"]) == {"folders"}


def test_all_layouts_together_on_the_demo(demo_root, demo_data):
    kinds = {layout.split(":")[0] for layout in demo_data.layouts}
    assert kinds == {"train release", "public release", "test list"}
    assert set(demo_data.images["release"]) == {"train", "public"}
    assert set(demo_data.images["label"]) == set(utils.LABELS)
    cls = json.loads((demo_root / "train" / "cls.json").read_text())
    records = json.loads((demo_root / "public" / "data.json").read_text())
    assert len(demo_data.images) == len(cls) + len(records)  # demo has no duplicate labelled records
    assert len(demo_data.i2i) > 0 and len(demo_data.t2i) > 0
    assert {k: len(v) > 0 for k, v in demo_data.queries.items()} == {"cls": True, "i2i": True, "t2i": True}
    # the demo's planted problems: one case defect, one missing i2i query; and two leaked test images
    assert sorted(demo_data.problems["kind"]) == ["missing-file", "name-case"]
    assert len(utils.find_leakage(demo_data)) == 2
    summary = demo_data.summary()
    assert summary.loc["total", "total"] == len(demo_data.images)


def test_no_data_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo"):
        utils.load_entrep(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        utils.load_entrep(tmp_path / "nope")


# ---- bad input ------------------------------------------------------------------------------

def _bad_input_set(root: Path) -> dict:
    imgs = root / "train" / "imgs"
    labels = {}
    for i, mode in enumerate(["L", "LA", "P", "RGBA", "I;16", "RGB"]):
        name = f"mode_{mode.replace(';', '')}.png"
        if mode == "I;16":
            Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(imgs / name)
        else:
            _png(imgs / name, (150, 60 + i, 40), mode=mode)
        labels[name] = "nose-left"
    Image.new("CMYK", (40, 30), (0, 200, 100, 0)).save(imgs / "cmyk.jpg")
    labels["cmyk.jpg"] = "throat"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 64x48, shown 48x64
    Image.new("RGB", (64, 48), (90, 90, 90)).save(imgs / "rotated.jpg", exif=exif)
    labels["rotated.jpg"] = "ear-right"
    (imgs / "empty.png").write_bytes(b"")
    full = imgs / "mode_RGB.png"
    (imgs / "truncated.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    (imgs / "text.png").write_text("this is not an image")
    labels.update({"empty.png": "ear-left", "truncated.png": "ear-left", "text.png": "ear-left",
                   "absent.png": "vc-open", "mode_RGB.png": "  VC_Closed ", "unknown.png": "nose-middle"})
    _png(imgs / "unknown.png")
    (root / "train" / "cls.json").write_text(json.dumps(labels))
    return labels


def test_bad_input_is_reported_and_every_file_accounted(tmp_path):
    imgs = tmp_path / "train" / "imgs"
    imgs.mkdir(parents=True)
    labels = _bad_input_set(tmp_path)
    data = utils.load_entrep(tmp_path)
    _accounted(data, len(labels))
    skipped = data.inventory.set_index("item").query("status == 'skipped'")["reason"].to_dict()
    assert skipped == {"empty.png": "undecodable", "truncated.png": "undecodable", "text.png": "undecodable",
                       "absent.png": "missing", "unknown.png": "unknown-label"}
    by_item = data.problems.set_index("item")
    assert "empty (0 bytes)" in by_item.loc["empty.png", "message"]
    assert str(imgs / "truncated.png") in by_item.loc["truncated.png", "message"]
    assert "nose-middle" in by_item.loc["unknown.png", "message"]
    assert "absent.png" in by_item.loc["absent.png", "message"] and "Add the file" in by_item.loc["absent.png", "message"]
    loaded = data.images.set_index("file")
    assert loaded.loc["mode_RGB.png", "label"] == "vc-closed"
    assert (loaded.loc["rotated.jpg", "width"], loaded.loc["rotated.jpg", "height"]) == (48, 64)
    for name in loaded.index:
        im = utils.load_rgb(loaded.loc[name, "path"])
        assert im.mode == "RGB"
    with pytest.raises(ValueError, match="nose-middle"):
        utils.load_entrep(tmp_path, strict_labels=True)


def test_load_rgb_modes_are_converted_faithfully(tmp_path):
    Image.new("LA", (4, 4), (200, 0)).save(tmp_path / "transparent.png")
    assert utils.load_rgb(tmp_path / "transparent.png").getpixel((0, 0)) == (0, 0, 0)  # alpha onto black
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert utils.load_rgb(tmp_path / "white16.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    assert utils.load_rgb(tmp_path / "gray.png").getpixel((1, 1)) == (77, 77, 77)
    with pytest.raises(utils.ImageDecodeError, match="cannot decode"):
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        utils.load_rgb(tmp_path / "bad.png")


# ---- leakage and the split ------------------------------------------------------------------

def test_duplicates_across_releases_are_reported_and_kept_once(tmp_path):
    a = _png(tmp_path / "train" / "imgs" / "a.png", (1, 2, 3))
    (tmp_path / "train" / "cls.json").write_text(json.dumps({"a.png": "ear-left"}))
    pub = tmp_path / "public"
    (pub / "images").mkdir(parents=True)
    shutil.copy(a, pub / "images" / "12345678_123456789012345678_001_image01.png")
    (pub / "data.json").write_text(json.dumps([{"Path": "12345678_123456789012345678_001_image01.png",
                                               "Classification": "ear-right", "Type": "", "Description": "",
                                               "DescriptionEN": ""}]))
    data = utils.load_entrep(tmp_path)
    assert len(data.images) == 1  # one record per content: the first found is kept
    assert data.problems["kind"].tolist() == ["label-conflict"]
    assert "same bytes" in data.problems["message"][0]


def test_split_is_stratified_grouped_and_seeded(demo_data):
    images, i2i = demo_data.images, demo_data.i2i
    tr, va = utils.split_train_val(images, i2i, val_fraction=0.2, seed=7)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(images)
    # stratified: every class present in training, validation share per class near 20%
    val_share = images.iloc[va]["label"].value_counts() / images["label"].value_counts()
    assert set(images.iloc[tr]["label"]) == set(utils.LABELS)
    assert val_share.fillna(0).between(0.0, 0.5).all() and 0.1 < len(va) / len(images) < 0.3
    # grouped: identical bytes, i2i pairs and examinations never cross
    groups = utils.split_groups(images, i2i)
    assert not set(groups[tr]) & set(groups[va])
    side = dict(zip(images["file"], ["train"] * len(images)))
    side.update({images.iloc[i]["file"]: "val" for i in va})
    for q, m in zip(i2i["query"], i2i["match"]):
        if q in side and m in side:
            assert side[q] == side[m]
    tr2, va2 = utils.split_train_val(images, i2i, val_fraction=0.2, seed=7)
    assert np.array_equal(va, va2)
    _, va3 = utils.split_train_val(images, i2i, val_fraction=0.2, seed=8)
    assert not np.array_equal(va, va3)


def test_split_groups_link_same_bytes_pairs_and_exams():
    images = pd.DataFrame({"file": ["a.png", "b.png", "c.png", "12345678_123456789012345678_001_image01.png",
                                    "12345678_123456789012345678_001_image02.png", "d.png"],
                           "sha1": ["1", "1", "2", "3", "4", "5"]})
    i2i = pd.DataFrame({"query": ["c.png"], "match": ["d.png"]})
    g = utils.split_groups(images, i2i)
    assert g[0] == g[1] and g[2] == g[5] and g[3] == g[4] and len(set(g)) == 3


# ---- demo data ------------------------------------------------------------------------------

def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_deterministic_by_seed(tmp_path):
    kw = dict(n_train=16, n_public=6, n_test=4, n_i2i_pairs=4, n_t2i=4)
    a = _tree_digest(utils.make_demo_dataset(tmp_path / "a", seed=1, workers=2, **kw))
    b = _tree_digest(utils.make_demo_dataset(tmp_path / "b", seed=1, workers=1, **kw))
    c = _tree_digest(utils.make_demo_dataset(tmp_path / "c", seed=2, **kw))
    assert a == b
    assert a != c
    assert "README_SYNTHETIC.txt" in a


def test_demo_left_is_the_mirror_of_right_and_state_changes_the_gap():
    rng = np.random.default_rng(0)
    for region, (left, right) in (("ear", ("ear-left", "ear-right")), ("nose", ("nose-left", "nose-right"))):
        view = utils.demo_view(utils.demo_exam(region, rng), right, rng)
        r = np.asarray(utils.render_demo_image(view))
        l = np.asarray(utils.render_demo_image({**view, "label": left}))
        assert np.array_equal(l, r[:, ::-1]) and not np.array_equal(l, r)
        assert r.shape == (480, 640, 3) and r[0, 0].sum() == 0  # black corner outside the field of view
    exam = utils.demo_exam("vc", rng)
    open_view = utils.demo_view(exam, "vc-open", rng)
    closed = np.asarray(utils.render_demo_image({**open_view, "gap": 0.0}), dtype=float)
    opened = np.asarray(utils.render_demo_image(open_view), dtype=float)
    assert opened.mean() < closed.mean()  # the open glottis is a dark gap


def test_demo_data_shape(demo_root, demo_data):
    assert (demo_root / "README_SYNTHETIC.txt").read_text().startswith("SYNTHETIC")
    assert set(demo_data.images[["width", "height"]].itertuples(index=False, name=None)) == {(640, 480)}
    # i2i partners share the region; some differ in side/state, as in the real pairs
    lab = dict(zip(demo_data.images["file"], demo_data.images["label"]))
    pairs = [(lab[q], lab[m]) for q, m in zip(demo_data.i2i["query"], demo_data.i2i["match"]) if q in lab and m in lab]
    assert pairs and all(utils.LABEL_TO_COARSE[a] == utils.LABEL_TO_COARSE[b] for a, b in pairs)
    assert all(t2i_file in set(demo_data.t2i["file"]) for t2i_file in demo_data.t2i["file"])


def test_grouped_folds_keep_groups_together_and_cover_every_sample():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    groups = np.repeat(np.arange(30), 2)
    folds = utils.grouped_fold_ids(labels, groups, n_splits=5, seed=1)
    assert set(folds) == set(range(5))
    for g in range(30):
        assert len(set(folds[groups == g])) == 1
    assert np.array_equal(folds, utils.grouped_fold_ids(labels, groups, n_splits=5, seed=1))


def test_resolve_dino_weights(tmp_path):
    assert utils.resolve_dino_weights("", "vit_base_patch14_reg4_dinov2", [str(tmp_path)]) == ""
    assert utils.resolve_dino_weights("/x/y.pth", "vit_base_patch14_reg4_dinov2", [str(tmp_path)]) == "/x/y.pth"
    (tmp_path / "w").mkdir()
    for name in ("DINOv2_ViTs14_size336_SurgeNetXL.pth", "DINOv2_ViTb14_size336_SurgeNetXL.pth"):
        (tmp_path / "w" / name).write_bytes(b"")
    got = utils.resolve_dino_weights("auto", "vit_base_patch14_reg4_dinov2", [str(tmp_path)])
    assert got.endswith("DINOv2_ViTb14_size336_SurgeNetXL.pth")
    with pytest.warns(UserWarning, match="found no"):
        assert utils.resolve_dino_weights("auto", "vit_large_patch14_reg4_dinov2", [str(tmp_path)]) == ""


def test_folds_on_tiny_data_cap_the_fold_count_instead_of_failing():
    folds = utils.grouped_fold_ids([0, 1, 2, 2, 3], [0, 1, 2, 3, 4], n_splits=5, seed=0)  # largest class: 2
    assert sorted(set(folds)) == [0, 1] and (folds >= 0).all()
    folds = utils.grouped_fold_ids([0, 1, 2, 3], [0, 1, 2, 3], n_splits=5, seed=0)  # no class with two members
    assert len(set(folds)) == 4
    with pytest.raises(ValueError, match="add labelled images"):
        utils.grouped_fold_ids([0, 1], [7, 7], n_splits=5, seed=0)


def test_select_test_queries_never_merges_two_test_sets():
    q = {"cls": pd.DataFrame({"file": ["a.png", "b.png", "c.png"], "path": ["", "", ""],
                              "source": ["Track1_Public", "Track1_Public", "Track1_Private"], "sha1": ["", "", ""]}),
         "t2i": pd.DataFrame({"text": ["x"], "source": ["Track3_Public"]})}
    with pytest.raises(ValueError, match="test_split"):
        utils.select_test_queries(q, "auto")
    private = utils.select_test_queries(q, "private")
    assert private["cls"]["file"].tolist() == ["c.png"] and private["t2i"].empty
    public = utils.select_test_queries(q, "Public")
    assert public["cls"]["file"].tolist() == ["a.png", "b.png"] and public["t2i"]["text"].tolist() == ["x"]
    only = utils.select_test_queries({"t2i": q["t2i"]}, "auto")
    assert only["t2i"]["text"].tolist() == ["x"]


# ---- decode checks kept for reruns ----------------------------------------------------------


def _three_images(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i, n in enumerate("abc"):
        _png(root / "imgs" / f"{n}.png", (60 * i, 90, 90))
    (root / "cls.json").write_text(json.dumps({"a.png": "ear-left", "b.png": "nose-right", "c.png": "throat"}))
    return root


def test_rerun_reuses_decode_checks(tmp_path, monkeypatch):
    root, cache = _three_images(tmp_path), tmp_path / "cache"
    first = utils.load_entrep(root, cache_dir=cache)
    assert (cache / "image_checks.json").is_file()
    utils._SHA1_BY_STAT.clear()  # as in a new process

    def no_decoding(path, *a, **k):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(utils, "load_rgb", no_decoding)
    monkeypatch.setattr(utils, "file_digest", lambda *a, **k: pytest.fail("hashed a file again"))
    again = utils.load_entrep(root, cache_dir=cache)
    pd.testing.assert_frame_equal(first.images, again.images)
    pd.testing.assert_frame_equal(first.inventory, again.inventory)


def test_changed_file_is_checked_again(tmp_path):
    root, cache = _three_images(tmp_path), tmp_path / "cache"
    first = utils.load_entrep(root, cache_dir=cache).images.set_index("file")
    b = root / "imgs" / "b.png"
    b.write_bytes(b.read_bytes()[:40])  # truncated: another size, another modification time
    data = utils.load_entrep(root, cache_dir=cache)
    assert data.problems["kind"].tolist() == ["undecodable"] and "b.png" in data.problems["message"][0]
    assert sorted(data.images["file"]) == ["a.png", "c.png"]
    _png(root / "imgs" / "b.png", (1, 2, 3), size=(70, 50))
    row = utils.load_entrep(root, cache_dir=cache).images.set_index("file").loc["b.png"]
    assert (row.width, row.height) == (70, 50) and row.sha1 != first.loc["b.png", "sha1"]
    assert row.sha1 == hashlib.sha1(b.read_bytes()).hexdigest()
    assert len(utils.load_image_checks(cache / "image_checks.json")) == 3  # old entries of b.png dropped


def test_damaged_check_cache_is_reported_and_rebuilt(tmp_path):
    root, cache = _three_images(tmp_path), tmp_path / "cache"
    first = utils.load_entrep(root, cache_dir=cache)
    (cache / "image_checks.json").write_text('{"format": "entrep-image-checks-1", "files": [{"path"')
    with pytest.warns(UserWarning, match="image_checks.json: unreadable image-check cache"):
        again = utils.load_entrep(root, cache_dir=cache)
    pd.testing.assert_frame_equal(first.images, again.images)
    assert len(utils.load_image_checks(cache / "image_checks.json")) == 3


def test_replaced_file_with_kept_mtime_is_hashed_again(tmp_path):
    """cp -p / rsync -a / unzip keep the mtime; the change time still says the file was replaced."""
    root, cache = _three_images(tmp_path), tmp_path / "cache"
    a = root / "imgs" / "a.png"
    first = utils.load_entrep(root, cache_dir=cache).images.set_index("file").loc["a.png", "sha1"]
    st = a.stat()
    other = tmp_path / "other.png"
    for red in range(1, 256):  # another picture whose PNG has the same size: only the times can tell
        _png(other, (red, 90, 90))
        if other.stat().st_size == st.st_size and other.read_bytes() != a.read_bytes():
            break
    assert other.stat().st_size == st.st_size
    os.replace(other, a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    utils._SHA1_BY_STAT.clear()  # as in a new process
    sha1 = utils.load_entrep(root, cache_dir=cache).images.set_index("file").loc["a.png", "sha1"]
    assert sha1 != first and sha1 == hashlib.sha1(a.read_bytes()).hexdigest()


def test_decode_failures_are_not_remembered(tmp_path, monkeypatch):
    """A failure may come from the environment (a missing codec, an older Pillow): it is tried again."""
    root, cache = _three_images(tmp_path), tmp_path / "cache"
    real = utils.load_rgb

    def broken_for_b(path, *a, **k):
        if Path(path).name == "b.png":
            raise utils.ImageDecodeError(f"{path}: cannot decode (no codec)")
        return real(path, *a, **k)

    monkeypatch.setattr(utils, "load_rgb", broken_for_b)
    assert utils.load_entrep(root, cache_dir=cache).problems["kind"].tolist() == ["undecodable"]
    monkeypatch.setattr(utils, "load_rgb", real)
    data = utils.load_entrep(root, cache_dir=cache)
    assert sorted(data.images["file"]) == ["a.png", "b.png", "c.png"] and data.problems.empty
