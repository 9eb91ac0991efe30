"""Where the notebook runs: device, precision, workers, seeds and the files a run writes.

Not the method (utils.py is): what any notebook needs to run the method on a given machine. Imports
nothing but the standard library, NumPy, torch and tqdm (all in Kaggle's image), so the Setup cell can use
it before the packages the method needs are installed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

T = TypeVar("T")


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> the first CUDA GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype a device runs fastest and safely, or None for plain fp32: bf16 on GPUs
    with native bf16 (A100/H100) and CPUs with AVX512-BF16/AMX, fp16 on older GPUs (T4, P100; training
    then uses a GradScaler), else None."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and any(flag in _cpu_flags() for flag in ("avx512_bf16", "amx_bf16")):
        return torch.bfloat16
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}
    except OSError:
        return set()


def resolve_amp(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """"auto" -> autocast_dtype(device); "bf16" / "fp16" / "fp32" (or a dtype, None) force one."""
    if amp == "auto":
        return autocast_dtype(device)
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, None: None,
             torch.bfloat16: torch.bfloat16, torch.float16: torch.float16, torch.float32: None}
    if amp not in names:
        raise ValueError(f"amp={amp!r}: use 'auto', 'bf16', 'fp16' or 'fp32'.")
    return names[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype` on `device`, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded(seed: int, build: Callable[[], T]) -> T:
    """build() with torch's RNG seeded by `seed` and the global RNG left untouched: the same random model
    every call (the tiny test and demo models)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def cpu_count() -> int:
    """CPUs this process may use (its affinity where the OS has one, e.g. not macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers: 0 on a CPU run (the model needs the cores), else one per core up to 8."""
    return 0 if device.type == "cpu" else min(8, cpu_count())


def resolve_gpus(gpus: int | str, device: torch.device) -> int:
    """GPUs DINOv2 fine-tuning spreads each batch over (torch DataParallel): "auto" -> every visible GPU
    on a CUDA run (Kaggle T4 x2: 2), else 1."""
    if device.type != "cuda":
        return 1
    visible = torch.cuda.device_count()
    if gpus != "auto" and gpus > visible:
        raise ValueError(f"dino_gpus={gpus} but {visible} GPU(s) are visible: use 'auto' or a smaller number.")
    return visible if gpus == "auto" else int(gpus)


@dataclass(frozen=True)
class Runtime:
    """How and where every model of one run computes: the arguments that used to travel together.

    amp: the autocast dtype (None: fp32); batch_size: images per inference batch (training batches are
    part of each recipe); cache_dir: embeddings and predictions kept by content (None: no cache);
    checkpoint_dir: training runs; gpus: GPUs sharing each training batch.
    """

    device: torch.device = torch.device("cpu")
    amp: torch.dtype | None = None
    batch_size: int = 32
    num_workers: int = 0
    cache_dir: Path | None = None
    checkpoint_dir: Path | None = None
    gpus: int = 1
    progress: bool = True
    reuse_from: Path | None = None  # an earlier run's output_dir: matching caches and runs are copied in
    deadline: float | None = None  # time.time() after which no training epoch starts (the session's budget)
    keep_runs: int | None = None  # run folders kept that this run does not use (None: all)
    started: float = 0.0  # time.time() when this run began: a run folder untouched since is not in use

    def copy_in(self, path: Path, folder: Path | None) -> bool:
        """Copy `path` (a file or folder under `folder`, this run's cache or checkpoint folder) from the same
        place under reuse_from when it is missing here and present there; True when it was."""
        if self.reuse_from is None or folder is None or path.exists():
            return False
        source = Path(self.reuse_from) / Path(folder).name / Path(path).relative_to(folder)
        if not source.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, path)
        return True


def make_runtime(device: str, batch_size: int, num_workers: int, gpus: int | str, output_dir: str | os.PathLike,
                 reuse_from: str = "", keep_runs: int | None = None, time_budget_h: float = 0.0) -> Runtime:
    """The notebook's Runtime from its parameters: num_workers -1 = default_num_workers; caches and
    checkpoints under output_dir; no training epoch starts time_budget_h hours from now (0: no limit)."""
    dev, started = resolve_device(device), time.time()
    workers = default_num_workers(dev) if num_workers < 0 else num_workers
    out = Path(output_dir)
    return Runtime(dev, autocast_dtype(dev), batch_size, workers, out / "cache", out / "checkpoints",
                   resolve_gpus(gpus, dev), reuse_from=Path(reuse_from) if reuse_from else None, keep_runs=keep_runs,
                   deadline=started + 3600 * time_budget_h if time_budget_h else None, started=started)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` to write to; renamed onto `path` when the block ends without error
    (a crash never leaves half a file), removed otherwise. The folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save through atomic_path."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically, creating the folder; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")
    return Path(path)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, (np.ndarray, Path, torch.device, torch.dtype)):
        return o.tolist() if isinstance(o, np.ndarray) else str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# =============================================================================================
# Parameters: papermill, YAML and the command line hand over strings; each is typed once, here
# =============================================================================================

TRUE_WORDS, FALSE_WORDS = frozenset({"true", "yes", "y", "on", "1"}), frozenset({"false", "no", "n", "off", "0"})


def _as_type(value: object, kind: type) -> object:
    """`value` as `kind` when its meaning is unambiguous, else `value` unchanged (check_params refuses it)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        word = value.strip().lower() if isinstance(value, str) else None
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else value
    if isinstance(value, bool):  # a bool is never a number or a text here
        return value
    try:
        if kind is int:
            number = float(value) if isinstance(value, str) else value
            return int(number) if isinstance(number, (int, float)) and float(number).is_integer() else value
        if kind is float:
            return float(value) if isinstance(value, (int, float, str)) else value
    except ValueError:
        return value
    return str(value) if kind is str and isinstance(value, (int, float)) else value


def parse_params(values: Mapping[str, object], types: Mapping[str, object]) -> dict[str, object]:
    """The notebook's parameters typed by the parameters cell's annotations (`types`, its __annotations__):
    'false' / 'no' / '0' -> False for a bool, '1e-3' -> 0.001 for a float, '3' or 3.0 -> 3 for an int,
    a number -> its text for a str; for a union (int | str) the first type that takes the value. A value
    whose meaning is not plain is left as given, for check_params to refuse with a value that works."""
    out = {}
    for name, value in values.items():
        kinds = typing.get_args(types[name]) or (types[name],) if name in types else ()
        typed = value
        for kind in kinds:
            typed = _as_type(value, kind)
            if isinstance(typed, kind) and not (kind is int and isinstance(typed, bool)):
                break
            typed = value
        out[name] = typed
    return out


# =============================================================================================
# Packages: install only what the image lacks, from an attached wheels folder when internet is off
# =============================================================================================

# What the notebook needs beyond torch: {module: its pip name}. Kaggle's image ships all but open_clip
# and ftfy (ENTREP.md "Where users run it"); open_clip reads local-dir: folders from 2.31 on (README).
NOTEBOOK_PACKAGES: dict[str, str] = {"open_clip": "open_clip_torch", "ftfy": "ftfy", "timm": "timm",
                                     "transformers": "transformers", "safetensors": "safetensors"}
WHEELS_HELP = ("attach the wheels dataset that `make kaggle-wheels` builds (README \"Kaggle with internet off\") "
               "under /kaggle/input, or turn the notebook's internet on, or set the `wheels` parameter to a folder "
               "holding those wheels")


def find_wheels(wheels: str, search_root: str | os.PathLike, names: Iterable[str]) -> Path | None:
    """The folder to install `names` from: `wheels` itself, or with "auto" the first folder under search_root
    holding a wheel of the first name (e.g. open_clip_torch-*.whl); None when there is none."""
    if wheels != "auto":
        return Path(wheels).expanduser()
    first = next(iter(names), "").replace("-", "_").lower()
    root = Path(search_root)
    found = sorted(root.rglob(f"{first}-*.whl")) if first and root.is_dir() else []
    return found[0].parent if found else None


def install_missing(packages: Mapping[str, str] = NOTEBOOK_PACKAGES, wheels: str = "auto",
                    search_root: str | os.PathLike = "/kaggle/input") -> list[str]:
    """pip-install the packages whose module is missing (none: nothing runs), from a wheels folder when one
    is found (find_wheels; --no-index, so it works with internet off), else from the package index. Every
    distribution already installed is pinned to its version, so torch and the rest of the image are never
    upgraded or replaced. Returns the pip names installed; raises RuntimeError naming the fix."""
    missing = [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return []
    folder = find_wheels(wheels, search_root, missing)
    with tempfile.TemporaryDirectory() as scratch:
        pins = Path(scratch) / "installed.txt"
        pins.write_text("\n".join(_installed_pins()), encoding="utf-8")
        source = ["--no-index", "--find-links", str(folder)] if folder else ["--retries", "1", "--timeout", "15"]
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--constraint", str(pins), *source,
                               *missing], capture_output=True, text=True, check=False)
    if proc.returncode:
        where = f"from {folder}" if folder else "from the package index"
        raise RuntimeError(f"{', '.join(missing)} are not installed and pip could not install them {where}: "
                           f"{WHEELS_HELP}.\npip said: {proc.stderr.strip()[-1500:]}")
    importlib.invalidate_caches()
    return missing


def _installed_pins() -> list[str]:
    """name==version of every installed distribution whose version pip can read: a constraint that lets pip
    add packages but never change one."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version and re.fullmatch(r"[0-9][0-9A-Za-z.+!_-]*", version):
            pins[name.lower()] = f"{name}=={version}"
    return sorted(pins.values())


# =============================================================================================
# The accelerator: what this torch can run, said once at Setup
# =============================================================================================


def gpu_supported(capability: tuple[int, int], arch_list: Iterable[str]) -> bool:
    """Whether a torch build with these CUDA architectures (torch.cuda.get_arch_list(): "sm_75", "compute_90")
    has kernels for a GPU of this compute capability: a cubin of the same major and no higher minor, or PTX
    of no higher capability (JIT-compiled forward)."""
    major, minor = capability
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)\w*", arch)
        if m and ((m[1] == "sm" and int(m[2]) == major and int(m[3]) <= minor)
                  or (m[1] == "compute" and (int(m[2]), int(m[3])) <= (major, minor))):
            return True
    return False


def accelerator_report(device: torch.device) -> dict:
    """What the run computes on: torch and CUDA versions, the autocast dtype, and per visible GPU its name,
    memory, compute capability and whether this torch build has kernels for it."""
    report = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "amp": str(autocast_dtype(device)), "cpu_cores": cpu_count(), "gpus": []}
    if torch.cuda.is_available():
        arch_list = torch.cuda.get_arch_list()
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            capability = (props.major, props.minor)
            report["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                                   "capability": f"{props.major}.{props.minor}",
                                   "supported": gpu_supported(capability, arch_list)})
        report["torch_arch_list"] = arch_list
    return report


def check_accelerator(report: Mapping, device_param: str, real_size: bool, cpu_hours: float) -> None:
    """Stop before any work when the run cannot use what it was given: a GPU this torch has no kernels for
    (Kaggle's P100 on recent torch builds), or real-size models with no GPU unless device="cpu" was chosen
    on purpose (cpu_hours: an estimate of the CPU time it would take)."""
    if bad := [g for g in report["gpus"] if not g["supported"]]:
        raise RuntimeError(
            f"The GPU {bad[0]['name']} (compute capability {bad[0]['capability']}) has no kernels in torch "
            f"{report['torch']} (built for {', '.join(report.get('torch_arch_list', []))}). On Kaggle choose the "
            "accelerator 'GPU T4 x2' (Settings > Accelerator) and run again.")
    if real_size and report["device"] == "cpu" and device_param != "cpu":
        raise RuntimeError(
            f"No GPU is visible and the models are real size: this run would take about {cpu_hours:.0f} hours on "
            f"{report['cpu_cores']} CPU cores (an estimate from the models' FLOPs). On Kaggle switch the accelerator "
            "on ('GPU T4 x2'); to run on the CPU anyway set device='cpu'; for a quick look use the demo "
            "(data_path='demo', clip_model='tiny', dino_model='tiny').")


def internet_available(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host` opens (Kaggle's internet switch, a firewall): a model download
    can only be tried when it does."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# =============================================================================================
# Disk: what a run will write, checked against what the output folder may hold; old runs pruned
# =============================================================================================


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of every file under `folder` (0 when it does not exist); links are not followed."""
    return sum(p.lstat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def check_disk(output_dir: str | os.PathLike, planned: Mapping[str, int], budget_gb: float = 0.0) -> dict:
    """Stop before any heavy work when `planned` ({what: bytes}) does not fit: into the free space of
    output_dir's disk and, with budget_gb > 0, into what output_dir may hold in all (Kaggle's /kaggle/working:
    about 20 GB, counted against what is there already). Returns the numbers it checked."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    used = folder_bytes(out) if budget_gb > 0 else 0
    room = min(free, int(budget_gb * 2**30) - used) if budget_gb > 0 else free
    need = sum(planned.values())
    summary = {"planned_bytes": dict(planned), "planned_total": need, "free": free, "output_dir_used": used,
               "room": room}
    if need > room:
        lines = "\n".join(f"  {what}: {size / 2**20:,.0f} MB" for what, size in planned.items())
        raise RuntimeError(
            f"Not enough disk for this run under {out}: it will write about {need / 2**30:.2f} GB\n{lines}\nbut "
            f"only {max(room, 0) / 2**30:.2f} GB is left ({free / 2**30:.1f} GB free on the disk"
            + (f", {used / 2**30:.2f} of disk_budget_gb={budget_gb} used" if budget_gb > 0 else "") + "). "
            "Free space with runtime.prune_outputs(output_dir) (earlier runs' folders), lower keep_runs, or "
            "choose another output_dir.")
    return summary


def run_folders(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The training run folders under checkpoint_dir (those holding a config.json), most recently used first."""
    folder = Path(checkpoint_dir)
    runs = [p for p in folder.iterdir() if (p / "config.json").is_file()] if folder.is_dir() else []
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def prune_runs(checkpoint_dir: str | os.PathLike, keep: int, since: float) -> list[Path]:
    """Delete the run folders not used since `since` (time.time(); a run touches its folder whenever it trains
    or is reused), all but the `keep` most recently used of them; a folder in use is never deleted.
    Returns the deleted folders (the caller says so)."""
    stale = [p for p in run_folders(checkpoint_dir) if p.stat().st_mtime < since]
    for p in stale[keep:]:
        shutil.rmtree(p, ignore_errors=True)
    return stale[keep:]


def prune_outputs(output_dir: str | os.PathLike, keep_runs: int = 0) -> list[Path]:
    """For the user: free disk under output_dir by deleting the training run folders that its last notebook
    run did not use (params.json's "started"), all but the `keep_runs` most recently used. Returns them."""
    params = Path(output_dir) / "params.json"
    since = json.loads(params.read_text(encoding="utf-8")).get("started", 0.0) if params.is_file() else time.time()
    return prune_runs(Path(output_dir) / "checkpoints", keep_runs, since)


# =============================================================================================
# Progress: one line per loop in a saved notebook, live while it runs
# =============================================================================================


class _DisplayLine:
    """A file for tqdm inside a Jupyter kernel: each refresh replaces one display output (update_display),
    so a saved notebook keeps one line per loop, not one output per refresh."""

    encoding = "utf-8"

    def __init__(self):
        self.display_id: str | None = None

    def write(self, text: str) -> None:
        from IPython.display import display, update_display

        line = text.strip("\r\n")
        if not line:
            return
        if self.display_id is None:
            self.display_id = uuid.uuid4().hex
            display({"text/plain": line}, raw=True, display_id=self.display_id)
        else:
            update_display({"text/plain": line}, raw=True, display_id=self.display_id)

    def flush(self) -> None:
        pass


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """tqdm (same arguments) that, in a notebook kernel, draws on one display output updated in place."""
    return tqdm(iterable, file=_DisplayLine() if _in_kernel() else None, **kwargs)


# =============================================================================================
# Several GPUs: DataParallel with autocast where the replicas compute
# =============================================================================================


class AutocastForward(nn.Module):
    """`module` (or its method `method`, e.g. CLIP's encode_image) called under autocast(dtype) inside
    forward. nn.DataParallel runs each replica's forward in a thread of its own and autocast state is
    thread-local (torch's AMP notes, "DataParallel in a single process"): autocast entered by the caller
    does not reach the replicas, so it is entered here, where they compute."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None, method: str | None = None):
        super().__init__()
        self.module, self.dtype, self.method = module, dtype, method

    def forward(self, x: torch.Tensor):
        call = getattr(self.module, self.method) if self.method else self.module
        with autocast(x.device, self.dtype):
            return call(x)


def data_parallel(module: nn.Module, rt: Runtime, method: str | None = None) -> Callable:
    """What computes `module` (or its `method`) on rt's GPUs: with rt.gpus > 1, nn.DataParallel over them
    (each batch split, outputs gathered on rt.device) with autocast inside every replica; else the module
    (or the bound method) itself."""
    if rt.gpus <= 1:
        return getattr(module, method) if method else module
    first = rt.device.index or 0
    return nn.DataParallel(AutocastForward(module, rt.amp, method), device_ids=list(range(first, first + rt.gpus)))


# =============================================================================================
# The report: what each stage took, the accelerator, said once
# =============================================================================================


def _peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset (Linux VmHWM), else since it started."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource  # Unix

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Seconds and peak memory of each stage of a run: `with stages("BiomedCLIP embedding"): ...`; rows
    {stage: {seconds, peak_rss_mb, peak_gpu_mb}} for metrics.json and the report. The peaks are reset at
    each stage's start where the OS and torch allow it (Linux clear_refs, CUDA's peak statistics)."""

    def __init__(self):
        self.rows: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)
        for i in gpus:
            torch.cuda.reset_peak_memory_stats(i)
        started = time.perf_counter()
        try:
            yield
        finally:
            gpu = sum(torch.cuda.max_memory_allocated(i) for i in gpus) / 2**20
            self.rows[name] = {"seconds": round(time.perf_counter() - started, 2),
                               "peak_rss_mb": round(_peak_rss_mb(), 1), "peak_gpu_mb": round(gpu, 1)}

    def seconds(self, name: str) -> float:
        return self.rows[name]["seconds"]


def banner(report: Mapping, rt: Runtime) -> str:
    """The accelerator block printed at Setup: device(s), memory, compute capability, kernels in this
    torch, the dtype chosen, torch and CUDA versions."""
    lines = [f"device {report['device']} x{rt.gpus} | autocast {report['amp']} | torch {report['torch']}, "
             f"CUDA {report['cuda'] or '-'} | {report['cpu_cores']} CPU cores, {rt.num_workers} loader workers"]
    lines += [f"  GPU {i}: {g['name']}, {g['memory_gb']} GB, compute capability {g['capability']}, "
              f"{'kernels in this torch' if g['supported'] else 'NO kernels in this torch'}"
              for i, g in enumerate(report["gpus"])]
    return "\n".join(lines or ["(no GPU)"])
