"""Shared fixtures: a small synthetic demo set made once per test session."""

import sys
from pathlib import Path

import pytest

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
