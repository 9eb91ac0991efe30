"""`make mutation` helpers (benchmarks/MUTATION.md): a pytest plugin that renders the demo set once, and
the score of a finished mutmut run.

Plugin (pyproject.toml [tool.mutmut] loads it with `-p benchmarks.mutation`): mutmut runs each mutant's
tests in a pytest session of its own, so the session fixture of tests/conftest.py would render the
~140-image demo set again for every mutant, about 10 of the 12 seconds a data-loading mutant costs.
demo_data calls no function of the mutated modules (it imports three constants of utils), so a byte copy of the
first rendering with the same arguments is the same input: the verdicts do not change, only the time. The
copies live in mutants/.demo_cache.

Score (`python benchmarks/mutation.py`, from the repository root after `mutmut run`): reads
`mutmut results --all true`, leaves out the mutants listed as equivalent in benchmarks/MUTATION.md (between
its "equivalent mutants" markers) and prints killed / survived / no tests / timeout and the score.

Constants (`python benchmarks/mutation.py constants`): the label maps, grids and names are module code,
which mutmut does not mutate; hand-made mutants of them, each run against the fast tests.

The mutated modules (MUTATED_MODULES): utils.py, training.py and retrieval.py, whose mutants mutmut names
<module>.x_<function>__mutmut_<n> and <module>.xǁ<Class>ǁ<method>__mutmut_<n>; and plots, whose
load_thumbnail the Makefile's MUTATION_SCOPE names.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# ---- pytest plugin ----------------------------------------------------------------------------


def _rendered_once(render):
    cache = Path(__file__).resolve().parents[1] / ".demo_cache"  # mutants/.demo_cache: mutmut's copy of this file

    def make_demo_dataset(out_dir, seed: int = 0, **kwargs) -> Path:
        key = hashlib.sha1(repr((seed, sorted(kwargs.items()))).encode()).hexdigest()[:16]
        done = cache / key
        if not done.is_dir():
            staging = cache / f"{key}.{os.getpid()}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            render(staging, seed=seed, **kwargs)
            try:
                staging.rename(done)  # another worker may have finished first: keep its copy
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(done, out_dir, dirs_exist_ok=True)
        return Path(out_dir)

    return make_demo_dataset


def pytest_configure(config) -> None:
    import demo_data

    if not getattr(demo_data.make_demo_dataset, "rendered_once", False):
        demo_data.make_demo_dataset = _rendered_once(demo_data.make_demo_dataset)
        demo_data.make_demo_dataset.rendered_once = True


# ---- score ------------------------------------------------------------------------------------

REPORT = Path(__file__).with_name("MUTATION.md")
KILLED = {"killed", "timeout", "caught by type check"}  # a timeout: the mutant made the tests hang
MUTATED_MODULES = ("utils", "training", "retrieval", "plots")  # the modules whose mutants are scored
_MODULE = "(?:" + "|".join(MUTATED_MODULES) + ")"


def equivalent_mutants(report: Path = REPORT) -> set[str]:
    text = report.read_text(encoding="utf-8")
    section = text.split("<!-- equivalent mutants: start -->")[-1].split("<!-- equivalent mutants: end -->")[0]
    return set(re.findall(_MODULE + r"\.x\S*?__mutmut_\d+", section))


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    status = dict(re.findall(r"^\s*(" + _MODULE + r"\.\S+): (.+)$", out, flags=re.MULTILINE))
    checked = {name: s for name, s in status.items() if s != "not checked"}
    equivalent = equivalent_mutants()
    counts = Counter(s for name, s in checked.items() if name not in equivalent)
    killed = sum(counts[s] for s in KILLED)
    total = sum(counts.values())
    print(f"mutants checked: {len(checked)}; equivalent (benchmarks/MUTATION.md): "
          f"{len(equivalent & set(checked))}")
    print("  " + ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())))
    print(f"mutation score: {killed} killed / {total} = {100 * killed / max(total, 1):.2f}%")
    stale = sorted(name for name in equivalent if checked.get(name, "survived") != "survived")
    if stale:
        states = ", ".join(sorted({checked.get(n, "absent") for n in stale}))
        print(f"listed as equivalent but {states}: " + " ".join(stale))
    left = sorted(name for name, s in checked.items() if s not in KILLED and name not in equivalent)
    if left:
        print("not killed: " + " ".join(left))
    return 0


# ---- constants -----------------------------------------------------------------------------------
# mutmut mutates only function bodies; the label maps, grids and names (utils.py section 1, retrieval.py's grid)
# are module code. These hand-made mutants are each run against the fast tests (`python benchmarks/mutation.py
# constants`, ~10 min).

CONSTANT_MUTANTS = [  # (file, what, text in that file, its mutant)
    ("utils.py", "LABELS order", '("nose-right", "nose-left", "ear-right"', '("nose-left", "nose-right", "ear-right"'),
    ("utils.py", "LABEL_TO_COARSE ear-left -> nose", '"ear-right": "ear", "ear-left": "ear",',
     '"ear-right": "ear", "ear-left": "nose",'),
    ("utils.py", "COARSE_CLASSES order", '("ear", "nose", "vc", "throat")', '("nose", "ear", "vc", "throat")'),
    ("utils.py", "FINE_TASKS ear pair swapped", '"ear": ("ear-left", "ear-right"),',
     '"ear": ("ear-right", "ear-left"),'),
    ("utils.py", "FINE_TASKS vc pair swapped", '"vc": ("vc-open", "vc-closed"),', '"vc": ("vc-closed", "vc-open"),'),
    ("utils.py", "FLIP_LABEL ear-left kept", '"ear-left": "ear-right", "vc-open": "vc-open"',
     '"ear-left": "ear-left", "vc-open": "vc-open"'),
    ("utils.py", "FLIP_LABEL vc-open -> vc-closed", '"vc-open": "vc-open", "vc-closed": "vc-closed",',
     '"vc-open": "vc-closed", "vc-closed": "vc-closed",'),
    ("utils.py", "FLIP_LABEL nose-right kept", 'FLIP_LABEL: dict[str, str] = {"nose-right": "nose-left"',
     'FLIP_LABEL: dict[str, str] = {"nose-right": "nose-right"'),
    ("utils.py", "DINO_MODEL_SETS separate without vc", '"separate": {task: (task,) for task in DINO_TASKS},',
     '"separate": {task: (task,) for task in DINO_TASKS if task != "vc"},'),
    ("utils.py", "IMAGE_EXTENSIONS without .jpg", '(".png", ".jpg", ".jpeg",', '(".png", ".jpeg",'),
    ("utils.py", "THRESHOLD_GRID without 1.0", 'round(0.01 * i, 2) for i in range(101))',
     'round(0.01 * i, 2) for i in range(100))'),
    ("utils.py", "SOFT_FUSION_GRID without 1.0", 'round(0.05 * i, 2) for i in range(21))',
     'round(0.05 * i, 2) for i in range(20))'),
    ("utils.py", "JOINT_WEIGHT_GRID without 1.0", 'round(0.1 * i, 1) for i in range(11))',
     'round(0.1 * i, 1) for i in range(10))'),
    ("utils.py", "TEMPERATURE_GRID without 0.2", '0.05, 0.1, 0.2)  # prototypes', '0.05, 0.1)  # prototypes'),
    ("retrieval.py", "RERANK_BETA_GRID without 0", '(0.0, 0.05, 0.1, 0.2, 0.3)', '(0.05, 0.1, 0.2, 0.3)'),
    ("utils.py", "FINE_DECISION_THRESHOLD 0.6", 'FINE_DECISION_THRESHOLD: float = 0.5',
     'FINE_DECISION_THRESHOLD: float = 0.6'),
    ("utils.py", "SUBMISSIONS track2 JSON name", '("submission_i2i.zip", "submission_i2i.json")',
     '("submission_i2i.zip", "submission.json")'),
    ("utils.py", "SUBMISSIONS track1 zip name", '"track1": ("submission.zip", "submission.json")',
     '"track1": ("submission1.zip", "submission.json")'),
    ("utils.py", "RETRIEVAL_GALLERIES without lists", '("test_folders", "lists", "all")', '("test_folders", "all")'),
    ("utils.py", "SPLITS without stratified", '("grouped", "stratified")  #', '("grouped",)  #'),
    ("utils.py", "_JUNK_DIRS without __MACOSX", '_JUNK_DIRS = {"__MACOSX", ".ipynb_checkpoints", ".git"}',
     '_JUNK_DIRS = {".ipynb_checkpoints", ".git"}'),
    ("utils.py", "_CSV_HEADER_WORDS without image", '_CSV_HEADER_WORDS = {"image", "images",',
     '_CSV_HEADER_WORDS = {"images",'),
    ("utils.py", "ANNOTATION_FILES without data.json", '"t2i.json", "data.json", "cls.csv"', '"t2i.json", "cls.csv"'),
    ("utils.py", "NOTE_KINDS without duplicate", 'NOTE_KINDS = {"name-case", "duplicate", "csv-header"}',
     'NOTE_KINDS = {"name-case", "csv-header"}'),
    ("utils.py", "PROMPT_TEMPLATES without the paper's",
     '    "An endoscopic image of the {}.",  # the paper\'s diagram\n', ''),
    ("utils.py", "FINE_CLASS_TEXTS ear-left says right",
     '"ear-left": ("left ear canal and tympanic membrane", "left ear")',
     '"ear-left": ("right ear canal and tympanic membrane", "left ear")'),
]
FAST_TESTS = ["tests/test_data.py", "tests/test_clip.py", "tests/test_dino.py", "tests/test_hybrid.py",
              "tests/test_retrieval.py", "tests/test_learned_retrieval.py"]


def constants() -> int:
    import tempfile

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "repo"
        shutil.copytree(root, work, ignore=shutil.ignore_patterns(".venv", "mutants", ".git", "outputs", "__pycache__"))
        originals = {name: (work / name).read_text(encoding="utf-8") for name, *_ in CONSTANT_MUTANTS}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        survived = 0
        for name, what, old, new in CONSTANT_MUTANTS:
            original = originals[name]
            if original.count(old) != 1:
                print(f"not found\t{what}")
                continue
            (work / name).write_text(original.replace(old, new), encoding="utf-8")
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                      "-p", "benchmarks.mutation", *FAST_TESTS], cwd=work, env=env,
                                     capture_output=True, text=True, check=False)
            finally:
                (work / name).write_text(original, encoding="utf-8")  # one mutant at a time
            first = next((line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
            survived += run.returncode == 0
            print(f"{'killed' if run.returncode else 'SURVIVED'}\t{what}\t{first}", flush=True)
        print(f"constants: {len(CONSTANT_MUTANTS) - survived} of {len(CONSTANT_MUTANTS)} killed")
    return 0


if __name__ == "__main__":
    sys.exit(constants() if sys.argv[1:] == ["constants"] else main())
