"""Shared fixtures and helpers: the demo sets (a small one; the full one the notebook draws), one torch thread."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo_data
import utils


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo set (about 140 images) in the official layouts."""
    return demo_data.make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=3, n_train=60, n_public=20,
                                       n_test=12, n_i2i_pairs=10, n_t2i=10, n_unlisted=6)


@pytest.fixture(scope="session")
def demo_data_set(demo_root) -> "utils.EntrepData":
    return utils.load_entrep(demo_root)


@pytest.fixture(scope="session")
def full_demo(tmp_path_factory):
    """Put the demo set `data_path="demo"` draws for seed 0 (about 560 images, ~20 s to draw) into a run's
    output folder, drawn once per session by the notebook's own demo_data.ensure_demo_dataset, which the run
    then finds stamped and reuses. The paper-protocol and seed-1 runs still draw it inside the notebook."""
    drawn = demo_data.ensure_demo_dataset(tmp_path_factory.mktemp("full_demo") / "demo_data", seed=0)
    return lambda out: shutil.copytree(drawn, Path(out) / "demo_data")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CI box OpenMP threads that wait on
    each other make them much slower (a module opts in with pytestmark). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise_png(path: Path, rng: np.random.Generator, label: int = 0) -> Path:
    """56x42 noise, tinted by label (a frame wider than tall: the centre square is cut out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 200, (42, 56, 3)).astype(np.int64)
    pixels[..., label % 3] += 8 * label
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path
