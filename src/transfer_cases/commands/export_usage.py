"""The Python snippet `transfer-export` prints: load the exported model, preprocess an image as the
pipeline does (EXIF orientation, RGB, resize, crop, normalisation) and classify it."""

from __future__ import annotations

import json
from pathlib import Path

_LOAD = {
    "onnx": """\
import json

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(MODEL_PATH, providers=["CPUExecutionProvider"])
info = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}


def run(x):
    return session.run(["probabilities"], {"image": x})[0]
""",
    "torchscript": """\
import json

import numpy as np
import torch
from PIL import Image, ImageOps

extra = {"metadata.json": ""}
model = torch.jit.load(MODEL_PATH, _extra_files=extra)
info = json.loads(extra["metadata.json"])


def run(x):
    return model(torch.from_numpy(x)).detach().numpy()
""",
    "exported": """\
import json

import numpy as np
import torch
from PIL import Image, ImageOps

extra = {"metadata.json": ""}
model = torch.export.load(MODEL_PATH, extra_files=extra).module()
info = json.loads(extra["metadata.json"])


def run(x):
    return model(torch.from_numpy(x)).detach().numpy()
""",
}

# The validation transform (transfer_cases.data.transforms.eval_transform) in PIL and numpy; `to_rgb`
# is the pipeline's own (transforms.to_rgb, less its error messages): PIL's convert("RGB") clips
# 16-bit grey at 255, so a 16-bit scan would reach the model near white. tests/test_export.py keeps
# the two equal.
_PREPROCESS = """\


def to_rgb(img):
    \"\"\"As training reads images: 16-bit grey scaled (not clipped) to 8 bit, float grey read as 0..1,
    transparent palettes through RGBA.\"\"\"
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        x = np.asarray(img)
        x = x * 255.0 if img.mode == "F" else x.astype(np.float64) / 257.0
        img = Image.fromarray(np.rint(x).astype(np.uint8))
    elif img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess(path):
    \"\"\"Resize the short side, centre-crop, scale to [0, 1], normalise: a (1, 3, crop, crop) batch.\"\"\"
    p = info["preprocess"]
    img = to_rgb(ImageOps.exif_transpose(Image.open(path)))  # upright, as the EXIF orientation says
    (w, h), size, crop = img.size, p["resize_size"], p["crop_size"]
    long = int(size * max(w, h) / min(w, h))
    img = img.resize((size, long) if w <= h else (long, size), Image.BILINEAR)
    left, top = round((img.width - crop) / 2), round((img.height - crop) / 2)
    img = img.crop((left, top, left + crop, top + crop))
    x = np.asarray(img, dtype=np.float32) / 255
    x = (x - np.array(p["mean"], np.float32)) / np.array(p["std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


probs = run(preprocess(IMAGE_PATH))[0]  # stack several images on axis 0 for a batch
best = int(probs.argmax())
print(info["class_names"][best], round(float(probs[best]), 4))
"""


def usage(fmt: str, path: str | Path, image: str = "image.jpg") -> str:
    """A self-contained Python snippet that loads the exported model and classifies `image`."""
    # Placeholders rather than str.format: the snippet is full of braces. JSON string literals are
    # Python ones, with double quotes like the rest of the snippet.
    snippet = _LOAD[fmt] + _PREPROCESS
    return snippet.replace("MODEL_PATH", json.dumps(str(path))).replace("IMAGE_PATH", json.dumps(image))
