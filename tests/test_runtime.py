"""runtime.py: where the notebook runs. Parameters typed from papermill's strings, packages installed without
touching the image, the accelerator and disk checks that stop a run at Setup with the fix, pruning and
resuming across sessions, autocast inside DataParallel's replicas, and progress that leaves one line."""

import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import preflight
import runtime

ROOT = Path(__file__).resolve().parents[1]
CELL_TYPES = {"flip_swap": bool, "lr_head": float, "epochs": int, "dino_gpus": int | str, "data_path": str}


@pytest.mark.parametrize(("given", "typed"), [
    ({"flip_swap": "false", "lr_head": "1e-3", "epochs": "3", "dino_gpus": "2", "data_path": 5},
     {"flip_swap": False, "lr_head": 0.001, "epochs": 3, "dino_gpus": 2, "data_path": "5"}),
    ({"flip_swap": "No", "lr_head": 1, "epochs": 3.0, "dino_gpus": "auto", "data_path": "demo"},
     {"flip_swap": False, "lr_head": 1.0, "epochs": 3, "dino_gpus": "auto", "data_path": "demo"}),
    ({"flip_swap": " YES ", "lr_head": 0.5, "epochs": "1e1", "dino_gpus": 1, "data_path": "x"},
     {"flip_swap": True, "lr_head": 0.5, "epochs": 10, "dino_gpus": 1, "data_path": "x"}),
    ({"flip_swap": 0, "lr_head": "2e-5", "epochs": 7, "dino_gpus": 2.0, "data_path": "x"},
     {"flip_swap": False, "lr_head": 2e-5, "epochs": 7, "dino_gpus": 2, "data_path": "x"}),
])
def test_strings_that_mean_one_value_are_typed_by_the_annotations(given, typed):
    out = runtime.parse_params(given, CELL_TYPES)
    assert out == typed
    assert all(type(out[k]) is type(typed[k]) for k in typed)  # 1 -> 1.0 (float), 3.0 -> 3 (int), False stays bool


@pytest.mark.parametrize(("name", "value"), [("flip_swap", "maybe"), ("flip_swap", 2), ("lr_head", "fast"),
                                             ("epochs", "3.5"), ("epochs", True), ("lr_head", True), ("epochs", None)])
def test_ambiguous_values_are_left_for_check_params_to_refuse_by_name(name, value):
    typed = runtime.parse_params({name: value}, CELL_TYPES)
    assert typed[name] is value or typed[name] == value
    with pytest.raises(ValueError, match=rf"{name}=.*use a"):
        preflight.check_params(typed, CELL_TYPES)


def test_every_notebook_parameter_is_typed_and_checked_from_its_annotation():
    """The parameters cell declares each parameter's type: a new parameter gets the conversion for free."""
    nb = json.loads((ROOT / "entrep-prototypical.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    space: dict = {}
    exec("".join(cell["source"]), space)  # literals only (test_notebook checks it)
    types_, values = space["__annotations__"], {k: space[k] for k in space["__annotations__"]}
    assert runtime.parse_params(values, types_) == values  # the defaults are already of their type
    preflight.check_params(values, types_)
    strings = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}
    assert runtime.parse_params(strings, types_) == values  # what papermill -p or YAML may hand over


def test_gpu_support_reads_this_torchs_architectures():
    kaggle_cu128 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert runtime.gpu_supported((7, 5), kaggle_cu128)  # T4
    assert not runtime.gpu_supported((6, 0), kaggle_cu128)  # P100
    assert runtime.gpu_supported((8, 9), ["sm_80", "sm_86"])  # same major, a lower minor's cubin runs
    assert not runtime.gpu_supported((8, 0), ["sm_86"])
    assert runtime.gpu_supported((9, 0), ["sm_80", "compute_80"])  # PTX is compiled forward
    assert not runtime.gpu_supported((7, 5), ["compute_80"])


def report(gpus=(), device="cpu"):
    return {"device": device, "torch": "2.10.0+cu128", "cuda": "12.8", "amp": "None", "cpu_cores": 4,
            "gpus": list(gpus), "torch_arch_list": ["sm_70", "sm_75"]}


def test_an_unsupported_gpu_stops_setup_naming_what_to_choose():
    p100 = {"name": "Tesla P100-PCIE-16GB", "memory_gb": 15.9, "capability": "6.0", "supported": False}
    with pytest.raises(RuntimeError, match=r"P100.*6\.0.*GPU T4 x2"):
        runtime.check_accelerator(report([p100], "cuda"), "auto", real_size=True, cpu_hours=40.0)


def test_no_gpu_with_real_models_stops_with_an_estimate_unless_the_cpu_was_chosen():
    with pytest.raises(RuntimeError, match=r"about 40 hours on 4 CPU cores.*device='cpu'"):
        runtime.check_accelerator(report(), "auto", real_size=True, cpu_hours=40.0)
    runtime.check_accelerator(report(), "cpu", real_size=True, cpu_hours=40.0)  # on purpose
    runtime.check_accelerator(report(), "auto", real_size=False, cpu_hours=0.1)  # the demo's tiny models


def test_the_banner_says_device_dtype_versions_and_kernel_support():
    t4 = {"name": "Tesla T4", "memory_gb": 14.7, "capability": "7.5", "supported": True}
    text = runtime.banner(report([t4, t4], "cuda:0") | {"amp": "torch.float16"}, runtime.Runtime(gpus=2))
    assert "torch 2.10.0+cu128" in text and "CUDA 12.8" in text and "autocast torch.float16" in text
    assert text.count("Tesla T4, 14.7 GB, compute capability 7.5, kernels in this torch") == 2
    this_machine = runtime.accelerator_report(torch.device("cpu"))
    assert this_machine["torch"] == torch.__version__ and this_machine["cpu_cores"] >= 1


def test_too_little_disk_stops_setup_with_the_numbers(tmp_path, monkeypatch):
    plan = {"DINOv2 weights (4 runs)": 1400 * 2**20, "BiomedCLIP download": 800 * 2**20}
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda _: types.SimpleNamespace(free=1 * 2**30))
    with pytest.raises(RuntimeError, match=r"about 2\.15 GB[\s\S]*DINOv2 weights \(4 runs\): 1,400 MB"
                                           r"[\s\S]*only 1\.00 GB is left.*prune_outputs"):
        runtime.check_disk(tmp_path, plan)
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda _: types.SimpleNamespace(free=100 * 2**30))
    (tmp_path / "old.bin").write_bytes(b"\0" * 3 * 2**19)  # 1.5 MB there already
    with pytest.raises(RuntimeError, match="disk_budget_gb=0.002"):  # Kaggle's 20 GB: what is there counts
        runtime.check_disk(tmp_path, {"small": 2**20}, budget_gb=0.002)
    assert runtime.check_disk(tmp_path, plan)["planned_total"] == 2200 * 2**20


def test_internet_probe_is_false_when_nothing_answers():
    assert runtime.internet_available("127.0.0.1", 9, timeout=0.5) is False


def test_installing_nothing_missing_runs_no_pip(monkeypatch):
    monkeypatch.setattr(runtime.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    assert runtime.install_missing({"json": "json"}) == []


def test_install_uses_the_wheels_folder_offline_and_pins_what_is_installed(tmp_path, monkeypatch):
    wheels = tmp_path / "input" / "code" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "open_clip_torch-3.3.0-py3-none-any.whl").write_bytes(b"")
    calls = []

    def pip(command, **kwargs):
        calls.append((command, Path(command[command.index("--constraint") + 1]).read_text()))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(runtime.subprocess, "run", pip)
    missing = {"surely_not_a_module_a": "open_clip_torch", "surely_not_a_module_b": "ftfy"}
    assert runtime.install_missing(missing, "auto", tmp_path / "input") == ["open_clip_torch", "ftfy"]
    command, pins = calls[0]
    assert command[command.index("--find-links") + 1] == str(wheels) and "--no-index" in command
    assert f"torch=={importlib.metadata.version('torch')}" in pins.splitlines()  # never upgraded or replaced


def test_install_failure_names_the_dataset_and_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.subprocess, "run",
                        lambda c, **k: subprocess.CompletedProcess(c, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(RuntimeError, match=r"open_clip_torch.*from the package index.*make kaggle-wheels"
                                           r"[\s\S]*No matching distribution"):
        runtime.install_missing({"surely_not_a_module_a": "open_clip_torch"}, "auto", tmp_path)


def test_dataparallel_replicas_compute_in_the_chosen_dtype_in_their_own_threads():
    """DataParallel runs replicas in threads; autocast state is thread-local: AutocastForward enters it there."""
    layer = nn.Linear(8, 4)
    wrapped = runtime.AutocastForward(layer, torch.bfloat16)
    dtypes = {}

    def replica(name, module):
        dtypes[name] = module(torch.randn(2, 8)).dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast does not reach a new thread
        for name, module in (("plain", layer), ("wrapped", wrapped)):
            thread = threading.Thread(target=replica, args=(name, module))
            thread.start()
            thread.join()
    assert dtypes == {"plain": torch.float32, "wrapped": torch.bfloat16}
    clip = types.SimpleNamespace(encode_image=lambda x: x * 2)
    assert runtime.data_parallel(clip, runtime.Runtime(), "encode_image")(torch.ones(1)).item() == 2  # one device


def test_run_folders_not_used_since_the_run_began_are_pruned_to_keep_runs(tmp_path):
    now = time.time()
    for age, name in enumerate(["dino_a", "dino_b", "dino_c", "retrieval_d"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        os.utime(tmp_path / name, (now - 1000 * (age + 1),) * 2)
    (tmp_path / "not_a_run").mkdir()
    os.utime(tmp_path / "dino_a", (now + 5,) * 2)  # used by this run
    pruned = runtime.prune_runs(tmp_path, keep=1, since=now)
    assert sorted(p.name for p in pruned) == ["dino_c", "retrieval_d"]  # the oldest unused ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dino_a", "dino_b", "not_a_run"]


def test_prune_outputs_keeps_what_the_last_run_used(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("old", "used"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "config.json").write_text("{}")
    os.utime(checkpoints / "old", (time.time() - 100,) * 2)
    runtime.save_json({"started": time.time() - 50}, tmp_path / "params.json")
    assert [p.name for p in runtime.prune_outputs(tmp_path)] == ["old"]


def test_copy_in_takes_only_what_an_earlier_run_holds_at_the_same_place(tmp_path):
    earlier, here = tmp_path / "earlier", tmp_path / "here"
    (earlier / "checkpoints" / "dino_shared_abc").mkdir(parents=True)
    (earlier / "checkpoints" / "dino_shared_abc" / "best.pt").write_bytes(b"w")
    rt = runtime.Runtime(checkpoint_dir=here / "checkpoints", reuse_from=earlier)
    assert rt.copy_in(here / "checkpoints" / "dino_shared_abc", rt.checkpoint_dir)
    assert (here / "checkpoints" / "dino_shared_abc" / "best.pt").read_bytes() == b"w"
    assert not rt.copy_in(here / "checkpoints" / "dino_shared_xyz", rt.checkpoint_dir)  # not there
    assert not runtime.Runtime().copy_in(here / "x", here)  # no reuse_from


def test_stages_record_seconds_and_peak_memory():
    stages = runtime.Stages()
    with stages("embedding"):
        block = bytearray(64 * 2**20)  # 64 MB touched
        block[::4096] = b"x" * len(block[::4096])
    row = stages.rows["embedding"]
    assert row["seconds"] >= 0 and row["peak_rss_mb"] >= 64 and row["peak_gpu_mb"] == 0.0
    assert stages.seconds("embedding") == row["seconds"]


def test_progress_in_a_kernel_replaces_one_display_output(monkeypatch):
    shown = []
    display = types.SimpleNamespace(display=lambda data, raw, display_id: shown.append(("new", display_id)),
                                    update_display=lambda data, raw, display_id: shown.append(("update", display_id)))
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.setattr(runtime, "_in_kernel", lambda: True)
    for _ in runtime.progress(range(50), desc="x", mininterval=0):
        pass
    assert shown[0][0] == "new" and {kind for kind, _ in shown[1:]} == {"update"}
    assert len({display_id for _, display_id in shown}) == 1  # one output for the whole loop
