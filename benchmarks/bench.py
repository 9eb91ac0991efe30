"""Speed of the project's compute paths, measured in one run (issue 6).

    make bench                                # everything, as the README's table: 12-19 minutes here (2 shared cores)
    python benchmarks/bench.py --quick        # fewer variants, smaller sizes: 5-7 minutes here
    python benchmarks/bench.py --smoke        # every section at its smallest size, under a minute (its test)
    python benchmarks/bench.py --device cuda --compile   # on a GPU, torch.compile tried too

Sections (each calls the project's own helpers in utils.py, training.py, retrieval.py and runtime.py, never a
copy of them):
  peak        matrix-multiply rate per dtype (fp32, bf16; fp16 on GPU), best of several tries
  embedding   BiomedCLIP's image tower (timm ViT-B/16 + linear projection, as open_clip builds it)
              and DINOv2 ViT-B/14 (the paper's, no registers) at 224 px, random weights: the naive
              way (one image at a time, fp32) against utils.encode_batches / utils.collect_logits,
              the inner loops of utils.embed_images and utils.predict_dino; images/s and fraction of the peak
  decode      640x480 PNG decode + resize per worker: utils.load_rgb, the CLIP preprocess,
              utils.decode_square, and utils.SquareImages (which decodes in threads)
  finetune    training._train_epoch steps/s (a training.DinoTraining recipe: DinoClassifier, multitask loss,
              AdamW, autocast) and the per-worker rate of the recipe's training augmentation (SquareImages)
  heads       one shared DINOv2 with four heads against the paper's four separate models
              (utils.DINO_MODEL_SETS) on the demo data, each in a fresh process; and the real-size
              estimate (ViT-B/14 at 336 px, the real releases' label counts)
  notebook    the demo notebook (configs/demo.yaml) run twice into one temp output_dir
  retrieval   retrieval.cosine_topk (exact, full sort) at 10^4 to 10^6 gallery rows

--smoke runs every section at the smallest size that still calls the same code (images of 112 px, batches
of 2, one try, a small demo set and one epoch for heads, the real-size count at 112 px) except the notebook
runs, which take minutes (tests/test_notebook.py runs the notebook): only configs/demo.yaml is checked
against the notebook's parameters cell. Its numbers measure nothing; it shows the benchmark still runs.

The machine may be shared: every peak is the best of several tries taken in the same run, the
matrix-multiply probe is interleaved with the embedding measurements, and the load average is
recorded. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from memory import in_fresh_process  # noqa: E402  (benchmarks/memory.py: peak RSS of a fresh process)
from open_clip.timm_model import TimmModel  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import demo_data  # noqa: E402
import retrieval  # noqa: E402
import runtime  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
# What the Makefile exports for `make demo` / `make test`: OpenMP threads that spin while they wait
# starve another process's threads on a shared machine (see benchmarks/README.md).
DEMO_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# The public release's label counts (data.json, ENTREP.md); the train release's are demo_data.REAL_CLS_COUNTS.
PUBLIC_CLS_COUNTS = {"nose-left": 180, "nose-right": 128, "vc-open": 80, "vc-closed": 62, "ear-left": 45,
                     "ear-right": 44, "throat": 27}
# The demo's DINOv2 settings (configs/demo.yaml) for the heads section.
DEMO_DINO = {"image_size": 84, "val_fraction": 0.15, "config": training.DinoConfig(
    epochs=20, batch_size=32, lr_head=0.005, lr_backbone=0.002, seed=0)}


# ============================================================================================
# Timing and memory
# ============================================================================================

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes: CUDA events on a GPU (after a synchronize), else perf_counter."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_best(variants: dict[str, tuple[Callable[[], object], float]], device: torch.device,
                     rounds: int, warmup: bool = False,
                     probes: dict[str, tuple[Callable[[], object], float]] | None = None) -> dict[str, dict]:
    """{name: (fn, work units per call)} -> {name: best and all rates}: `rounds` rounds that call
    every variant in turn, so a noisy neighbour hits them all alike. `probes` (matmul workloads)
    are timed before every variant call: a peak taken next to each measurement it is compared
    with. `warmup`: one untimed call each first (GPU: kernel selection, lazy init; compiled models)."""
    probes = probes or {}
    if warmup:
        for fn, _ in [*variants.values(), *probes.values()]:
            fn()
    rates: dict[str, list[float]] = {name: [] for name in [*variants, *probes]}
    for _ in range(rounds):
        for name, (fn, work) in variants.items():
            for probe_name, (probe_fn, probe_work) in probes.items():
                rates[probe_name].append(probe_work / time_call(probe_fn, device))
            rates[name].append(work / time_call(fn, device))
    return {name: {"best": max(r), "tries": [round(x, 4) for x in r]} for name, r in rates.items() if r}


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS deltas start clean."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_rss(result: dict):
    """Sample RSS every 2 ms while the block runs; result['peak_delta_bytes'] = peak - start.
    (tracemalloc does not see torch's allocations, so RSS it is.)"""
    release_memory()
    start, peak, stop = rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        result["peak_delta_bytes"] = max(0, max(peak[0], rss_bytes()) - start)


def mib(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.0f} MiB"


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# ============================================================================================
# (a) Matrix-multiply peak
# ============================================================================================

def matmul_probe(dtype: torch.dtype, device: torch.device, budget_s: float,
                 shape: tuple[int, int, int] | None = None) -> tuple[Callable[[], object], float]:
    """A matrix multiply of about `budget_s` per call, in nn.Linear's layout (F.linear: x (m, k)
    times a weight stored (n, k); emulated bf16 on AVX2 CPUs runs 10x slower in the other layout):
    `shape` = (m, k, n), else square and sized to this dtype's rate here (emulated dtypes are
    orders of magnitude slower: a fixed size could take minutes). Returns (fn, FLOP per call)."""
    def operands(m: int, k: int, n: int):
        return torch.randn(m, k, device=device).to(dtype), torch.randn(n, k, device=device).to(dtype)

    if shape is None:
        n_max = 8192 if device.type == "cuda" else 2048
        n = 128
        while True:  # grow while a call at the next size (8x the work) fits in a quarter of the budget
            x, w = operands(n, n, n)
            seconds = min(time_call(lambda: F.linear(x, w), device) for _ in range(2))
            if n >= n_max or seconds * 8 * 4 > budget_s:
                break
            n *= 2
        shape = (n, n, n)
    else:
        x, w = operands(*shape)
        seconds = min(time_call(lambda: F.linear(x, w), device) for _ in range(2))
    reps = max(1, round(budget_s / max(seconds, 1e-6)))

    def fn():
        for _ in range(reps):
            F.linear(x, w)

    return fn, 2.0 * math.prod(shape) * reps


def peak_dtypes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        names = ["fp32", "fp16"]
        return names + ["bf16"] if torch.cuda.is_bf16_supported(including_emulation=False) else names
    return ["fp32", "bf16"]


def measure_peaks(device: torch.device, tries: int, budget_s: float) -> dict[str, dict]:
    """FLOP/s per dtype: the best of `tries` interleaved calls of a square matmul and of a ViT-B MLP
    matmul (8 images x 197 tokens, 768 -> 3072), whichever is faster for that dtype here."""
    probes = {}
    for name in peak_dtypes(device):
        probes[f"{name} square"] = matmul_probe(DTYPES[name], device, budget_s)
        probes[f"{name} ViT MLP"] = matmul_probe(DTYPES[name], device, budget_s, (8 * 197, 768, 3072))
    best = interleaved_best(probes, device, tries, warmup=device.type == "cuda")
    out = {}
    for name in peak_dtypes(device):
        mine = {k: v for k, v in best.items() if k.split()[0] == name}
        out[name] = {"flops": max(v["best"] for v in mine.values()),
                     "by_probe": {k: v["best"] for k, v in mine.items()}}
    return out


# ============================================================================================
# Models (random weights: weights do not change speed)
# ============================================================================================

class ImageTower(torch.nn.Module):
    """An image tower exposing open_clip's `encode_image`, the call utils.embed_images makes."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    forward = encode_image


def build_biomedclip_image_tower(device: torch.device, image_size: int = 224) -> ImageTower:
    """BiomedCLIP's image tower as open_clip builds it from the hub config (vision_cfg: timm
    vit_base_patch16_224, pool "", linear projection to 512), with random weights; another image_size
    (a multiple of 16; --smoke) resizes its position embedding."""
    torch.manual_seed(0)
    visual = TimmModel("vit_base_patch16_224", embed_dim=512, image_size=224, pool="", proj="linear",
                       pretrained=False)
    if image_size != 224:
        visual.set_input_size(image_size)
    return ImageTower(visual).to(device).eval()


def flops_per_image(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """FLOPs (2 per multiply-add) of fn(x) / batch size, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(x)
    return counter.get_total_flops() / x.shape[0]


def train_flops(net: utils.DinoClassifier, x: torch.Tensor, amp: torch.dtype | None) -> tuple[float, float]:
    """(forward, backward) FLOPs per image of the multitask loss on batch x (all labels 0)."""
    device = x.device
    with FlopCounterMode(display=False) as forward, runtime.autocast(device, amp):
        loss = training.multitask_loss(net(x), torch.zeros(len(x), dtype=torch.long, device=device))
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    net.zero_grad(set_to_none=True)
    return forward.get_total_flops() / len(x), backward.get_total_flops() / len(x)


def mlp_gemm_shape(model: torch.nn.Module, batch: int) -> tuple[int, int, int]:
    """(batch x tokens, width, MLP hidden) of a timm ViT's fc1: its largest matrix multiply."""
    vit = next(m for m in model.modules() if hasattr(m, "patch_embed") and hasattr(m, "blocks"))
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    fc1 = vit.blocks[0].mlp.fc1
    return batch * tokens, fc1.in_features, fc1.out_features


def set_fused_attention(model: torch.nn.Module, on: bool) -> None:
    """timm Attention blocks: F.scaled_dot_product_attention (fused) or the explicit softmax path."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = on


# ============================================================================================
# (b) Embedding throughput
# ============================================================================================

def embedding_section(args, device: torch.device, peaks: dict) -> dict:
    amp = runtime.autocast_dtype(device)
    amp_name = DTYPE_NAMES[amp]
    probe_dtype = torch.float32 if amp is None else amp
    square_probe = matmul_probe(probe_dtype, device, args.peak_budget)
    size = args.embed_size
    out = {"batch": args.batch, "image_size": size, "project_amp": amp_name, "models": {}}
    models = {
        "biomedclip_vit_b16": lambda: build_biomedclip_image_tower(device, size),
        "dinov2_vit_b14": lambda: utils.build_dino(utils.DINO_DEFAULT_ARCH, "random", size, seed=0).to(device).eval(),
    }
    for model_name, build in models.items():
        model = build()
        clip = hasattr(model, "encode_image")
        encode = model.encode_image if clip else model
        x = torch.randn(args.batch, 3, size, size, device=device)
        flops = flops_per_image(encode, x[:1])

        def project(amp_dtype=amp, inputs=x, fn=encode):
            # the inner loops of utils.embed_images (CLIP) and utils.predict_dino / dino_features (DINOv2)
            if clip:
                return utils.encode_batches(fn, [inputs], device, amp_dtype)
            batches = [(inputs, torch.zeros(len(inputs), dtype=torch.long))]
            return utils.collect_logits(fn, batches, device, amp_dtype)

        def naive(n=args.naive_images):
            with torch.no_grad():
                return [encode(x[i:i + 1]).cpu() for i in range(n)]

        variants = {"naive fp32, 1 image at a time": (naive, args.naive_images),
                    f"project: batch {args.batch}, {amp_name}": (project, args.batch)}
        if not args.quick:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            variants["project + channels_last input"] = (lambda: project(inputs=x_cl), args.batch)

            def eager_attention():
                set_fused_attention(model, False)
                try:
                    return project()
                finally:
                    set_fused_attention(model, True)

            variants["project, attention without SDPA"] = (eager_attention, args.batch)
        for name in peak_dtypes(device) if device.type == "cuda" or not args.quick else []:
            if name != amp_name:  # evidence for autocast_dtype's choice; emulated bf16 (AVX2) on 2 images only
                n = 2 if device.type == "cpu" and name == "bf16" else args.batch
                variants[f"batch {n}, {name}" + (" autocast" if name != "fp32" else "")] = (
                    lambda d=DTYPES[name], n=n: project(amp_dtype=None if d == torch.float32 else d, inputs=x[:n]),
                    n)
        compile_s = None
        if args.compile:
            t0 = time.perf_counter()
            compiled = torch.compile(encode)
            project(fn=compiled)
            synchronize(device)
            compile_s = time.perf_counter() - t0
            variants["project + torch.compile"] = (lambda: project(fn=compiled), args.batch)
        mlp_shape = mlp_gemm_shape(model, args.batch)
        probes = {"square matmul": square_probe,
                  "MLP-shaped matmul": matmul_probe(probe_dtype, device, args.peak_budget, mlp_shape)}
        print(f"  {model_name}: {flops / 1e9:.1f} GFLOP/image; {len(variants)} variants x {args.rounds} rounds, "
              f"matmul probes before each", flush=True)
        load = load_average()
        rates = interleaved_best(variants, device, args.rounds, warmup=device.type == "cuda", probes=probes)
        probe_best = {name: rates.pop(name)["best"] for name in probes}
        peak = peaks[amp_name]
        peak["flops"] = max(peak["flops"], *probe_best.values())
        for name, value in probe_best.items():
            peak.setdefault("by_probe", {})[f"{model_name}: {name}"] = value
        # the peak this model is compared with: the best probe taken between its own calls, so a
        # neighbour's load that comes or goes between sections does not skew the fraction
        entry = {"gflop_per_image": flops / 1e9, "compile_s": compile_s, "load_average_before": load,
                 "peak_flops": max(probe_best.values()), "probe_flops": probe_best, "variants": {}}
        for name, r in rates.items():
            entry["variants"][name] = {"images_per_s": r["best"], "tries": r["tries"],
                                       "achieved_tflops": r["best"] * flops / 1e12}
        out["models"][model_name] = entry
        model = x = None  # free before the next model (the closures above are done)
        release_memory()
    return out


def embed_images_end_to_end(args, device: torch.device, paths: list[Path]) -> dict:
    """utils.embed_images as the notebook calls it (a utils.Clip, a runtime.Runtime with the device's autocast
    dtype, decode in DataLoader workers, no cache), once; the model's fingerprint (its cache identity) is
    part of the time, as in the notebook."""
    size = args.embed_size
    clip = utils.Clip(build_biomedclip_image_tower(device, size),
                      image_transform_v2(PreprocessCfg(size=size), is_train=False), tokenizer=None)
    workers = min(4, runtime.cpu_count())
    rt = runtime.Runtime(device, runtime.autocast_dtype(device), args.batch, workers, progress=False)
    utils.embed_images(clip, paths[:2], replace(rt, num_workers=0))  # warm-up
    t = time_call(lambda: utils.embed_images(clip, paths, rt), device)
    return {"images": len(paths), "image_size": size, "num_workers": workers, "images_per_s": len(paths) / t}


# ============================================================================================
# (c) Decode and resize
# ============================================================================================

def write_pngs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n synthetic 640x480 endoscopy frames (demo_data.render_demo_image), saved as the demo saves them."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        label = utils.LABELS[i % len(utils.LABELS)]
        view = demo_data.demo_view(demo_data.demo_exam(utils.LABEL_TO_COARSE[label], rng), label, rng)
        paths.append(folder / f"frame{i:03d}.png")
        demo_data.render_demo_image(view).save(paths[-1], compress_level=1)
    return paths


def decode_section(args, paths: list[Path]) -> dict:
    clip_items = utils.ImagePathDataset(paths, image_transform_v2(PreprocessCfg(size=224), is_train=False))
    size = training.train_square_side(336)
    fns = {
        "decode only (utils.load_rgb)": lambda: [utils.load_rgb(p) for p in paths],
        "CLIP: decode + preprocess 224 (ImagePathDataset)": lambda: [clip_items[i] for i in range(len(paths))],
        "DINOv2: utils.decode_square 224": lambda: [utils.decode_square(p, 224) for p in paths],
        f"DINOv2: utils.decode_square {size} (train cache at 336)":
            lambda: [utils.decode_square(p, size) for p in paths],
        f"utils.SquareImages 224 ({min(8, runtime.cpu_count() + 2)} threads, {runtime.cpu_count()} cores)":
            lambda: utils.SquareImages(paths, None, lambda im: im, 224),
    }
    rates = interleaved_best({k: (fn, len(paths)) for k, fn in fns.items()}, torch.device("cpu"), args.rounds)
    return {"images": len(paths), "size": list(demo_data.DEMO_SIZE), "cores": runtime.cpu_count(),
            "images_per_s": {k: r["best"] for k, r in rates.items()}}


# ============================================================================================
# (d) Fine-tuning
# ============================================================================================

def dino_recipe(model: utils.DinoClassifier, paths: list[Path], label_ids: list[int], cfg: training.DinoConfig,
                rt: runtime.Runtime) -> training.DinoTraining:
    """training.DinoTraining (train_dino's recipe) with one row per label id, on `paths` in turn (training
    and validation alike): its loss (class weights from these labels), parameter groups and loader are the
    notebook's. Nothing is trained here; the benchmark calls the pieces it times."""
    sha1 = {p: utils.file_sha1(p) for p in paths}
    rows = [paths[i % len(paths)] for i in range(len(label_ids))]
    frame = pd.DataFrame({"path": [str(p) for p in rows], "label_id": [int(y) for y in label_ids],
                          "sha1": [sha1[p] for p in rows]})
    return training.DinoTraining(model, frame, frame, cfg, rt, "bench")


def finetune_case(model_name: str, image_size: int, batch: int, steps: int, device: torch.device,
                  amp: torch.dtype | None, paths: list[Path]) -> dict:
    """Steps/s of training._train_epoch (forward, multitask loss, backward, clipping, AdamW, scheduler)
    on random batches, with a training.DinoTraining recipe and its training._Optimization, as fit() runs
    them; FLOPs per image of forward + backward."""
    weights = "random" if model_name != "tiny" else ""
    net = utils.DinoClassifier(utils.build_dino(model_name, weights, image_size, 0)).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, image_size, image_size, generator=g), torch.randint(0, 7, (batch,), generator=g))
               for _ in range(steps)]
    rt = runtime.Runtime(device, amp, batch, progress=False)
    labels = [int(y) for _, yb in batches for y in yb]
    recipe = dino_recipe(net, paths, labels, training.DinoConfig(batch_size=batch), rt)
    opt = training._Optimization(recipe, len(batches), rt)
    net = runtime.data_parallel(net, rt)  # what fit() trains: the model itself on one device
    flops = sum(train_flops(recipe.model, batches[0][0].to(device), amp))
    run = lambda b: training._train_epoch(net, b, recipe, opt, rt)
    run(batches[:1])  # warm-up: allocator, optimizer state
    seconds = time_call(lambda: run(batches), device)
    return {"model": model_name, "image_size": image_size, "batch": batch, "steps": steps, "amp": DTYPE_NAMES[amp],
            "steps_per_s": steps / seconds, "images_per_s": steps * batch / seconds,
            "gflop_per_image_fwd_bwd": flops / 1e9, "achieved_tflops": steps * batch * flops / seconds / 1e12}


def augment_rate(paths: list[Path], image_size: int, rounds: int) -> dict:
    """Per-worker rate of the training input pipeline after the decode: the items of the dataset that
    training.DinoTraining.loader builds (SquareImages: cached uint8 square -> flip + label swap, then
    training.train_transform: rotation, random resized crop, colour jitter)."""
    model = utils.DinoClassifier(utils.build_dino("tiny", "", image_size))
    recipe = dino_recipe(model, paths, [0] * len(paths), training.DinoConfig(), runtime.Runtime(progress=False))
    dataset = recipe.loader().dataset
    keys = [(i, 1000 + i) for i in range(len(paths))]
    rate = interleaved_best({"augment": (lambda: [dataset[k] for k in keys], len(keys))}, torch.device("cpu"), rounds)
    return {"image_size": image_size, "flip_p": dataset.flip_p, "items_per_s_per_worker": rate["augment"]["best"]}


def finetune_section(args, device: torch.device, paths: list[Path]) -> dict:
    amp = runtime.autocast_dtype(device)
    # the demo's configuration (configs/demo.yaml); --smoke: batch 8, 2 steps
    cases = [("tiny", 84, 8 if args.smoke else 32, 2 if args.smoke else args.train_steps * 2)]
    if device.type == "cuda" and not args.smoke:
        cases.append((utils.DINO_DEFAULT_ARCH, 336, 32, args.train_steps))  # the paper's configuration
    elif not args.quick:
        cases.append(("vit_small_patch14_dinov2", 224, 8, args.train_steps))  # what a CPU finishes
    out = {"cases": [finetune_case(m, s, b, n, device, amp, paths) for m, s, b, n in cases]}
    augment_size = args.embed_size if args.smoke else 336 if device.type == "cuda" else 224
    out["augmentation"] = augment_rate(paths, augment_size, args.rounds)
    out["num_workers"] = {"default_for_device": runtime.default_num_workers(device), "cores_here": runtime.cpu_count()}
    release_memory()
    return out


# ============================================================================================
# (e) Heads: one shared DINOv2 against the paper's four separate models
# ============================================================================================

def train_and_predict(heads: str, data_root: str, checkpoint_dir: str, settings: dict = DEMO_DINO) -> dict:
    """The notebook's DINOv2 steps for one dino_heads value at the demo's settings: train every
    model of DINO_MODEL_SETS[heads] (training.train_dino), predict the validation images with flip TTA
    (utils.predict_dino), score 7 classes. The CPU, its autocast dtype, no workers, no prediction cache."""
    data = utils.load_entrep(data_root)
    train_idx, val_idx, _ = utils.split_train_val(data.images, data.i2i, settings["val_fraction"], 0, "grouped")
    train, val = data.images.iloc[train_idx].reset_index(drop=True), data.images.iloc[val_idx].reset_index(drop=True)
    device, cfg = torch.device("cpu"), settings["config"]
    rt = runtime.Runtime(device, runtime.autocast_dtype(device), batch_size=64, checkpoint_dir=Path(checkpoint_dir),
                         progress=False)
    t0, trained, images, seen, epochs = time.perf_counter(), [], 0, 0, {}
    for name, tasks in utils.DINO_MODEL_SETS[heads].items():
        model = utils.DinoClassifier(utils.build_dino("tiny", "", settings["image_size"], 0), tasks)
        trained.append(training.train_dino(model, train, val, cfg, rt, name=f"dino_{name}"))
        mine = int(training.task_images(tasks, train["label_id"]).sum())
        epochs[name] = len(trained[-1].history)  # early stopping (cfg.patience) may end a run before cfg.epochs
        images, seen = images + mine, seen + mine * epochs[name]
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = utils.predict_dino(trained, val["path"].tolist(), rt, content=data.sha1, tta_flip=True)
    predict_s = time.perf_counter() - t0
    pred = utils.dino_labels(probs)
    return {"heads": heads, "models": len(trained), "train_s": train_s, "predict_s": predict_s, "epochs_run": epochs,
            "train_images": len(train), "val_images": len(val), "images_per_epoch": images,
            "images_seen": seen, **utils.summary_metrics(val["label_id"], pred)}


def real_size_estimate(device: torch.device, image_size: int = 336) -> dict:
    """The paper's setting, counted: ViT-B/14 (no registers) at 336 px (--smoke: smaller), parameters and
    forward / backward FLOPs per image (batch 1, fp32), times the images each dino_heads value trains on per
    epoch with the real labelled images (train + public release, pooled) and predicts with."""
    counts = {k: demo_data.REAL_CLS_COUNTS[k] + PUBLIC_CLS_COUNTS[k] for k in utils.LABELS}
    labels = np.repeat([utils.LABEL_TO_ID[k] for k in counts], list(counts.values()))
    net = utils.DinoClassifier(utils.build_dino("auto", "random", image_size, 0)).to(device)
    forward, backward = train_flops(net, torch.randn(1, 3, image_size, image_size, device=device), None)
    params = sum(p.numel() for p in net.backbone.parameters())
    out = {"model": utils.DINO_DEFAULT_ARCH, "image_size": image_size, "labelled_images": len(labels),
           "backbone_params": params, "gflop_forward": forward / 1e9, "gflop_fwd_bwd": (forward + backward) / 1e9,
           "variants": {}}
    for heads, models in utils.DINO_MODEL_SETS.items():
        per_model = {name: int(training.task_images(tasks, labels).sum()) for name, tasks in models.items()}
        images = sum(per_model.values())
        out["variants"][heads] = {
            "models": len(models), "images_per_epoch": images, "images_per_epoch_by_model": per_model,
            "backbone_params_held": len(models) * params, "weights_mb_fp32": len(models) * params * 4 / 2**20,
            "tflop_per_epoch": images * (forward + backward) / 1e12,
            "gflop_predict_per_image_tta": len(models) * 2 * forward / 1e9}
    return out


# --smoke: a small demo set, one epoch at 42 px, one try, in this process (a fresh process imports for ~10 s:
# no peak RSS), the real-size count at 112 px
SMOKE_DEMO = {"n_train": 40, "n_public": 12, "n_test": 4, "n_i2i_pairs": 4, "n_t2i": 4, "n_unlisted": 2}
SMOKE_DINO = {**DEMO_DINO, "image_size": 42, "config": replace(DEMO_DINO["config"], epochs=1)}


def in_this_process(target: Callable, *args) -> dict:
    """target(*args) here (--smoke), shaped as in_fresh_process's answer: no peak RSS."""
    t0 = time.perf_counter()
    return {**target(*args), "peak_mb": None, "children_peak_mb": None, "seconds": time.perf_counter() - t0}


def heads_section(args, device: torch.device) -> dict:
    settings, run_in = (SMOKE_DINO, in_this_process) if args.smoke else (DEMO_DINO, in_fresh_process)
    if args.smoke:
        print("  --smoke: a small demo set, one epoch, each variant in this process (no peak RSS)", flush=True)
    out: dict = {"settings": {"model": "tiny", **{k: str(v) for k, v in settings.items()}, "tta_flip": True},
                 "fresh_processes": not args.smoke,
                 "imports_only_peak_mb": None if args.smoke else in_fresh_process(dict)["peak_mb"], "tries": []}
    with tempfile.TemporaryDirectory(prefix="bench_heads_") as tmp:
        root = demo_data.make_demo_dataset(Path(tmp) / "demo", seed=0, **(SMOKE_DEMO if args.smoke else {}))
        for t in range(args.heads_tries):  # interleaved, each with its own fresh checkpoint_dir
            for heads in utils.DINO_MODEL_SETS:
                checkpoints = str(Path(tmp) / f"checkpoints_{heads}_{t}")
                run = run_in(train_and_predict, heads, str(root), checkpoints, settings)
                print(f"  {heads}: train {run['train_s']:.1f} s, predict {run['predict_s']:.2f} s, "
                      f"peak {mib(run['peak_mb'])}, {run['images_per_epoch']} images/epoch, "
                      f"accuracy {run['accuracy']:.3f}", flush=True)
                out["tries"].append(run)
    out["best"] = {}
    for heads in utils.DINO_MODEL_SETS:  # fastest times and the largest peak of its tries
        runs = [r for r in out["tries"] if r["heads"] == heads]
        peaks = [r["peak_mb"] for r in runs if r["peak_mb"] is not None]
        out["best"][heads] = {**runs[0], "train_s": min(r["train_s"] for r in runs),
                              "predict_s": min(r["predict_s"] for r in runs), "peak_mb": max(peaks, default=None)}
    out["real_size"] = real_size_estimate(device, 112 if args.smoke else 336)
    release_memory()
    return out


# ============================================================================================
# (f) Demo notebook: first run and cached rerun
# ============================================================================================

NOTEBOOK = ROOT / "entrep-prototypical.ipynb"


def demo_params() -> dict:
    """configs/demo.yaml, checked against the notebook's parameters cell."""
    import papermill as pm
    import yaml

    params = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    unknown = set(params) - set(pm.inspect_notebook(str(NOTEBOOK)))
    if unknown:
        raise ValueError(f"configs/demo.yaml sets {sorted(unknown)}, which the notebook's parameters cell does "
                         "not define.")
    return params


def notebook_section(keep_dir: Path | None) -> dict:
    """configs/demo.yaml run twice into one output_dir, as `make demo` runs it: the kernel inherits
    this process's environment, with the Makefile's OMP_WAIT_POLICY default."""
    import papermill as pm

    for key, value in DEMO_ENV.items():
        os.environ.setdefault(key, value)
    notebook, params = NOTEBOOK, demo_params()
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        out = Path(keep_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        params["output_dir"] = str(out)
        runs = []
        for run in ("first", "rerun"):
            load = load_average()
            t0 = time.perf_counter()
            nb = pm.execute_notebook(str(notebook), str(out / f"executed_{run}.ipynb"),
                                     parameters=params, cwd=str(ROOT), progress_bar=False, log_output=False)
            seconds = time.perf_counter() - t0
            cells = sorted(((c.metadata.get("papermill", {}).get("duration") or 0.0, c.source.splitlines()[0][:60])
                            for c in nb.cells if c.cell_type == "code" and c.source), reverse=True)
            runs.append({"run": run, "seconds": seconds, "load_average_before": load,
                         "slowest_cells": [{"seconds": round(s, 2), "cell": src} for s, src in cells[:5]],
                         "cells_total_s": round(sum(s for s, _ in cells), 2)})
    return {"config": "configs/demo.yaml", "env": {k: os.environ[k] for k in DEMO_ENV}, "runs": runs,
            "rerun_fraction": runs[1]["seconds"] / runs[0]["seconds"]}


# ============================================================================================
# Retrieval at scale
# ============================================================================================

def synthetic_embeddings(n: int, n_queries: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered unit gallery rows [n, dim] (n/100 clusters) and queries that are noisy copies of
    random gallery rows (a near-duplicate view, as in Track 2)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, n // 100), dim, generator=g), dim=-1)
    gallery = centres[torch.randint(len(centres), (n,), generator=g)]
    gallery = F.normalize(gallery.add_(torch.randn(n, dim, generator=g).mul_(0.8 / math.sqrt(dim))), dim=-1)
    src = torch.randint(n, (n_queries,), generator=g)
    queries = F.normalize(gallery[src] + torch.randn(n_queries, dim, generator=g) * (0.5 / math.sqrt(dim)), dim=-1)
    return gallery, queries


def retrieval_section(args) -> list[dict]:
    """retrieval.cosine_topk (exact: a full stable sort of each block of at most 2^24 scores) per gallery size:
    ms per query in a batch and alone, the extra RSS while it runs, and whether the top 1 finds the
    gallery row each query was copied from."""
    cpu, rows = torch.device("cpu"), []
    for n in args.gallery_sizes:
        gallery, queries = synthetic_embeddings(n, args.queries, 512, seed=n)
        search = lambda q: retrieval.cosine_topk(q, gallery, args.k)
        mem: dict = {}
        with peak_rss(mem):
            batch_s = time_call(lambda: search(queries), cpu)
        one_s = min(time_call(lambda: search(queries[:1]), cpu) for _ in range(3))
        row = {"gallery": n, "queries": args.queries, "k": args.k, "block_queries": max(1, 2**24 // n),
               "ms_per_query_batched": 1000 * batch_s / args.queries, "ms_one_query": 1000 * one_s,
               "search_peak_mb": mem["peak_delta_bytes"] / 2**20, "gallery_mb": gallery.nbytes / 2**20}
        print(f"  {n:>8}: {row['ms_per_query_batched']:8.3f} ms/query, one query {row['ms_one_query']:8.2f} ms, "
              f"peak +{row['search_peak_mb']:.0f} MiB", flush=True)
        rows.append(row)
        gallery = queries = search = None
        release_memory()
    return rows


# ============================================================================================
# Targets, table, main
# ============================================================================================

def machine_info(device: torch.device) -> dict:
    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name")), cpu_model)
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu_model, "cores": runtime.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "python": platform.python_version(), "autocast_dtype": str(runtime.autocast_dtype(device)),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_start": load_average()}


def targets(result: dict) -> list[dict]:
    """The issue's targets as measured ratios: met or missed, and by how much."""
    out = []
    peaks = result.get("peak", {})
    if peaks and "embedding" in result:
        amp_name = result["embedding"]["project_amp"]  # the probes measured alongside run in this dtype
        for model, entry in result["embedding"]["models"].items():
            variants = entry["variants"]
            project = next(v for k, v in variants.items() if k.startswith("project:"))
            naive = next(v for k, v in variants.items() if k.startswith("naive"))
            implied = entry["peak_flops"] / (entry["gflop_per_image"] * 1e9)
            out.append(_target(f"{model}: project path / {amp_name}-peak-implied images/s",
                               project["images_per_s"] / implied, 0.80,
                               f"{project['images_per_s']:.2f} of {implied:.2f} images/s "
                               f"({entry['peak_flops'] / 1e9:.0f} GFLOP/s measured alongside)"))
            out.append(_target(f"{model}: project path / naive", project["images_per_s"] / naive["images_per_s"], 3.0,
                               f"{project['images_per_s']:.2f} vs {naive['images_per_s']:.2f} images/s"))
    if "notebook" in result:
        nb = result["notebook"]
        out.append(_target("demo: cached rerun / first run", nb["rerun_fraction"], 0.20,
                           f"{nb['runs'][1]['seconds']:.0f} s / {nb['runs'][0]['seconds']:.0f} s",
                           higher_is_better=False))
        out.append(_target("demo: first run end to end (s)", nb["runs"][0]["seconds"], 180.0,
                           f"load average before: {nb['runs'][0]['load_average_before']}", higher_is_better=False))
    return out


def _target(name: str, value: float, threshold: float, note: str, higher_is_better: bool = True) -> dict:
    met = value >= threshold if higher_is_better else value <= threshold
    missed_by = None if met else (threshold / value if higher_is_better else value / threshold)
    return {"target": name, "op": ">=" if higher_is_better else "<=", "value": value, "threshold": threshold,
            "met": met, "missed_by_factor": missed_by, "note": note}


def heads_rows(heads: dict) -> list[tuple[str, str, str]]:
    rows = []
    if heads["imports_only_peak_mb"] is not None:
        rows.append(("heads", "fresh process, imports only (baseline of the peaks below)",
                     f"peak {heads['imports_only_peak_mb']:.0f} MiB"))
    for name, r in heads["best"].items():
        epochs = "+".join(str(e) for e in r["epochs_run"].values())
        rows.append(("heads", f"demo, {name}: {r['models']} tiny model(s), {r['train_images']} train / "
                              f"{r['val_images']} val images",
                     f"train {r['train_s']:.1f} s ({epochs} epochs), predict {r['predict_s']:.2f} s, "
                     f"peak {mib(r['peak_mb'])}, {r['images_per_epoch']} images/epoch ({r['images_seen']:,} seen), "
                     f"accuracy {r['accuracy']:.3f}, macro F1 {r['macro_f1']:.3f}"))
    real = heads["real_size"]
    for name, v in real["variants"].items():
        rows.append(("heads", f"real size, {name}: ViT-B/14 {real['image_size']} px ({real['gflop_fwd_bwd']:.0f} GFLOP "
                              f"fwd+bwd, {real['gflop_forward']:.0f} fwd per image), {real['labelled_images']:,} "
                              "labelled images",
                     f"{v['images_per_epoch']:,} images/epoch = {v['tflop_per_epoch']:,.0f} TFLOP/epoch; "
                     f"{v['models']} backbone(s) x {real['backbone_params'] / 1e6:.1f}M parameters "
                     f"({v['weights_mb_fp32']:,.0f} MiB fp32); predict {v['gflop_predict_per_image_tta']:.0f} "
                     "GFLOP/image with flip TTA"))
    return rows


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, p in result.get("peak", {}).items():
        where = max(p["by_probe"], key=p["by_probe"].get)
        rows.append(("peak", f"matmul {name} (best of {len(p['by_probe'])} probes: {where})",
                     f"{p['flops'] / 1e9:,.1f} GFLOP/s"))
    best = max(result["peak"].values(), key=lambda p: p["flops"])["flops"] if result.get("peak") else None
    for model, entry in result.get("embedding", {}).get("models", {}).items():
        rows.append(("embedding", f"{model}: matmul peak measured alongside",
                     f"{entry['peak_flops'] / 1e9:,.1f} GFLOP/s"))
        for name, v in entry["variants"].items():
            frac = f" = {v['achieved_tflops'] * 1e12 / entry['peak_flops']:.0%} of that peak"
            rows.append(("embedding", f"{model}: {name}", f"{v['images_per_s']:.2f} images/s{frac}"))
        if entry.get("compile_s"):
            rows.append(("embedding", f"{model}: torch.compile time", f"{entry['compile_s']:.0f} s"))
    if "embed_images" in result:
        e = result["embed_images"]
        rows.append(("embedding", f"utils.embed_images end to end ({e['num_workers']} workers)",
                     f"{e['images_per_s']:.2f} images/s"))
    for name, rate in result.get("decode", {}).get("images_per_s", {}).items():
        rows.append(("decode", name, f"{rate:.1f} images/s"))
    for case in result.get("finetune", {}).get("cases", []):
        rows.append(("finetune", f"{case['model']} {case['image_size']}px batch {case['batch']} ({case['amp']})",
                     f"{case['steps_per_s']:.2f} steps/s = {case['images_per_s']:.1f} images/s"
                     + (f" = {case['achieved_tflops'] * 1e12 / best:.0%} of best peak" if best else "")))
    if "finetune" in result:
        a = result["finetune"]["augmentation"]
        rows.append(("finetune", f"augmentation per worker ({a['image_size']}px)",
                     f"{a['items_per_s_per_worker']:.0f} images/s"))
    if "heads" in result:
        rows += heads_rows(result["heads"])
    for run in result.get("notebook", {}).get("runs", []):
        rows.append(("notebook", f"demo {run['run']}",
                     f"{run['seconds']:.1f} s (load avg {run['load_average_before']})"))
    for section, why in result.get("sections", {}).get("skipped", {}).items():
        rows.append((section, "skipped", why))
    for r in result.get("retrieval", []):
        rows.append(("retrieval", f"{r['gallery']:>9,} x 512 gallery, {r['queries']} queries, k {r['k']} "
                                  "(retrieval.cosine_topk)",
                     f"{r['ms_per_query_batched']:.3f} ms/query (one alone: {r['ms_one_query']:.1f} ms), "
                     f"peak +{r['search_peak_mb']:.0f} MiB (gallery {r['gallery_mb']:.0f} MiB)"))
    for t in result.get("targets", []):
        status = "MET" if t["met"] else f"MISSED (x{t['missed_by_factor']:.2f})"
        rows.append(("target", f"{t['target']} {t['op']} {t['threshold']:g}", f"{t['value']:.3g}: {status}"))
    return rows


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| section | what | measured |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b.strip()} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[1]) for r in rows)
    for section, what, value in rows:
        print(f"{section:<10} {what:<{width}}  {value}")


SECTIONS = ["embedding", "decode", "finetune", "heads", "notebook", "retrieval"]  # "peak" always runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (runtime.resolve_device)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmark.json"), help="JSON written here")
    p.add_argument("--quick", action="store_true", help="fewer variants and sizes (no channels_last / SDPA / "
                   "other-dtype variants, no embed_images end to end, one heads try, galleries up to 10^5)")
    p.add_argument("--smoke", action="store_true", help="every section at its smallest size, one try (under a "
                   "minute; the numbers mean nothing): that the benchmark still runs. The notebook runs are "
                   "skipped (configs/demo.yaml is checked against the notebook's parameters only)")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    p.add_argument("--skip-notebook", action="store_true", help="same as --skip notebook")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of each embedding model")
    p.add_argument("--batch", type=int, default=None, help="embedding batch (default: 32, the notebook's batch_size; "
                   "16 on CPU with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved tries per variant (default: 3 CPU, 5 GPU)")
    p.add_argument("--gallery-sizes", type=int, nargs="*", default=None, help="retrieval gallery sizes")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown here (for README.md)")
    p.add_argument("--keep-notebook-dir", default=None, help="write the demo runs here instead of a temp folder")
    args = p.parse_args(argv)
    if args.skip_notebook:
        args.skip.append("notebook")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = runtime.resolve_device(args.device)
    gpu = device.type == "cuda"
    args.quick = args.quick or args.smoke
    args.batch = args.batch or (2 if args.smoke else 16 if args.quick and not gpu else 32)
    args.rounds = args.rounds or (1 if args.smoke else 5 if gpu else 3)
    args.embed_size = 112 if args.smoke else 224
    # Tries of similar length for everything compared (a short try catches a quiet moment of a
    # shared machine more often than a long one): a probe ~1 s, naive = as many images as a batch.
    args.peak_budget = 0.02 if args.smoke else 0.05 if gpu else 1.0
    args.naive_images = args.batch
    args.train_steps = 20 if gpu else 3
    args.heads_tries = 1 if args.quick else 2
    args.gallery_sizes = args.gallery_sizes or ([2000] if args.smoke else [10**4, 10**5] if args.quick
                                                else [10**4, 10**5, 10**6])
    args.queries, args.k = (32 if args.smoke else 256), 10
    command = " ".join(["python", "benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict = {"machine": machine_info(device), "command": command, "smoke": args.smoke}
    # what ran and what did not (and why): every section named under "run" has its key in this JSON
    sections: dict = {"run": [], "skipped": {name: "--skip" for name in SECTIONS if name in args.skip}}
    if args.smoke and "notebook" not in args.skip:
        demo_params()
        sections["skipped"]["notebook"] = ("--smoke: the two demo runs take minutes (tests/test_notebook.py runs the "
                                           "notebook); configs/demo.yaml checked against its parameters cell")
    print(json.dumps(result["machine"]), flush=True)
    started = time.perf_counter()

    def ran(name: str, section: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        result[name] = section()
        sections["run"].append(name)
        sections.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)

    print("(a) matrix-multiply peak", flush=True)
    ran("peak", lambda: measure_peaks(device, tries=1 if args.smoke else 3, budget_s=args.peak_budget))
    with tempfile.TemporaryDirectory(prefix="bench_png_") as tmp:
        paths = write_pngs(Path(tmp), 8 if args.smoke else 32)
        if "embedding" not in args.skip:
            print("(b) embedding throughput", flush=True)
            ran("embedding", lambda: embedding_section(args, device, result["peak"]))
            if args.smoke or not args.quick:
                ran("embed_images", lambda: embed_images_end_to_end(args, device, paths))
        if "decode" not in args.skip:
            print("(c) decode and resize", flush=True)
            ran("decode", lambda: decode_section(args, paths))
        if "finetune" not in args.skip:
            print("(d) fine-tuning", flush=True)
            ran("finetune", lambda: finetune_section(args, device, paths))
    if "heads" not in args.skip:
        print("(e) one shared DINOv2 against four separate models", flush=True)
        ran("heads", lambda: heads_section(args, device))
    if "notebook" not in sections["skipped"]:
        print("(f) demo notebook, first run and rerun", flush=True)
        ran("notebook", lambda: notebook_section(Path(args.keep_notebook_dir) if args.keep_notebook_dir else None))
    else:
        print(f"(f) demo notebook skipped: {sections['skipped']['notebook']}", flush=True)
    if "retrieval" not in args.skip:
        print("retrieval at scale", flush=True)
        ran("retrieval", lambda: retrieval_section(args))
    result["sections"] = sections
    result["targets"] = targets(result)
    result["machine"]["load_average_end"] = load_average()
    result["seconds"] = time.perf_counter() - started
    result["table"] = [list(r) for r in table_rows(result)]
    print()
    print_table(table_rows(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(table_rows(result)))
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
