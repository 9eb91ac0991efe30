"""The benchmarks keep working: they call the project's own helpers, the training internals included
(training.DinoTraining, training._Optimization, training._train_epoch), so a change to those breaks a test here
instead of the next `make bench`. bench.py --smoke runs every section at its smallest size (~20-30 s on 2 busy
cores); memory.py's stages run here in this process (its smallest real run spawns three fresh processes that
import torch, ~30 s), and its fresh-process wrapper, which bench.py's heads section uses, on a cheap target."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory  # noqa: E402  (benchmarks/memory.py)

# What --smoke runs (JSON key -> the table's section) and what it leaves out, with a line saying why.
SMOKE_RUNS = {"peak": "peak", "embedding": "embedding", "embed_images": "embedding", "decode": "decode",
              "finetune": "finetune", "heads": "heads", "retrieval": "retrieval"}
SMOKE_SKIPS = {"notebook"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.json"
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_bench_smoke_exits_0_and_writes_every_section_it_ran(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    sections = result["sections"]
    assert sorted(sections["run"]) == sorted(SMOKE_RUNS) and set(sections["skipped"]) == SMOKE_SKIPS
    for name in sections["run"]:
        assert result[name], f"{name} claimed run but empty in the JSON"
        assert sections["seconds"][name] >= 0
    for name, why in sections["skipped"].items():  # left out, and said so where it ran
        assert name not in result and why.startswith("--smoke") and f"skipped: {why}" in proc.stdout
    table = {row[0] for row in result["table"]}
    assert {SMOKE_RUNS[name] for name in sections["run"]} | SMOKE_SKIPS <= table


def test_bench_smoke_timed_the_training_and_inference_paths(smoke):
    """Each section's numbers come from the project's calls: training steps through _train_epoch, both
    dino_heads values through train_dino and predict_dino, embeddings through embed_images, top-k search."""
    _, out = smoke
    result = json.loads(out.read_text())
    (case,) = result["finetune"]["cases"]
    assert case["steps_per_s"] > 0 and case["gflop_per_image_fwd_bwd"] > 0
    assert result["finetune"]["augmentation"]["items_per_s_per_worker"] > 0
    best = result["heads"]["best"]
    assert {name: r["models"] for name, r in best.items()} == {"shared": 1, "separate": 4}
    assert all(sum(r["epochs_run"].values()) == r["models"] for r in best.values())  # one epoch per model
    assert best["separate"]["images_per_epoch"] > best["shared"]["images_per_epoch"] > 0
    assert set(result["heads"]["real_size"]["variants"]) == {"shared", "separate"}
    assert result["embed_images"]["images_per_s"] > 0
    for entry in result["embedding"]["models"].values():
        assert all(v["images_per_s"] > 0 for v in entry["variants"].values())
    assert all(row["ms_per_query_batched"] > 0 for row in result["retrieval"])


def test_memory_stages_run_with_the_current_api(tmp_path):
    paths = memory._write_images(tmp_path / "imgs", 6)
    memory._embed(paths, str(tmp_path / "cache"), str(tmp_path / "feats.pt"))
    assert list((tmp_path / "cache" / "features").glob("clip_*.safetensors"))  # the features cache
    assert memory._retrieve(str(tmp_path / "feats.pt")) == {"dim": 32}  # the tiny CLIP's width


def test_memory_fresh_process_reports_its_peak():
    run = memory.in_fresh_process(dict, [("answer", 42)])  # a spawned process that imports nothing heavy
    assert run["answer"] == 42 and run["peak_mb"] > 0 and run["seconds"] > 0 and "children_peak_mb" in run
