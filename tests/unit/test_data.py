"""Images for calibration and evaluation: folders and .npz files, resizing, sampling, normalisation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitdeploy.artifacts import ModelSpec
from vitdeploy.data import fit_to_input, load_images, normalize
from vitdeploy.errors import InputError

SPEC = ModelSpec(name="t", input_size=(3, 16, 16), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 num_classes=5)


def save_image(path: Path, shape=(16, 16, 3), value=None, seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full(shape, value, np.uint8) if value is not None else \
        np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def inputs(images) -> np.ndarray:
    return np.concatenate([x for x, _ in images.batches(4)])


def test_class_folders_give_sorted_labels(tmp_path):
    for name, count in (("zebra", 2), ("ant", 1), ("moth", 3)):  # created out of order
        for i in range(count):
            save_image(tmp_path / name / f"{i}.png", seed=i)
    images = load_images(tmp_path, SPEC, require_labels=True)
    assert images.classes == ["ant", "moth", "zebra"]
    assert len(images) == 6
    for path, label in zip(images.paths, images.labels):
        assert images.classes[label] == path.relative_to(tmp_path).parts[0]
    assert images.labels.tolist() == [0, 1, 1, 1, 2, 2]
    labels = np.concatenate([y for _, y in images.batches(4)])
    assert labels.tolist() == images.labels.tolist()


def test_recursive_search_and_suffixes(tmp_path):
    save_image(tmp_path / "a" / "deep" / "deeper" / "1.png")
    save_image(tmp_path / "a" / "2.jpg")
    save_image(tmp_path / "b" / "nested" / "3.JPEG")
    (tmp_path / "b" / "readme.txt").write_text("not an image")
    images = load_images(tmp_path, SPEC)
    assert sorted(p.name for p in images.paths) == ["1.png", "2.jpg", "3.JPEG"]
    assert images.labels.tolist() == [0, 0, 1]  # the top-level folder is the class
    assert inputs(images).shape == (3, 3, 16, 16)


def test_flat_folder_has_no_labels(tmp_path):
    save_image(tmp_path / "1.png")
    save_image(tmp_path / "2.png")
    images = load_images(tmp_path, SPEC)
    assert images.labels is None and len(images) == 2
    with pytest.raises(InputError, match="no labels"):
        load_images(tmp_path, SPEC, require_labels=True)


def test_npz_grayscale_uint8(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", x=x, y=np.arange(5))
    images = load_images(tmp_path / "gray.npz", SPEC, require_labels=True)
    got = inputs(images)
    assert got.shape == (5, 3, 16, 16)  # grey replicated to the model's 3 channels
    expected = normalize(np.repeat(x[..., None], 3, axis=3), SPEC)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    gray_spec = ModelSpec(name="g", input_size=(1, 16, 16), mean=(0.5,), std=(0.5,), num_classes=2)
    assert inputs(load_images(tmp_path / "gray.npz", gray_spec)).shape == (5, 1, 16, 16)


def test_npz_float_tensors_pass_through(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "t.npz", x=x)
    np.testing.assert_array_equal(inputs(load_images(tmp_path / "t.npz", SPEC)), x)


@pytest.mark.parametrize("crop_pct, interpolation", [(1.0, "bilinear"), (0.875, "bicubic"), (0.9, "nearest")])
def test_resize_to_model_input(crop_pct, interpolation):
    spec = ModelSpec(name="t", input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=5,
                     crop_pct=crop_pct, interpolation=interpolation)
    image = np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    fitted = fit_to_input(image, spec, "test")
    assert fitted.shape == (16, 16, 3) and fitted.dtype == np.uint8
    # grayscale H×W goes through the same path
    assert fit_to_input(image[:, :, 0], spec, "test").shape == (16, 16, 3)


def test_resize_keeps_a_uniform_image_uniform_and_leaves_right_size_alone():
    assert (fit_to_input(np.full((20, 24, 3), 77, np.uint8), SPEC, "t") == 77).all()
    image = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_to_input(image, SPEC, "t"), image)   # crop_pct 1: nothing to do


@pytest.fixture(scope="module")
def vit_tiny_untrained():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("shape", [(224, 224), (300, 400), (500, 333)])
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_preprocessing_is_timms_eval_transform(shape, crop_mode, vit_tiny_untrained, tmp_path):
    """The exact input ``timm.data.create_transform(**resolve_data_config(model=m))`` gives: for the
    real ViT-Tiny's config (bicubic, crop 0.9) a 224x224 photo is still scaled to 248 and cropped."""
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from vitdeploy.load import load_model

    model = vit_tiny_untrained
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_mode": crop_mode}
    path = tmp_path / "m.pt"
    torch.save(model, path)
    _, spec = load_model(path, trust_pickle=True)
    assert (spec.crop_pct, spec.crop_mode, spec.interpolation) == (0.9, crop_mode, "bicubic")
    config = resolve_data_config(model=model)
    assert config["crop_mode"] == crop_mode
    image = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    expected = create_transform(**config)(Image.fromarray(image)).numpy()
    got = normalize(fit_to_input(image, spec, "t")[None], spec)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_jpeg_folder_and_npz_give_timms_tensors(tmp_path, vit_tiny_untrained):
    """224x224 JPEGs in a folder, and the same decoded pixels as an .npz: both give what timm's eval
    transform gives the decoded image (the real ViT-Tiny's config: bicubic, crop 0.9, centre)."""
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from vitdeploy.load import load_model

    model = vit_tiny_untrained
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_mode": "center"}
    torch.save(model, tmp_path / "m.pt")
    _, spec = load_model(tmp_path / "m.pt", trust_pickle=True)
    transform = create_transform(**resolve_data_config(model=model))
    folder = tmp_path / "jpegs" / "cls"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    decoded = []
    for i in range(4):
        smooth = np.kron(rng.integers(0, 256, size=(28, 28, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        Image.fromarray(smooth).save(folder / f"{i}.jpg", quality=90)
        with Image.open(folder / f"{i}.jpg") as img:
            decoded.append(np.asarray(img.convert("RGB")))
    expected = np.stack([transform(Image.fromarray(d)).numpy() for d in decoded])
    np.savez(tmp_path / "same.npz", x=np.stack(decoded))
    from_folder = np.concatenate([x for x, _ in load_images(tmp_path / "jpegs", spec).batches(8)])
    from_npz = np.concatenate([x for x, _ in load_images(tmp_path / "same.npz", spec).batches(8)])
    np.testing.assert_allclose(from_folder, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_npz, expected, rtol=0, atol=1e-6)


def test_folder_images_of_another_size_are_resized(tmp_path):
    save_image(tmp_path / "wide.png", shape=(20, 24, 3))
    save_image(tmp_path / "gray.png", shape=(30, 18))
    assert inputs(load_images(tmp_path, SPEC)).shape == (2, 3, 16, 16)


def test_image_that_cannot_fit_is_an_error():
    with pytest.raises(InputError, match="4 channels"):
        fit_to_input(np.zeros((16, 16, 4), np.uint8), SPEC, "img")


def test_sample_is_deterministic_and_without_replacement(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((100, 4, 4, 3), np.uint8), y=np.arange(100))
    images = load_images(tmp_path / "d.npz", SPEC)
    a = images.sample(20, seed=3).labels
    b = images.sample(20, seed=3).labels
    c = images.sample(20, seed=4).labels
    assert a.tolist() == b.tolist()
    assert len(set(a.tolist())) == 20  # no image twice
    assert a.tolist() == sorted(a.tolist())
    assert a.tolist() != c.tolist()
    assert len(images.sample(100)) == 100 and len(images.sample(500)) == 100
    assert images.sample(None) is images


def test_sample_of_a_folder_reports_a_corrupt_file_up_front(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "9_broken.png").write_bytes(b"not a png")
    images = load_images(tmp_path, SPEC)  # only the first image is decoded here
    with pytest.raises(InputError, match="9_broken.png"):
        images.sample(10)


def test_normalize_matches_manual_formula():
    x = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    got = normalize(x, SPEC)
    mean = np.array(SPEC.mean).reshape(1, 3, 1, 1)
    std = np.array(SPEC.std).reshape(1, 3, 1, 1)
    expected = (x.transpose(0, 3, 1, 2) / 255.0 - mean) / std
    assert got.shape == (2, 3, 5, 6) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
