"""The preprocessing contract: read -> greyscale float -> resize -> equalise -> uint8 -> normalise.

Every command applies exactly the :class:`Preprocessing` stored in the checkpoint, so an image is
seen the same way in training, evaluation, prediction and explanation.

Steps (all on one greyscale channel):

1. ``read_image`` hook: float32 (H, W) in [0, 1] (the first reader plugin that understands the file).
2. Resize so the image fits ``size`` x ``size``:
   ``letterbox`` keeps the aspect ratio and pads with black (air) — nothing is cut off;
   ``crop`` keeps the aspect ratio and cuts the longer side centrally — nothing is padded;
   ``stretch`` squashes to a square (what the Kermany 224 px export already did).
3. Optional equalisation of the image content (padding excluded): ``hist`` (global histogram
   equalisation) or ``clahe`` (contrast-limited adaptive histogram equalisation, Zuiderveld 1994,
   via scikit-image).
4. Quantise to uint8. This is what the per-run cache holds: decoded and resized once per run,
   not once per epoch.
5. ``(x / 255 - mean) / std`` as a ``(N, 1, size, size)`` float32 tensor (:func:`to_tensor`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.errors import ImageReadError, UsageError

RESIZE_MODES = ("letterbox", "crop", "stretch")
EQUALIZE_MODES = ("none", "hist", "clahe")


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become model input; stored in every checkpoint."""

    size: int = 128
    resize: str = "letterbox"
    equalize: str = "none"
    mean: float = 0.5
    std: float = 0.25
    clahe_clip: float = 0.01

    def __post_init__(self) -> None:
        if not 8 <= int(self.size) <= 4096:
            raise UsageError(f"image size must be between 8 and 4096 pixels, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.equalize not in EQUALIZE_MODES:
            raise UsageError(f"equalize must be one of {', '.join(EQUALIZE_MODES)}, got {self.equalize!r}")
        if not self.std > 0:
            raise UsageError(f"normalisation std must be > 0, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def read_image(path: str | Path, max_size: int | None = None) -> np.ndarray:
    """Decode any supported file into float32 (H, W) in [0, 1] through the reader plugins."""
    from cxrtool.plugins import read_image_hook

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file")
    try:
        img = read_image_hook(path, max_size)
    except ImageReadError:
        raise
    except Exception as exc:  # a reader plugin failed in an unexpected way
        raise ImageReadError(f"{path}: {type(exc).__name__}: {exc}") from None
    if img is None:
        raise ImageReadError(f"{path}: not an image cxrtool can read")
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 2 or not np.isfinite(img).all():
        raise ImageReadError(f"{path}: decoded to an unusable array of shape {img.shape}")
    return img


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if img.shape == (height, width):
        return img
    out = Image.fromarray(img, mode="F").resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(out, dtype=np.float32)


def _equalize(img: np.ndarray, pp: Preprocessing) -> np.ndarray:
    if pp.equalize == "none" or img.size == 0:
        return img
    from skimage import exposure

    img = np.clip(img, 0.0, 1.0)
    if pp.equalize == "hist":
        return exposure.equalize_hist(img, nbins=256).astype(np.float32)
    return exposure.equalize_adapthist(img, clip_limit=pp.clahe_clip).astype(np.float32)


def geometry(shape: tuple[int, int], pp: Preprocessing) -> dict[str, float]:
    """Where the original image lands in the ``size`` x ``size`` input.

    Returns ``scale_x``, ``scale_y`` (input pixels per original pixel), ``offset_x``, ``offset_y``
    (input position of the original's top-left corner; negative when cropped). Explainers use it to
    map maps and patch sizes between the original image and the model input.
    """
    h, w = shape
    s = pp.size
    if pp.resize == "stretch":
        return {"scale_x": s / w, "scale_y": s / h, "offset_x": 0.0, "offset_y": 0.0}
    scale = s / max(h, w) if pp.resize == "letterbox" else s / min(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return {"scale_x": nw / w, "scale_y": nh / h, "offset_x": (s - nw) // 2, "offset_y": (s - nh) // 2}


def map_to_original(amap: np.ndarray, shape: tuple[int, int], pp: Preprocessing) -> np.ndarray:
    """A (size, size) map over the model input -> float32 ``shape`` (H, W) over the original image.

    Inverts the resize of :func:`preprocess`: the letterbox padding is dropped, a stretch undone, and
    with ``crop`` the parts of the original the model never saw are NaN. ``shape`` may be a reduced
    copy of the original (same aspect ratio), e.g. a display-sized one."""
    amap = np.asarray(amap, dtype=np.float32)
    h, w = shape
    s = pp.size
    if amap.shape != (s, s):
        raise UsageError(f"map of shape {amap.shape} is not over a {s}x{s} model input")
    g = geometry((h, w), pp)
    nw, nh = max(1, round(w * g["scale_x"])), max(1, round(h * g["scale_y"]))
    ox, oy = int(g["offset_x"]), int(g["offset_y"])
    if pp.resize != "crop":  # the original fills [oy:oy+nh, ox:ox+nw] of the input
        return _resize(np.ascontiguousarray(amap[oy : oy + nh, ox : ox + nw]), w, h)
    # crop: the input is the window [-oy:-oy+s, -ox:-ox+s] of the original resized to (nh, nw)
    x0, y0 = round(-ox / g["scale_x"]), round(-oy / g["scale_y"])
    cw, ch = min(w - x0, round(s / g["scale_x"])), min(h - y0, round(s / g["scale_y"]))
    out = np.full((h, w), np.nan, dtype=np.float32)
    out[y0 : y0 + ch, x0 : x0 + cw] = _resize(amap, cw, ch)
    return out


def display_image(path: str | Path, max_side: int = 1024) -> np.ndarray:
    """The original image for overlays: uint8 (H, W), downscaled so its longer side is <= ``max_side``."""
    img = read_image(path, max_size=max_side)
    h, w = img.shape
    if max(h, w) > max_side:
        k = max_side / max(h, w)
        img = _resize(img, max(1, round(w * k)), max(1, round(h * k)))
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


OVERLAY_ON = ("original", "input")


def overlay_base(path: str | Path, image: np.ndarray, amap: np.ndarray, pp: Preprocessing,
                 on: str = "original") -> tuple[np.ndarray, np.ndarray, str]:
    """What an overlay is drawn on: ``(image, map, where)``.

    ``on="original"``: the original file (display-sized, :func:`display_image`) and the map taken back
    onto it (:func:`map_to_original`); ``"input"``, in-memory sources (``npz://``) and files that can no
    longer be read: the model input ``image`` and ``amap`` as they are."""
    if on not in OVERLAY_ON:
        raise UsageError(f"overlays are drawn on {' or '.join(OVERLAY_ON)}, not {on!r}")
    if on == "original" and not str(path).startswith("npz://"):
        try:
            orig = display_image(path)
        except ImageReadError:  # read once already; the file changed since: draw what the model saw
            pass
        else:
            return orig, map_to_original(amap, orig.shape, pp), "original"
    return image, amap, "input"


def preprocess(img: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """float (H, W) in [0, 1] -> uint8 (size, size) following the contract (steps 2-4)."""
    s = pp.size
    h, w = img.shape
    g = geometry((h, w), pp)
    nw, nh = max(1, round(w * g["scale_x"])), max(1, round(h * g["scale_y"]))
    if pp.resize == "crop":
        img = _resize(img, nw, nh)
        top, left = (nh - s) // 2, (nw - s) // 2
        img = _equalize(img[top : top + s, left : left + s], pp)
        out = img
    else:
        content = _equalize(_resize(img, nw, nh), pp)
        out = np.zeros((s, s), dtype=np.float32)
        oy, ox = int(g["offset_y"]), int(g["offset_x"])
        out[oy : oy + nh, ox : ox + nw] = content
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def load(path: str | Path, pp: Preprocessing) -> np.ndarray:
    """Read and preprocess one file: uint8 (size, size)."""
    return preprocess(read_image(path, max_size=pp.size), pp)


def to_tensor(batch: np.ndarray, pp: Preprocessing, device: str | None = None):
    """uint8 (N, H, W) or (H, W) -> normalised float32 tensor (N, 1, H, W)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(batch))
    if t.ndim == 2:
        t = t[None]
    if device is not None:
        t = t.to(device, non_blocking=True)
    return normalize(t.unsqueeze(1).float().div_(255.0), pp)


def normalize(x, pp: Preprocessing):
    """[0, 1] float tensor -> model input (in place when possible)."""
    return x.sub_(pp.mean).div_(pp.std)


def denormalize(x, pp: Preprocessing):
    """Model input -> [0, 1] float tensor (a new tensor)."""
    return x * pp.std + pp.mean
