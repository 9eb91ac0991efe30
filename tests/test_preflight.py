"""preflight.py: Setup's checks before any heavy work. Parameters refused with a value that works, the DINOv2
weights file found (and, with internet off, nothing left to download silently), the disk plan from
parameter counts, the CPU estimate."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import preflight
import utils

ROOT = Path(__file__).resolve().parents[1]


def _notebook_defaults() -> dict:
    nb = json.loads((ROOT / "entrep-prototypical.ipynb").read_text(encoding="utf-8"))
    cell, = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    params: dict = {}
    exec("".join(cell["source"]), {}, params)
    return params


def test_check_params_accepts_the_notebook_defaults_and_the_demo_config():
    defaults = _notebook_defaults()
    assert {"image_size", "val_fraction", "split", "dino_weights", "device"} <= set(defaults)
    preflight.check_params(defaults)
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    preflight.check_params({**defaults, **demo})
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert paper["split"] == "stratified"  # the paper's plain split is a valid choice
    preflight.check_params({**defaults, **paper})


def test_check_params_lists_every_bad_parameter_in_one_error(tmp_path):
    bad = {"image_size": 100, "epochs": 0, "batch_size": 0, "val_fraction": 1.5, "split": "random",
           "dino_heads": "three", "retrieval_gallery": "everything",
           "clip_model": "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
           "dino_model": "vit_nonexistent_patch14_dinov2", "dino_weights": str(tmp_path / "missing.pth")}
    if not torch.cuda.is_available():
        bad["device"] = "cuda"
    good = {"seed": 0, "lr_head": 1e-3, "lr_backbone": 2e-5, "num_workers": -1, "dino_gpus": 1}
    with pytest.raises(ValueError) as err:
        preflight.check_params({**good, **bad})
    lines = [line for line in str(err.value).splitlines() if line.startswith("- ")]
    assert sorted(line[2:].split("=")[0] for line in lines) == sorted(bad)  # one line per bad one, no good one
    by_name = {line[2:].split("=")[0]: line for line in lines}
    assert "224 or 336" in by_name["image_size"]  # each line offers a value that works
    assert "0.1" in by_name["val_fraction"] and "'grouped'" in by_name["split"]
    assert "'shared'" in by_name["dino_heads"] and "'test_folders'" in by_name["retrieval_gallery"]
    assert "hf-hub:" in by_name["clip_model"] and "vit_base_patch14_dinov2" in by_name["dino_model"]
    assert "'auto'" in by_name["dino_weights"]
    if "device" in bad:
        assert "'cpu'" in by_name["device"]
    with pytest.raises(ValueError, match=r"val_fraction=0\b"):
        preflight.check_params({"val_fraction": 0})


def test_check_params_refuses_numbers_that_yaml_read_as_text():
    """PyYAML reads `lr_head: 1e-3` (no dot) as the string '1e-3': caught here, not deep in training."""
    params = yaml.safe_load("lr_head: 1e-3\nlr_backbone: 2e-5\nval_fraction: 1e-1\n")
    assert params == {"lr_head": "1e-3", "lr_backbone": "2e-5", "val_fraction": "1e-1"}
    with pytest.raises(ValueError) as err:
        preflight.check_params(params)
    assert {line[2:].split("=")[0] for line in str(err.value).splitlines() if line.startswith("- ")} == set(params)


def test_check_params_lets_a_zero_backbone_rate_freeze_it_but_no_other_rate_be_zero():
    preflight.check_params({"lr_backbone": 0})  # 0 freezes the backbone
    preflight.check_params({"lr_backbone": 0.0, "lr_head": 1e-3, "retrieval_lr": 1e-5})
    for name in ("lr_head", "retrieval_lr"):
        with pytest.raises(ValueError) as err:
            preflight.check_params({"lr_backbone": 0, name: 0})
        lines = [line for line in str(err.value).splitlines() if line.startswith("- ")]
        assert len(lines) == 1 and lines[0].startswith(f"- {name}=0: use a positive learning rate")


def test_resolve_dino_weights_is_honest_about_what_is_loaded(tmp_path):
    roots = [str(tmp_path)]
    assert preflight.resolve_dino_weights("/x/y.pth", "auto", roots) == ("/x/y.pth",
                                                                        "SurgeNet DINOv2 checkpoint /x/y.pth")
    path, note = preflight.resolve_dino_weights("", "auto", roots)
    assert path == "" and "LVD-142M" in note and "no SurgeNet" in note
    path, note = preflight.resolve_dino_weights("random", "auto", roots)
    assert path == "random" and "random initialisation" in note and "not the method" in note
    with pytest.warns(UserWarning, match="found no"):  # nothing attached: timm's weights, said out loud
        path, note = preflight.resolve_dino_weights("auto", "auto", roots)
    assert path == "" and "LVD-142M" in note
    w = tmp_path / "weights"
    w.mkdir()
    for name in ("DINOv2_ViTs14_size336_SurgeNetXL.pth", "DINOv2_ViTb14_size336_SurgeNetXL.pth",
                 "SurgeNet_ResNet50.pth", "DINOv2_ViTl14_SurgeNetXL.pt"):  # not DINOv2 / not .pth: ignored
        (w / name).write_bytes(b"")
    path, note = preflight.resolve_dino_weights("auto", "auto", roots)
    assert path == str(w / "DINOv2_ViTb14_size336_SurgeNetXL.pth") and path in note  # ViT-B first
    assert preflight.resolve_dino_weights("auto", "vit_small_patch14_dinov2", roots)[0] == str(
        w / "DINOv2_ViTs14_size336_SurgeNetXL.pth")  # a named model's size
    assert preflight.resolve_dino_weights("auto", "vit_base_patch14_reg4_dinov2", roots)[0] == str(
        w / "DINOv2_ViTb14_size336_SurgeNetXL.pth")
    path, note = preflight.resolve_dino_weights("auto", "tiny", roots)  # the tiny model is random, whatever is attached
    assert path == "" and "tiny random" in note and "is not used" in note and "SurgeNetXL.pth" in note
    assert "timm" not in note and "LVD" not in note


def test_planned_bytes_count_parameters_for_each_run(tmp_path):
    params = {"dino_heads": "separate", "dino_model": "auto", "image_size": 336, "retrieval_tuning": "off",
              "clip_model": utils.BIOMEDCLIP_HUB_ID}
    vit_b = 4 * preflight.dino_parameter_count("auto", "", 336)
    plan = preflight.planned_bytes(params, vit_b // 4, tmp_path, n_images=1000)
    assert 85e6 < vit_b / 4 < 88e6  # ViT-B/14 at 336 px
    assert plan["DINOv2 weights (4 runs)"] == 4 * vit_b
    assert plan["BiomedCLIP download"] == preflight.BIOMEDCLIP_WEIGHTS_BYTES
    assert plan["BiomedCLIP tuned for retrieval"] == 0
    shared = preflight.planned_bytes(params | {"dino_heads": "shared", "retrieval_tuning": "tail"}, vit_b // 4,
                                     tmp_path, 1000)
    assert shared["DINOv2 weights (1 run)"] == vit_b and shared["BiomedCLIP tuned for retrieval"] > 0


def test_internet_off_names_each_model_it_would_download(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_cached", lambda *a, **k: False)
    needed = preflight.missing_downloads(utils.BIOMEDCLIP_HUB_ID, "", "auto", tmp_path)
    assert len(needed) == 2 and "local-dir:" in needed[0] and "DINOv2_ViTb14_size336_SurgeNetXL.pth" in needed[1]
    assert preflight.missing_downloads("tiny", "", "tiny", tmp_path) == []
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert preflight.missing_downloads(f"local-dir:{tmp_path}", str(weights), "auto", tmp_path) == []
    with pytest.raises(RuntimeError, match="internet is off.*Attach DINOv2_ViTb14_size336_SurgeNetXL.pth"):
        preflight.resolve_dino_weights("auto", "auto", [tmp_path], online=False)
    with pytest.warns(UserWarning, match="LVD-142M"):
        assert preflight.resolve_dino_weights("auto", "auto", [tmp_path], online=True)[0] == ""


def test_internet_off_stops_setup_listing_what_would_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_cached", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match=r"Internet is off[\s\S]*- clip_model=[\s\S]*- timm's DINOv2"):
        preflight.check_downloads(False, utils.BIOMEDCLIP_HUB_ID, "", "auto", tmp_path)
    assert len(preflight.check_downloads(True, utils.BIOMEDCLIP_HUB_ID, "", "auto", tmp_path)) == 2  # said, not refused
    assert preflight.check_downloads(False, "tiny", "", "tiny", tmp_path) == []


def test_cpu_hours_count_six_flops_per_parameter_token_image_epoch_and_model():
    params = {"image_size": 336, "epochs": 20, "dino_heads": "separate"}
    hours = preflight.cpu_hours(params, dino_params=86_000_000, n_images=1_000, cores=4, gflops_per_core=50.0)
    assert hours == pytest.approx(6 * 86e6 * 577 * 1000 * 20 * 4 / (4 * 50e9) / 3600)
    assert preflight.count_images(None) == 0
