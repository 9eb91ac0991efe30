"""BiomedCLIP for Kaggle runs with internet off (README "BiomedCLIP offline"): tooling, not the method.

Run once where internet is on:

    import biomedclip_offline
    biomedclip_offline.export_biomedclip("biomedclip")   # the folder to attach as a Kaggle dataset
    biomedclip_offline.check_clip_offline("biomedclip")  # loads it with the network off

then set clip_model="local-dir:/kaggle/input/biomedclip". utils.load_clip reads such a folder
(utils.offline_clip_dir stages the text tower's config for open_clip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import utils
from utils import BIOMEDCLIP_FILES, BIOMEDCLIP_HUB_ID, BIOMEDCLIP_TEXT_HUB_ID, HF_TEXT_FILES


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
model, preprocess, tokenizer = utils.load_clip("local-dir:" + sys.argv[2], "cpu", cache_dir=sys.argv[3])
text = utils.embed_texts(model, tokenizer, ["An endoscopic image of the right nasal passage."], "cpu", amp="fp32")
image = model.encode_image(preprocess(Image.new("RGB", (640, 480)))[None])
print("RESULT" + json.dumps({"text_dim": text.shape[1], "image_dim": image.shape[1],
                             "tokenizer": type(tokenizer).__name__}))
"""


def check_clip_offline(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict:
    """Load a local-dir CLIP folder in a fresh interpreter with the Hugging Face hub set offline and
    sockets disabled, and embed one text and one image: {"text_dim", "image_dim", "tokenizer"}.
    Raises RuntimeError with the interpreter's error when anything needs the network or is missing."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run([sys.executable, "-c", _OFFLINE_CHECK, str(Path(utils.__file__).parent), str(folder),
                               str(cache_dir or scratch)], env=env, capture_output=True, text=True, timeout=600, check=False)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode or not result:
        raise RuntimeError(f"{folder} does not load offline:\n{proc.stderr[-3000:]}")
    return json.loads(result[0][len("RESULT"):])
