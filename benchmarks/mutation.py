"""`make mutation` helpers (benchmarks/MUTATION.md): a pytest plugin that renders the demo set once, and
the score of a finished mutmut run.

Plugin (pyproject.toml [tool.mutmut] loads it with `-p benchmarks.mutation`): mutmut runs each mutant's
tests in a pytest session of its own, so the session fixture of tests/conftest.py would render the
~140-image demo set again for every mutant, about 10 of the 12 seconds a data-loading mutant costs.
demo_data calls no function of utils (it imports three constants), so a byte copy of the first rendering
with the same arguments is the same input: the verdicts do not change, only the time. The copies live in
mutants/.demo_cache.

Score (`python benchmarks/mutation.py`, from the repository root after `mutmut run`): reads
`mutmut results --all true`, leaves out the mutants listed as equivalent in benchmarks/MUTATION.md (between
its "equivalent mutants" markers) and prints killed / survived / no tests / timeout and the score.

Constants (`python benchmarks/mutation.py constants`): section 1's label maps and grids are module code,
which mutmut does not mutate; hand-made mutants of them, each run against the fast tests.
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


def equivalent_mutants(report: Path = REPORT) -> set[str]:
    text = report.read_text(encoding="utf-8")
    section = text.split("<!-- equivalent mutants: start -->")[-1].split("<!-- equivalent mutants: end -->")[0]
    return set(re.findall(r"utils\.x\S*?__mutmut_\d+", section))


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    status = dict(re.findall(r"^\s*(utils\.\S+): (.+)$", out, flags=re.MULTILINE))
    checked = {name: s for name, s in status.items() if s != "not checked"}
    equivalent = equivalent_mutants()
    counts = Counter(s for name, s in checked.items() if name not in equivalent)
    killed = sum(counts[s] for s in KILLED)
    total = sum(counts.values())
    print(f"mutants checked: {len(checked)}; equivalent (benchmarks/MUTATION.md): {len(equivalent & set(checked))}")
    print("  " + ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())))
    print(f"mutation score: {killed} killed / {total} = {100 * killed / max(total, 1):.2f}%")
    stale = sorted(name for name in equivalent if checked.get(name, "survived") != "survived")
    if stale:
        print(f"listed as equivalent but {', '.join(sorted({checked.get(n, 'absent') for n in stale}))}: " + " ".join(stale))
    left = sorted(name for name, s in checked.items() if s not in KILLED and name not in equivalent)
    if left:
        print("not killed: " + " ".join(left))
    return 0


# ---- section 1: constants -----------------------------------------------------------------------
# mutmut mutates only function bodies; the label maps, grids and names of section 1 are module code. These
# hand-made mutants are each run against the fast tests (`python benchmarks/mutation.py constants`, ~10 min).

CONSTANT_MUTANTS = [  # (what, text in utils.py, its mutant)
    ("LABELS order", '("nose-right", "nose-left", "ear-right"', '("nose-left", "nose-right", "ear-right"'),
    ("LABEL_TO_COARSE ear-left -> nose", '"ear-right": "ear", "ear-left": "ear",', '"ear-right": "ear", "ear-left": "nose",'),
    ("COARSE_CLASSES order", '("ear", "nose", "vc", "throat")', '("nose", "ear", "vc", "throat")'),
    ("FINE_TASKS ear pair swapped", '"ear": ("ear-left", "ear-right"),', '"ear": ("ear-right", "ear-left"),'),
    ("FINE_TASKS vc pair swapped", '"vc": ("vc-open", "vc-closed"),', '"vc": ("vc-closed", "vc-open"),'),
    ("FLIP_LABEL ear-left kept", '"ear-left": "ear-right", "vc-open": "vc-open"', '"ear-left": "ear-left", "vc-open": "vc-open"'),
    ("FLIP_LABEL vc-open -> vc-closed", '"vc-open": "vc-open", "vc-closed": "vc-closed", "throat": "throat"}',
     '"vc-open": "vc-closed", "vc-closed": "vc-closed", "throat": "throat"}'),
    ("FLIP_LABEL nose-right kept", 'FLIP_LABEL: dict[str, str] = {"nose-right": "nose-left"', 'FLIP_LABEL: dict[str, str] = {"nose-right": "nose-right"'),
    ("DINO_MODEL_SETS separate without vc", '"separate": {task: (task,) for task in DINO_TASKS},',
     '"separate": {task: (task,) for task in DINO_TASKS if task != "vc"},'),
    ("IMAGE_EXTENSIONS without .jpg", '(".png", ".jpg", ".jpeg",', '(".png", ".jpeg",'),
    ("THRESHOLD_GRID without 1.0", 'round(0.01 * i, 2) for i in range(101))', 'round(0.01 * i, 2) for i in range(100))'),
    ("WEIGHT_GRID without 1.0", 'round(0.05 * i, 2) for i in range(21))', 'round(0.05 * i, 2) for i in range(20))'),
    ("PROTOTYPE_WEIGHT_GRID without 1.0", 'round(0.1 * i, 1) for i in range(11))', 'round(0.1 * i, 1) for i in range(10))'),
    ("PROTOTYPE_TEMPERATURE_GRID without 0.2", '0.05, 0.1, 0.2)  # CLIP', '0.05, 0.1)  # CLIP'),
    ("RERANK_BETA_GRID without 0", '(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)', '(0.02, 0.05, 0.1, 0.2, 0.3, 0.5)'),
    ("FINE_DECISION_THRESHOLD 0.6", 'FINE_DECISION_THRESHOLD: float = 0.5', 'FINE_DECISION_THRESHOLD: float = 0.6'),
    ("SUBMISSIONS track2 JSON name", '("submission_i2i.zip", "submission_i2i.json")', '("submission_i2i.zip", "submission.json")'),
    ("SUBMISSIONS track1 zip name", '"track1": ("submission.zip", "submission.json")', '"track1": ("submission1.zip", "submission.json")'),
    ("RETRIEVAL_GALLERIES without lists", '("test_folders", "lists", "all")', '("test_folders", "all")'),
    ("SPLITS without stratified", '("grouped", "stratified")  #', '("grouped",)  #'),
    ("_JUNK_DIRS without __MACOSX", '_JUNK_DIRS = {"__MACOSX", ".ipynb_checkpoints", ".git"}', '_JUNK_DIRS = {".ipynb_checkpoints", ".git"}'),
    ("_CSV_HEADER_WORDS without image", '_CSV_HEADER_WORDS = {"image", "images",', '_CSV_HEADER_WORDS = {"images",'),
    ("ANNOTATION_FILES without data.json", '"t2i.json", "data.json", "cls.csv"', '"t2i.json", "cls.csv"'),
    ("NOTE_KINDS without duplicate", 'NOTE_KINDS = {"name-case", "duplicate", "csv-header"}', 'NOTE_KINDS = {"name-case", "csv-header"}'),
    ("PROMPT_TEMPLATES without the paper's", '    "An endoscopic image of the {}.",  # the paper\'s diagram\n', ''),
    ("FINE_CLASS_TEXTS ear-left says right", '"ear-left": ("left ear canal and tympanic membrane", "left ear")',
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
        original = (work / "utils.py").read_text(encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        survived = 0
        for what, old, new in CONSTANT_MUTANTS:
            if original.count(old) != 1:
                print(f"not found\t{what}")
                continue
            (work / "utils.py").write_text(original.replace(old, new), encoding="utf-8")
            run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                  "-p", "benchmarks.mutation", *FAST_TESTS], cwd=work, env=env,
                                 capture_output=True, text=True, check=False)
            first = next((line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
            survived += run.returncode == 0
            print(f"{'killed' if run.returncode else 'SURVIVED'}\t{what}\t{first}", flush=True)
        print(f"constants: {len(CONSTANT_MUTANTS) - survived} of {len(CONSTANT_MUTANTS)} killed")
    return 0


if __name__ == "__main__":
    sys.exit(constants() if sys.argv[1:] == ["constants"] else main())
