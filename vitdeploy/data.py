"""Images for calibration and evaluation: a folder of images or an ``.npz``, preprocessed like the model.

Sources:
- a folder, searched recursively for jpg/jpeg/png; when the images sit in sub-folders, the sorted
  sub-folder names are the classes (torchvision ImageFolder convention) and give labels;
- an ``.npz`` with ``x`` as uint8 N×H×W×C (or N×H×W for grayscale) pixels, or float32 N×C×H×W
  tensors that are already preprocessed, and optional ``y`` labels.
Pixels are resized (shorter side to size/crop_pct, then centre crop) only when their size differs
from the model's, scaled to [0, 1] and normalised with the model's mean/std.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .artifacts import ModelSpec
from .errors import InputError
from .log import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_SEED = 0


@dataclasses.dataclass
class ImageSet:
    """Raw images (uint8 arrays, float tensors or file paths) and labels; preprocessed per batch."""

    source: str
    spec: ModelSpec
    pixels: Optional[np.ndarray] = None       # uint8 N×H×W×C
    tensors: Optional[np.ndarray] = None      # float32 N×C×H×W, already preprocessed
    paths: Optional[List[Path]] = None
    labels: Optional[np.ndarray] = None
    classes: Optional[List[str]] = None

    def __len__(self) -> int:
        for items in (self.pixels, self.tensors, self.paths):
            if items is not None:
                return len(items)
        return 0

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        pick = lambda a: None if a is None else (a[idx] if isinstance(a, np.ndarray) else [a[i] for i in idx])
        return dataclasses.replace(self, pixels=pick(self.pixels), tensors=pick(self.tensors),
                                   paths=pick(self.paths), labels=pick(self.labels))

    def sample(self, size: Optional[int], seed: int = DEFAULT_SEED) -> "ImageSet":
        """``size`` images drawn without replacement with a fixed seed (all of them if fewer)."""
        if size is None or size >= len(self):
            picked = self
        else:
            rng = np.random.default_rng(seed)
            picked = self.subset(np.sort(rng.choice(len(self), size=size, replace=False)))
        picked.check_files()
        return picked

    def check_files(self) -> None:
        """Open every image file (header and, for PNG, checksums; no decoding) so a corrupt file is
        reported before calibration starts rather than half-way through it."""
        from PIL import Image, UnidentifiedImageError

        for p in self.paths or ():
            try:
                with Image.open(p) as img:
                    img.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise InputError(f"cannot read image {p}: {exc}") from exc

    def batches(self, batch_size: int) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Yield (float32 N×C×H×W model inputs, labels or None)."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            labels = None if self.labels is None else self.labels[start:stop]
            yield self._inputs(start, stop), labels

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size

    def _inputs(self, start: int, stop: int) -> np.ndarray:
        if self.tensors is not None:
            return np.ascontiguousarray(self.tensors[start:stop], dtype=np.float32)
        if self.pixels is not None:
            images = [self._fit(self.pixels[i], f"{self.source}[{i}]") for i in range(start, stop)]
        else:
            images = [self._fit(_read_image(p, self.spec.input_size[0]), str(p)) for p in self.paths[start:stop]]
        return normalize(np.stack(images), self.spec)

    def _fit(self, image: np.ndarray, where: str) -> np.ndarray:
        return fit_to_input(image, self.spec, where)


def load_images(path: str | Path, spec: ModelSpec, require_labels: bool = False, what: str = "data") -> ImageSet:
    """Open ``path`` (folder or .npz) for ``spec``; checks shapes up front so errors come early."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        images = _from_folder(path, spec, what)
    elif path.suffix == ".npz":
        images = _from_npz(path, spec, what)
    else:
        raise InputError(f"{what} must be a folder of images or an .npz file, got {path}")
    if require_labels and images.labels is None:
        raise InputError(f"{what} {path} has no labels: use an .npz with 'y' or a folder with one sub-folder per class")
    # Preprocess the first image now: a size/channel problem is reported before any long work starts.
    if len(images):
        images.subset([0])._inputs(0, 1)
    for warning in unusual_inputs(images, what):
        log.warning("%s", warning)
    return images


# Images this much smaller than the model's input are upscaled so far that they carry little of what
# the model saw in training (a 2×3 thumbnail becomes 224×224 of blur).
MAX_UPSCALE = 4.0
# Preprocessed float input is (x/255 - mean)/std: a few units at most for any usual mean/std.
MAX_PREPROCESSED = 20.0
_SCANNED_FILES = 1000   # image headers read for the checks below (open only, no decoding)


def unusual_inputs(images: "ImageSet", what: str) -> List[str]:
    """One-line warnings for inputs that are used but are probably not what the user meant."""
    channels, height, width = images.spec.input_size
    where = f"{what} {images.source}"
    warnings = []
    if images.tensors is not None:
        low, high = float(images.tensors.min()), float(images.tensors.max())
        if low >= 0 and high > MAX_PREPROCESSED:
            warnings.append(f"{where}: float 'x' is taken as preprocessed input, but its values run from {low:.0f} "
                            f"to {high:.0f}, like raw 0-255 pixels: store them as uint8 to have them normalised")
        return warnings
    if images.pixels is not None:
        shapes = [images.pixels.shape[1:]] * len(images.pixels)
    else:
        shapes = [s for s in map(_header_shape, (images.paths or [])[:_SCANNED_FILES]) if s is not None]
    if not shapes:
        return warnings
    gray = sum(1 for s in shapes if s[2] == 1)
    if channels == 3 and gray:
        warnings.append(f"{where}: {gray} of {len(shapes)} images are grayscale: each is replicated to 3 channels "
                        "for this RGB model")
    small = [s for s in shapes if min(height / s[0], width / s[1]) > MAX_UPSCALE]
    if small:
        s = min(small, key=lambda s: s[0] * s[1])
        warnings.append(f"{where}: {len(small)} of {len(shapes)} images are more than {MAX_UPSCALE:g}x smaller than "
                        f"the model's {height}x{width} input (smallest {s[0]}x{s[1]}) and are upscaled to it")
    return warnings


def _header_shape(path: Path) -> Optional[Tuple[int, int, int]]:
    """(H, W, channels) from an image file's header (channels 1 for grayscale modes); None when the
    file cannot be opened (`ImageSet.check_files` reports that one)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            bands = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
            return img.height, img.width, bands
    except Exception:
        return None


def normalize(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 N×H×W×C → float32 N×C×H×W, (x/255 - mean)/std."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def fit_to_input(image: np.ndarray, spec: ModelSpec, where: str) -> np.ndarray:
    """One uint8 H×W×C image → the model's H×W×C, or a one-line error saying why it cannot be."""
    channels, height, width = spec.input_size
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{where}: expected an H×W×C image, got shape {list(image.shape)}")
    if image.shape[2] != channels:
        if image.shape[2] == 1 and channels == 3:
            image = np.repeat(image, 3, axis=2)
        else:
            raise InputError(f"{where}: image has {image.shape[2]} channels but the model takes {channels}: "
                             f"cannot resize it to the model's input {channels}x{height}x{width}")
    return _timm_eval_resize(image, spec)


@functools.lru_cache(maxsize=16)
def _eval_transform(height: int, width: int, crop_pct: float, crop_mode: str, interpolation: str, fill_mean: tuple):
    """timm's own evaluation transform up to the uint8 tensor (``use_prefetcher=True``: no float
    conversion, no normalisation -- `normalize` does that). Built from the same fields
    ``timm.data.resolve_data_config`` gives, so an image is resized and cropped exactly as
    ``timm.data.create_transform(**resolve_data_config(model=m))`` does -- including an image that
    already has the input size, which timm still scales by 1/crop_pct and centre-crops.
    ``fill_mean``: the padding colour of the 'border' mode, one value per channel of the image."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    return transforms_imagenet_eval(img_size=(height, width), crop_pct=crop_pct, crop_mode=crop_mode,
                                    interpolation=interpolation, mean=fill_mean, use_prefetcher=True)


def _timm_eval_resize(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    from PIL import Image

    _, height, width = spec.input_size
    key = (height, width, float(spec.crop_pct), spec.crop_mode or "center", spec.interpolation)
    if image.shape[2] in (1, 3):   # PIL's L and RGB
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else np.ascontiguousarray(image))
        out = np.asarray(_eval_transform(*key, tuple(spec.mean))(pil))   # C×H×W uint8
        return np.ascontiguousarray(out.transpose(1, 2, 0))
    # Other channel counts, plane by plane (PIL resizes the bands of an image independently anyway).
    planes = [np.asarray(_eval_transform(*key, (spec.mean[c],))(Image.fromarray(np.ascontiguousarray(image[:, :, c]))))[0]
              for c in range(image.shape[2])]
    return np.stack(planes, axis=2)


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def _from_folder(path: Path, spec: ModelSpec, what: str) -> ImageSet:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        if not os.access(path, os.R_OK | os.X_OK):  # rglob silently skips folders it cannot list
            raise InputError(f"cannot read {what} folder {path}: permission denied")
        raise InputError(f"{what} folder {path} contains no .jpg/.jpeg/.png images")
    classes = sorted({p.relative_to(path).parts[0] for p in files if len(p.relative_to(path).parts) > 1})
    labels = None
    if classes and all(len(p.relative_to(path).parts) > 1 for p in files):
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[p.relative_to(path).parts[0]] for p in files], dtype=np.int64)
    return ImageSet(source=str(path), spec=spec, paths=files, labels=labels, classes=classes or None)


def _from_npz(path: Path, spec: ModelSpec, what: str) -> ImageSet:
    try:
        data = np.load(path)
        keys = set(data.files)
    except Exception as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from exc
    if "x" not in keys:
        raise InputError(f"{what} {path} has no 'x' array (found: {', '.join(sorted(keys)) or 'nothing'})")
    try:  # members load lazily: object arrays, non-.npy members and bad labels fail here, not later
        x = data["x"]
        labels = data["y"].astype(np.int64).reshape(-1) if "y" in keys else None
    except Exception as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        raise InputError(f"{what} {path}: 'x' must be an array of images, got {type(x).__name__} {getattr(x, 'shape', '')}")
    if len(x) == 0:
        raise InputError(f"{what} {path} contains no images")
    if labels is not None and len(labels) != len(x):
        raise InputError(f"{what} {path}: {len(x)} images but {len(labels)} labels")
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise InputError(f"{what} {path}: uint8 'x' must be N×H×W×C, got shape {list(x.shape)}")
        return ImageSet(source=str(path), spec=spec, pixels=x, labels=labels)
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(spec.input_size):
            raise InputError(f"{what} {path}: float 'x' is taken as preprocessed N×C×H×W input and must be "
                             f"N×{'×'.join(map(str, spec.input_size))}, got {list(x.shape)}; "
                             "store uint8 N×H×W×C pixels to have them resized")
        return ImageSet(source=str(path), spec=spec, tensors=x.astype(np.float32), labels=labels)
    raise InputError(f"{what} {path}: 'x' must be uint8 pixels or float32 tensors, got {x.dtype}")


#: Training sets up to this size are decoded once and held in memory; larger ones batch by batch.
PRELOAD_BYTES = 2 << 30


class TensorSource:
    """An ImageSet indexed like a tensor (``source[indices]``, ``source[a:b]`` → float32 N×C×H×W),
    decoded on demand: what QAT draws its batches from when the set is too large to hold."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        import torch

        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        picked = self.images.subset(np.asarray(index, dtype=np.int64).reshape(-1))
        return torch.from_numpy(picked._inputs(0, len(picked)))


def as_tensor_source(images: ImageSet):
    """All of ``images`` as one tensor when it fits in `PRELOAD_BYTES`, else a `TensorSource`."""
    import torch

    if len(images) * int(np.prod(images.spec.input_size)) * 4 > PRELOAD_BYTES:
        return TensorSource(images)
    return torch.from_numpy(np.concatenate([x for x, _ in images.batches(256)]))
