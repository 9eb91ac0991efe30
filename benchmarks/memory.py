"""Peak memory of embedding and retrieving many images, to show both stay bounded (chunked).

    .venv/bin/python benchmarks/memory.py --n 100000

Writes N small synthetic PNGs (content does not change memory use), embeds them with the tiny
CLIP through utils.embed_images (DataLoader streaming, features cache), then runs exact top-k
retrieval of every image against all with utils.cosine_topk. Reports the peak resident memory
of each stage (ru_maxrss of a fresh child process per stage) next to the size of the feature
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def _embed(paths: list[str], cache: str, out: str) -> None:
    import torch

    import utils

    model, preprocess, _ = utils.load_clip("tiny", "cpu")
    feats = utils.embed_images(model, preprocess, paths, "cpu", batch_size=256, num_workers=2, cache_dir=cache,
                               progress=False)
    torch.save(feats, out)


def _retrieve(feats_path: str, chunk: int) -> None:
    import torch

    import utils

    feats = torch.load(feats_path)
    utils.cosine_topk(feats, feats, k=10, exclude_self=True, chunk_size=chunk)


def _child(queue, target, args) -> None:
    target(*args)
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN = the largest finished child (DataLoader workers)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))


def _peak_mb(target, *args) -> tuple[float, float, float]:
    """Run target(*args) in a fresh process; (seconds, that process's peak RSS in MiB, the peak RSS
    of the largest of its own child processes in MiB, 0 when it started none)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = time.perf_counter()
    p = ctx.Process(target=_child, args=(queue, target, args))
    p.start()
    peak, child_peak = queue.get()
    p.join()
    if p.exitcode:
        raise RuntimeError(f"{target.__name__} failed with exit code {p.exitcode}")
    return time.perf_counter() - start, peak, child_peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "benchmark_memory.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = _write_images(tmp / "imgs", args.n)
        write_s = time.perf_counter() - t0
        _, base_mb, _ = _peak_mb(_retrieve_noop)
        ret_paths = str(tmp / "feats.pt")
        embed_s, embed_mb, worker_mb = _peak_mb(_embed, paths, str(tmp / "cache"), ret_paths)
        ret_s, ret_mb, _ = _peak_mb(_retrieve, ret_paths, args.chunk)
        import torch

        d = torch.load(ret_paths).shape[1]
    table_mb = args.n * d * 4 / 2**20
    result = {"n_images": args.n, "dim": d, "feature_table_mb": round(table_mb, 1),
              "python_torch_baseline_peak_mb": round(base_mb, 1),
              "embed_peak_mb": round(embed_mb, 1), "embed_worker_peak_mb": round(worker_mb, 1),
              "embed_s": round(embed_s, 1),
              "retrieve_peak_mb": round(ret_mb, 1), "retrieve_s": round(ret_s, 1), "chunk": args.chunk,
              "naive_full_score_matrix_mb": round(args.n * args.n * 4 / 2**20, 1), "write_pngs_s": round(write_s, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def _retrieve_noop() -> None:
    import torch  # noqa: F401

    import utils  # noqa: F401


if __name__ == "__main__":
    main()
