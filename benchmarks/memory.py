"""Peak memory of embedding and retrieving many images, to show both stay bounded.

    .venv/bin/python benchmarks/memory.py --n 100000

Writes N small synthetic PNGs (content does not change memory use), embeds them with the tiny
CLIP through utils.embed_images (a runtime.Runtime: the CPU's autocast dtype, DataLoader streaming in two
workers, the features cache under cache_dir/features), then runs exact top-k
retrieval of every image against all (itself excluded) with retrieval.cosine_topk. Reports the peak
resident memory of each stage (a fresh child process per stage) next to the size of the feature
table itself: what grows with N is the [N, D] table and the [N, k] result, not N x N scores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM (Linux), which starts afresh at exec. Not
    ru_maxrss: on Linux a spawned child inherits its parent's peak there (fork + exec keep it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def _child(queue, target: Callable, args: tuple) -> None:
    out = target(*args) or {}
    # RUSAGE_CHILDREN: the largest finished child of this process (DataLoader workers), 0 if none
    queue.put({**out, "peak_mb": peak_rss_mb(),
               "children_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})


def in_fresh_process(target: Callable, *args) -> dict:
    """target(*args) (a dict or None) run in a fresh spawned process, with "seconds", "peak_mb" (that
    process's peak RSS) and "children_peak_mb" (the largest of its own child processes) added."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = time.perf_counter()
    p = ctx.Process(target=_child, args=(queue, target, args))
    p.start()
    out = queue.get()
    p.join()
    if p.exitcode:
        raise RuntimeError(f"{target.__name__} failed with exit code {p.exitcode}")
    return {**out, "seconds": time.perf_counter() - start}


def _write_images(folder: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:07d}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _imports() -> None:
    import torch  # noqa: F401

    import utils  # noqa: F401


def _embed(paths: list[str], cache: str, out: str) -> None:
    import torch

    import runtime
    import utils

    cpu = torch.device("cpu")
    rt = runtime.Runtime(cpu, runtime.autocast_dtype(cpu), batch_size=256, num_workers=2, cache_dir=Path(cache),
                         progress=False)
    feats = utils.embed_images(utils.load_clip("tiny", cpu), paths, rt)
    torch.save(feats, out)


def _retrieve(feats_path: str) -> dict:
    import torch

    import retrieval

    feats = torch.load(feats_path)
    ids = range(len(feats))  # the query set is the gallery: equal ids exclude each image itself
    retrieval.cosine_topk(feats, feats, 10, query_ids=ids, gallery_ids=ids)
    return {"dim": feats.shape[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "benchmark_memory.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = _write_images(tmp / "imgs", args.n)
        write_s = time.perf_counter() - t0
        base = in_fresh_process(_imports)
        embed = in_fresh_process(_embed, paths, str(tmp / "cache"), str(tmp / "feats.pt"))
        ret = in_fresh_process(_retrieve, str(tmp / "feats.pt"))
    n, d = args.n, ret["dim"]
    result = {"n_images": n, "dim": d, "feature_table_mb": round(n * d * 4 / 2**20, 1),
              "python_torch_baseline_peak_mb": round(base["peak_mb"], 1),
              "embed_peak_mb": round(embed["peak_mb"], 1), "embed_worker_peak_mb": round(embed["children_peak_mb"], 1),
              "embed_s": round(embed["seconds"], 1),
              "retrieve_peak_mb": round(ret["peak_mb"], 1), "retrieve_s": round(ret["seconds"], 1),
              "retrieve_block_queries": max(1, 2**24 // n),  # cosine_topk scores at most 2^24 pairs at a time
              "naive_full_score_matrix_mb": round(n * n * 4 / 2**20, 1), "write_pngs_s": round(write_s, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
