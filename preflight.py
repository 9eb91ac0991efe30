"""Setup's checks of a run before any heavy work: entrep-prototypical.ipynb's Setup cells call these.

The parameters (types from the parameters cell, values from the rules below), the DINOv2 weights file to
load, what the run would download (refused at once when internet is off) and what it will write (the disk
plan, from parameter counts), and an estimate of the CPU hours when no GPU is there. Not the method
(utils.py is); runtime.py holds what does not depend on the method's models at all.
"""

from __future__ import annotations

import os
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import timm
import torch

from runtime import resolve_device
from utils import (BIOMEDCLIP_HUB_ID, DINO_DEFAULT_ARCH, DINO_MODEL_SETS, DINO_TINY_KWARGS, IMAGE_EXTENSIONS, MIXES,
                   RESIZES, RETRIEVAL_GALLERIES, RETRIEVAL_TUNINGS, SPLITS, SURGENET_VITB_URL, TINY_CLIP_CFG,
                   dino_arch, read_checkpoint)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# check_params' rules: (parameter, what a good value satisfies, what to use instead).
PARAM_RULES: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("image_size", lambda v: _is_int(v) and v >= 14 and v % 14 == 0,
     "use a multiple of DINOv2's patch size 14 (224 or 336; SurgeNet was trained at 336)"),
    ("epochs", lambda v: _is_int(v) and v >= 1, "use 1 or more fine-tuning epochs (20 by default)"),
    ("batch_size", lambda v: _is_int(v) and v >= 1, "use 1 or more images per batch (32 by default)"),
    ("seed", _is_int, "use an integer"),
    ("val_fraction", lambda v: _is_num(v) and 0 < v < 1, "use a share strictly between 0 and 1, e.g. 0.1"),
    ("num_workers", lambda v: _is_int(v) and v >= -1, "use -1 (automatic), 0 or a number of workers"),
    ("lr_head", lambda v: _is_num(v) and v > 0, "use a positive learning rate, e.g. 1e-3"),
    ("lr_backbone", lambda v: _is_num(v) and v >= 0, "use a learning rate >= 0, e.g. 2e-5 (0 freezes the backbone)"),
    ("split", lambda v: v in SPLITS, f"use one of {SPLITS}"),
    ("cv_folds", lambda v: _is_int(v) and v >= 1, "use 5 (default), another number of folds >= 2, or 1 for one "
     "validation split (the paper's protocol)"),
    ("resize", lambda v: v in RESIZES, f"use one of {RESIZES}"),
    ("mix", lambda v: v in MIXES, f"use one of {MIXES}"),
    ("dino_heads", lambda v: v in DINO_MODEL_SETS, f"use one of {tuple(DINO_MODEL_SETS)}"),
    ("retrieval_gallery", lambda v: v in RETRIEVAL_GALLERIES, f"use one of {RETRIEVAL_GALLERIES}"),
    ("dino_gpus", lambda v: v == "auto" or (_is_int(v) and v >= 1), "use 'auto' or a number of GPUs >= 1"),
    ("retrieval_tuning", lambda v: v in RETRIEVAL_TUNINGS, f"use one of {RETRIEVAL_TUNINGS}"),
    ("retrieval_epochs", lambda v: _is_int(v) and v >= 1, "use 1 or more epochs (10 by default)"),
    ("retrieval_lr", lambda v: _is_num(v) and v > 0, "use a positive learning rate, e.g. 1e-5 (LoRA: about 1e-4)"),
    ("clip_model", lambda v: v == "tiny" or str(v).startswith(("hf-hub:", "local-dir:")),
     f"use 'hf-hub:<repo>' (default {BIOMEDCLIP_HUB_ID}), 'local-dir:<folder>' or 'tiny'"),
    ("dino_model", lambda v: v in ("auto", "tiny") or v in timm.list_models("*dinov2*"),
     "use 'auto' (the architecture the weights file holds), 'tiny', or a timm DINOv2 name such as "
     "vit_base_patch14_dinov2"),
    ("dino_weights", lambda v: v in ("", "auto", "random") or urlparse(v).scheme in ("http", "https")
     or Path(v).expanduser().is_file(), "use 'auto' (a *SurgeNet*.pth under kaggle_input), a .pth path or URL, "
     "'' (timm's LVD-142M weights, downloaded) or 'random'"),
    ("device", lambda v: resolve_device(v).type != "cuda" or torch.cuda.is_available(),
     "no CUDA GPU is visible: use 'auto' or 'cpu' (on Kaggle, switch the accelerator on)"),
    ("internet", lambda v: v in ("auto", "on", "off"), "use 'auto' (probed at Setup), 'on' or 'off'"),
    ("keep_runs", lambda v: _is_int(v) and v >= 0, "use 0 or more run folders to keep (2 by default)"),
    ("disk_budget_gb", lambda v: _is_num(v) and v >= 0, "use the GB output_dir may hold (19.5 on Kaggle), 0: no limit"),
    ("time_budget_h", lambda v: _is_num(v) and v >= 0, "use the hours training may take (11.5 on Kaggle), 0: no limit"),
    ("reuse_from", lambda v: v == "" or Path(v).expanduser().is_dir(),
     "use '' or the folder of an earlier run's output (e.g. /kaggle/input/<saved version>/outputs)"),
)


def check_params(p: Mapping[str, object], types: Mapping[str, object] | None = None) -> None:
    """Check the notebook's parameters before any heavy work; one ValueError lists every bad one with
    a value that works. Only the keys present are checked; `types` (the parameters cell's annotations)
    adds a check of each declared type, after runtime.parse_params typed what it could."""
    problems = [f"{name}={p[name]!r}: use a {_type_words(kind)}" for name, kind in (types or {}).items()
                if name in p and not _has_type(p[name], kind)]
    for name, ok, fix in PARAM_RULES:
        try:
            good = name not in p or ok(p[name])
        except (TypeError, ValueError):
            good = False
        if not good:
            problems.append(f"{name}={p[name]!r}: {fix}")
    if problems:
        raise ValueError("Parameters to fix before the run starts:\n- " + "\n- ".join(problems))


def _has_type(value: object, kind: object) -> bool:
    """Whether `value` is of the declared type (an int where a float is declared is a number too; a bool
    never is)."""
    kinds = typing.get_args(kind) or (kind,)
    kinds = (*kinds, int) if float in kinds else kinds
    return any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)) for k in kinds)


def _type_words(kind: object) -> str:
    words = {bool: "boolean: True or False ('true'/'false', 'yes'/'no', 1/0)", int: "whole number such as 3",
             float: "number such as 0.001 or 1e-3", str: "text"}
    return " or a ".join(words.get(k, getattr(k, "__name__", str(k))) for k in typing.get_args(kind) or (kind,))


def resolve_dino_weights(dino_weights: str, dino_model: str,
                         search_roots: Sequence[str | os.PathLike] = ("/kaggle/input",),
                         online: bool = True) -> tuple[str, str]:
    """The `dino_weights` parameter -> (what build_dino loads, a sentence saying what is used and why).

    "auto" looks for a SurgeNet DINOv2 checkpoint (`*SurgeNet*.pth`; with a named dino_model, the one of
    its size, else ViT-B first) under search_roots; none found -> "" (timm's LVD-142M DINOv2 weights,
    downloaded), which with internet off (online False) is refused here, naming the file to attach.
    """
    found = sorted(p for root in map(Path, search_roots) if root.is_dir() for p in root.rglob("*.pth")
                   if "surgenet" in p.name.lower() and "dinov2" in p.name.lower())
    if dino_model == "tiny":
        unused = f" (the SurgeNet file {found[0]} is not used)" if found and dino_weights == "auto" else ""
        return "", f"a tiny random ViT built offline for the demo and tests{unused}; no pretrained weights"
    if dino_weights == "auto":
        sizes = (("small", "vits14"), ("base", "vitb14"), ("large", "vitl14"), ("giant", "vitg14"))
        size = next((tag for key, tag in sizes if key in dino_model), "vitb14")
        if dino_model != "auto":  # a named model takes only a file of its size
            found = [p for p in found if size in p.name.lower()]
        found.sort(key=lambda p: size not in p.name.lower())  # else ViT-B first, stable otherwise
        dino_weights = str(found[0]) if found else ""
        if not found and not online:
            raise RuntimeError(f"dino_weights='auto' found no *SurgeNet*DINOv2*.pth under "
                               f"{list(map(str, search_roots))} and internet is off, so timm's weights cannot be "
                               "downloaded either. Attach "
                               f"DINOv2_ViTb14_size336_SurgeNetXL.pth ({SURGENET_VITB_URL}) as a dataset, or set "
                               "dino_weights to its path.")
        if not found:
            warnings.warn(f"dino_weights='auto' found no *SurgeNet*DINOv2*.pth under {list(map(str, search_roots))}: "
                          "fine-tuning starts from timm's LVD-142M DINOv2 weights instead (downloaded). Attach "
                          f"DINOv2_ViTb14_size336_SurgeNetXL.pth ({SURGENET_VITB_URL}) or set dino_weights.")
    if dino_weights == "":
        return "", "timm's pretrained DINOv2 weights (LVD-142M, downloaded from the Hugging Face hub): no SurgeNet"
    if dino_weights == "random":
        return "random", "random initialisation (a smoke test, not the method)"
    return dino_weights, f"SurgeNet DINOv2 checkpoint {dino_weights}"


# What a run downloads when asked to (checked at Setup when internet is off) and writes (the disk plan).
BIOMEDCLIP_WEIGHTS_BYTES: int = 784_000_000  # open_clip_pytorch_model.bin of the hub repository (ENTREP.md)


RETRIEVAL_TRAINED_SHARE: dict[str, float] = {"tail": 0.2, "lora": 0.02, "off": 0.0}  # of BiomedCLIP's tensors


def _cached(repo: str, filename: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether a hub file is in the local Hugging Face cache (read without network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache_dir), str)


def missing_downloads(clip_model: str, dino_source: str, dino_model: str, clip_cache: str | os.PathLike) -> list[str]:
    """What this run would have to download, one sentence each naming the fix for a run with internet
    off: a hub CLIP not in clip_cache (hf-hub:), timm's DINOv2 weights not in the Hugging Face cache
    (dino_weights=""), a weights URL not in torch's hub cache."""
    out = []
    if clip_model.startswith("hf-hub:") and not _cached(clip_model[len("hf-hub:"):], "open_clip_pytorch_model.bin",
                                                        clip_cache):
        out.append(f"clip_model={clip_model!r} is downloaded from the Hugging Face hub: attach the offline BiomedCLIP "
                   "folder (biomedclip_offline.export_biomedclip, README \"BiomedCLIP offline\") and set "
                   "clip_model='local-dir:/kaggle/input/<its name>'")
    if dino_source == "" and dino_model != "tiny":
        cfg = timm.models.get_pretrained_cfg(DINO_DEFAULT_ARCH if dino_model == "auto" else dino_model)
        if not (cfg and cfg.hf_hub_id and _cached(cfg.hf_hub_id, "model.safetensors")):
            out.append(f"timm's DINOv2 weights are downloaded (dino_weights=''): attach "
                       f"DINOv2_ViTb14_size336_SurgeNetXL.pth ({SURGENET_VITB_URL}) as a dataset and set "
                       "dino_weights='auto'")
    if urlparse(dino_source).scheme in ("http", "https"):
        if not (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(dino_source).path)).is_file():
            out.append(f"dino_weights={dino_source!r} is downloaded: attach the file as a dataset and give its path")
    return out


def dino_parameter_count(dino_model: str, dino_source: str, image_size: int) -> int:
    """Parameters of the DINOv2 backbone a run fine-tunes (the architecture the weights file holds, built
    on the meta device: no memory, no download)."""
    if dino_source not in ("", "random") and dino_model != "tiny":
        name = dino_arch(read_checkpoint(dino_source), dino_source).name
    else:
        name = DINO_DEFAULT_ARCH if dino_model == "auto" else dino_model
    kwargs = dict(DINO_TINY_KWARGS) if name == "tiny" else {}
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch14_dinov2" if name == "tiny" else name, pretrained=False,
                                  img_size=image_size, num_classes=0, **kwargs)
    return sum(t.numel() for t in model.parameters())


def planned_bytes(p: Mapping[str, object], dino_params: int, clip_cache: Path, n_images: int) -> dict[str, int]:
    """What a run with parameters `p` writes at most, from parameter counts (fp32: 4 bytes each; dino_params:
    dino_parameter_count): every finished DINOv2 run's weights (each model of each fold, and the refit), the
    largest run in progress (its last.pt: weights plus AdamW's two moments), the retrieval run's trained
    tensors, BiomedCLIP's download, the embedding caches of n_images images."""
    folds = p.get("cv_folds", 1) + bool(p.get("refit_full", False))
    models, dino = len(DINO_MODEL_SETS[p["dino_heads"]]) * folds, 4 * dino_params
    local = Path(str(p["clip_model"]).removeprefix("local-dir:"), "open_clip_pytorch_model.bin")
    clip = (4 * sum(t.numel() for t in open_clip.CLIP(**TINY_CLIP_CFG).parameters()) if p["clip_model"] == "tiny"
            else local.stat().st_size if local.is_file() else BIOMEDCLIP_WEIGHTS_BYTES)
    tuned = int(clip * (1.0 if p["clip_model"] == "tiny" else RETRIEVAL_TRAINED_SHARE[p["retrieval_tuning"]]))
    download = str(p["clip_model"]).startswith("hf-hub:") and not _cached(
        str(p["clip_model"])[len("hf-hub:"):], "open_clip_pytorch_model.bin", clip_cache)
    return {f"DINOv2 weights ({models} run{'s' * (models > 1)})": models * dino,
            "the training run in progress (last.pt: weights and AdamW moments)": 3 * max(dino, tuned),
            "BiomedCLIP tuned for retrieval": tuned,
            "BiomedCLIP download": clip if download else 0,
            "embedding caches (BiomedCLIP frozen and tuned, DINOv2)": n_images * (2 * 512 + 1024 + 16) * 4}


def count_images(root: str | os.PathLike | None) -> int:
    """Image files under root (0 when it is not a folder yet, e.g. the demo set before it is drawn)."""
    root = Path(root) if root else None
    return sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if root and root.is_dir() else 0


def cpu_hours(p: Mapping[str, object], dino_params: int, n_images: int, cores: int,
              gflops_per_core: float = 50.0) -> float:
    """An estimate of the hours DINOv2's fine-tuning alone takes on `cores` CPU cores: 6 FLOPs per parameter
    and token (forward and backward) for n_images images in every epoch of every model of every fold (and the
    refit), at gflops_per_core
    (what one core of this project's CPUs sustained in fp32 matrix multiplies, README "Performance")."""
    tokens = (p["image_size"] // 14) ** 2 + 1
    folds = p.get("cv_folds", 1) + bool(p.get("refit_full", False))  # each fold trains on most of the images
    images = n_images * p["epochs"] * len(DINO_MODEL_SETS[p["dino_heads"]]) * folds
    return 6 * dino_params * tokens * images / (cores * gflops_per_core * 1e9) / 3600


def check_downloads(online: bool, clip_model: str, dino_source: str, dino_model: str,
                    clip_cache: str | os.PathLike) -> list[str]:
    """missing_downloads, refused at Setup when internet is off (no silent fallback to a download that
    fails after minutes of work); with internet on, what will be downloaded."""
    needed = missing_downloads(clip_model, dino_source, dino_model, clip_cache)
    if needed and not online:
        raise RuntimeError("Internet is off and this run would download:\n- " + "\n- ".join(needed))
    return needed
