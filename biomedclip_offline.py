"""BiomedCLIP for Kaggle runs with internet off (README "BiomedCLIP offline"): tooling, not the method.

Run once where internet is on:

    import biomedclip_offline
    biomedclip_offline.export_biomedclip("biomedclip")   # the folder to attach as a Kaggle dataset
    biomedclip_offline.check_clip_offline("biomedclip")  # loads it with the network off

then set clip_model="local-dir:/kaggle/input/biomedclip". utils.load_clip reads such a folder through
offline_clip_dir, which stages the text tower's config for open_clip. Everything about the offline copy
(what it holds, writing it, checking it, loading it) is in this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from utils import BIOMEDCLIP_HUB_ID

# The hub repository of BiomedCLIP's text tower, which its own repository does not hold (ENTREP.md "Weights").
BIOMEDCLIP_TEXT_HUB_ID: str = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
# Files of each hub repository an offline copy needs (README "BiomedCLIP offline").
BIOMEDCLIP_FILES: tuple[str, ...] = ("open_clip_config.json", "open_clip_pytorch_model.bin", "tokenizer.json",
                                     "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
HF_TEXT_FILES: tuple[str, ...] = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                                  "special_tokens_map.json")


def offline_clip_dir(model_dir: Path, staging_root: Path) -> Path:
    """A folder open_clip's `local-dir:` loads with no network. open_clip reads the tokenizer from the
    folder but builds a Hugging Face text tower from `text_cfg.hf_model_name`, a hub id; this finds a
    local copy of that tower (config.json + vocab.txt or tokenizer.json: as `hf_model_name` itself,
    a sub-folder of model_dir, or the HF cache) and stages a copy of the folder under staging_root with
    the config pointing at it. model_dir itself is never modified (it may be read-only)."""
    config_path = model_dir / "open_clip_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a local-dir: folder needs the files of the model's hub "
                                f"repository ({', '.join(BIOMEDCLIP_FILES)}); biomedclip_offline.export_biomedclip "
                                "writes one.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return model_dir  # open_clip's own text tower: nothing to find
    hub_id = text_cfg["hf_model_name"]
    candidates = [Path(hub_id), model_dir / hub_id, model_dir / Path(hub_id).name, model_dir,
                  *sorted(p for p in model_dir.iterdir() if p.is_dir())]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
        from huggingface_hub import try_to_load_from_cache  # a copy downloaded earlier, read without network

        cached = try_to_load_from_cache(hub_id, "config.json")
        candidates += [Path(cached).parent] if isinstance(cached, str) else []
    text_dir = next((d for d in candidates if _is_hf_text_dir(d)), None)
    if text_dir is None:
        raise FileNotFoundError(
            f"{model_dir}: the text tower {hub_id!r} needs its config.json and vocab.txt offline. Put them in "
            f"{model_dir / Path(hub_id).name}/ (from https://huggingface.co/{hub_id}), or build the folder with "
            "biomedclip_offline.export_biomedclip where internet is on.")
    weights = [p for p in sorted(model_dir.iterdir()) if p.suffix in (".bin", ".safetensors", ".pth")]
    local = str(text_dir.resolve())
    config["model_cfg"]["text_cfg"] = {**text_cfg, "hf_model_name": local, "hf_tokenizer_name": local}
    text = json.dumps(config, indent=2)
    digest = hashlib.sha1((str(model_dir.resolve()) + text).encode()).hexdigest()[:12]
    staged = staging_root / f"{model_dir.name}-{digest}"
    if not staged.is_dir():  # built beside, then renamed: a concurrent load never sees half a folder
        staging_root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=staging_root))
        (building / "open_clip_config.json").write_text(text, encoding="utf-8")
        # the tokenizer comes from the text tower's repository, as open_clip's hf-hub: loading does
        for src in weights + [text_dir / n for n in HF_TEXT_FILES if (text_dir / n).is_file()]:
            try:
                os.symlink(src.resolve(), building / src.name)
            except OSError:  # no symlinks allowed here: copy
                shutil.copy2(src, building / src.name)
        try:
            building.rename(staged)
        except OSError:  # another process staged it first
            shutil.rmtree(building, ignore_errors=True)
    return staged


def _is_hf_text_dir(folder: Path) -> bool:
    try:
        has_vocab = (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()
        return has_vocab and "model_type" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def export_biomedclip(folder: str | os.PathLike, hub_id: str = BIOMEDCLIP_HUB_ID,
                      text_hub_id: str = BIOMEDCLIP_TEXT_HUB_ID) -> Path:
    """Run once where internet is on: write the folder to attach as a Kaggle dataset for offline runs
    (clip_model="local-dir:/kaggle/input/<its name>"). It holds BiomedCLIP's hub files and, in a
    sub-folder named after the text tower's repository, that repository's config.json and tokenizer
    files, which open_clip needs and BiomedCLIP's repository does not hold. Check it with
    check_clip_offline(folder)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    folder = Path(folder)
    for repo, names, into in ((hub_id.removeprefix("hf-hub:"), BIOMEDCLIP_FILES, folder),
                              (text_hub_id, HF_TEXT_FILES, folder / Path(text_hub_id).name)):
        for name in names:
            try:
                hf_hub_download(repo, name, local_dir=into)
            except EntryNotFoundError:
                if name in ("open_clip_config.json", "open_clip_pytorch_model.bin", "config.json"):
                    raise
    return folder


_OFFLINE_CHECK = """
import json, socket, sys
def no_network(*args, **kwargs):
    raise OSError("network access during the offline check")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = no_network
sys.path.insert(0, sys.argv[1])
import utils
from PIL import Image
from runtime import Runtime
clip = utils.load_clip("local-dir:" + sys.argv[2], "cpu", cache_dir=sys.argv[3])
text = utils.embed_texts(clip, ["An endoscopic image of the right nasal passage."], Runtime())
image = clip.model.encode_image(clip.preprocess(Image.new("RGB", (640, 480)))[None])
print("RESULT" + json.dumps({"text_dim": text.shape[1], "image_dim": image.shape[1],
                             "tokenizer": type(clip.tokenizer).__name__}))
"""


def check_clip_offline(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict:
    """Load a local-dir CLIP folder in a fresh interpreter with the Hugging Face hub set offline and
    sockets disabled, and embed one text and one image: {"text_dim", "image_dim", "tokenizer"}.
    Raises RuntimeError with the interpreter's error when anything needs the network or is missing."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run([sys.executable, "-c", _OFFLINE_CHECK, str(Path(__file__).resolve().parent), str(folder),
                               str(cache_dir or scratch)], env=env, capture_output=True, text=True, timeout=600,
                              check=False)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode or not result:
        raise RuntimeError(f"{folder} does not load offline:\n{proc.stderr[-3000:]}")
    return json.loads(result[0][len("RESULT"):])
