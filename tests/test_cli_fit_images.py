"""The fit images of every command (``explain``, ``detect``, ``explain-dataset``) are read by one reader: the same
``--fit-pattern``, constant images (the black masks beside defect-free photos) left out with a warning, a folder of
only constant images refused, and a file that cannot be read named for what is wrong with it. Random weights, 32 px
images: each command runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neon_attrib.cli.main import main as cli_main
from neon_attrib.scale import ImageFiles, open_results
from neon_attrib.vision import ConstantImageError, check_not_constant, image_files


def _photos_and_masks(folder: Path, count: int, size: int = 32) -> Path:
    """``count`` noise photos ``tile{i}.jpg`` and an all-black mask ``tile{i}.png`` beside each (the layout of the
    magnetic-tile data)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"tile{index}.jpg",
                                                                                   quality=95)
        Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(folder / f"tile{index}.png")
    return folder


def _masks_only(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(np.full((32, 32), 255 * (index % 2), dtype=np.uint8)).save(folder / f"m{index}.png")
    return folder


def _query(tmp_path: Path) -> str:
    path = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_image_files_and_constant_check(tmp_path):
    folder = _photos_and_masks(tmp_path / "tiles", 2)
    (folder / "sub").mkdir()
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(folder / "sub" / "deep.png")
    assert [p.name for p in image_files(folder)] == ["tile0.jpg", "tile0.png", "tile1.jpg", "tile1.png"]
    assert [p.name for p in image_files(folder, "*.jpg")] == ["tile0.jpg", "tile1.jpg"]
    assert "deep.png" in [p.name for p in image_files(folder, recursive=True)]
    assert [p.name for p in image_files(folder, "**/*.png")] == ["deep.png", "tile0.png", "tile1.png"]
    with pytest.raises(ValueError, match="no image files matching"):
        image_files(folder, "*.bmp")
    with pytest.raises(ConstantImageError, match="every pixel is 0.5"):
        check_not_constant(torch.full((3, 4, 4), 0.5), "x")
    data = ImageFiles(folder, pattern="*.jpg")
    assert data.ids == ["tile0.jpg", "tile1.jpg"] and data.describe()["pattern"] == "*.jpg"
    masked = ImageFiles(folder, skip_constant=True)
    with pytest.raises(ConstantImageError, match="tile0.png: every pixel is 0"):
        masked[masked.ids.index("tile0.png")]
    assert masked[masked.ids.index("tile0.jpg")].shape == (3, 32, 32)


def _detect(tmp_path, fit: Path, out: str, *extra: str) -> int:
    return cli_main(["detect", _query(tmp_path), "--fit", str(fit), "--backbone", "resnet18", "--size", "32",
                     "--coreset-ratio", "1", "--holdout", "0", "--out", str(tmp_path / out), "--quiet", *extra])


def test_detect_fit_skips_masks_like_explain(tmp_path, capsys):
    """5 photos + 5 black masks: the masks are not fitted on, so the score equals a fit on the photos alone."""
    fit = _photos_and_masks(tmp_path / "tiles", 5)
    assert _detect(tmp_path, fit, "all") == 0
    err = capsys.readouterr().err
    assert err.count("warning: --fit: skipping") == 5 and "tile0.png: every pixel is 0" in err
    assert _detect(tmp_path, fit, "photos", "--fit-pattern", "*.jpg") == 0
    everything = json.loads((tmp_path / "all" / "scores.json").read_text())
    photos = json.loads((tmp_path / "photos" / "scores.json").read_text())
    assert everything["settings"]["n_fit"] == photos["settings"]["n_fit"] == 5
    assert everything["settings"]["fit_skipped"] == [str(fit / f"tile{i}.png") for i in range(5)]
    assert everything["images"]["query"]["score"] == pytest.approx(photos["images"]["query"]["score"], rel=1e-6)


def test_detect_refuses_a_folder_of_constant_images(tmp_path, capsys):
    assert _detect(tmp_path, _masks_only(tmp_path / "masks"), "out") == 2
    err = capsys.readouterr().err
    assert "error: --fit: all 2 images in" in err and "constant" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["corrupt", "tiny"])
def test_explain_fit_says_what_is_wrong_with_a_file(tmp_path, capsys, kind):
    """A corrupt or too small first fit image is named for what it is, not reported as 'all images constant'."""
    fit = _photos_and_masks(tmp_path / "fit", 1)
    bad = fit / "a_bad.png"
    if kind == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    else:
        Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8)).save(bad)
    out = tmp_path / "out"
    assert cli_main(["explain", _query(tmp_path), "--fit", str(fit), "--size", "32", "--out", str(out),
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a_bad.png" in err and "constant" not in err
    assert ("Could not read" in err) if kind == "corrupt" else ("smaller than" in err)


def _explain_dataset(images: Path, store: Path, *extra: str) -> int:
    return cli_main(["explain-dataset", str(images), "--out", str(store), "--size", "32", "--batch-size", "4",
                     "--workers", "0", "--max-locations", "50", "--quiet", *extra])


def test_explain_dataset_fits_on_the_photos_not_the_masks(tmp_path, capsys):
    """``explain-dataset DIR`` fits its head on DIR without the masks: the same scores as a fit on the photos."""
    tiles = _photos_and_masks(tmp_path / "tiles", 3)
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in tiles.glob("*.jpg"):
        (photos / path.name).write_bytes(path.read_bytes())
    assert _explain_dataset(tiles, tmp_path / "default.zarr") == 0
    err = capsys.readouterr().err
    assert "fitting: sample_locations: left out 3 of 6 items" in err and "tile0.png: every pixel is 0" in err
    assert _explain_dataset(tiles, tmp_path / "pattern.zarr", "--fit-pattern", "*.jpg") == 0
    assert _explain_dataset(tiles, tmp_path / "photos.zarr", "--fit", str(photos)) == 0
    scores = {name: open_results(tmp_path / f"{name}.zarr").table()["score"]
              for name in ("default", "pattern", "photos")}
    # rounding only (features of batches read differently, many threads); the masks fitted in would change them O(1)
    np.testing.assert_allclose(scores["default"], scores["photos"], rtol=1e-3)
    np.testing.assert_allclose(scores["pattern"], scores["photos"], rtol=1e-5)


def test_explain_dataset_refuses_a_fit_folder_of_constant_images(tmp_path, capsys):
    images = _photos_and_masks(tmp_path / "tiles", 1)
    assert _explain_dataset(images, tmp_path / "s.zarr", "--fit", str(_masks_only(tmp_path / "masks"))) == 2
    err = capsys.readouterr().err
    assert "none of the 2 items" in err and "m0.png: every pixel is 0" in err
    assert _explain_dataset(images, tmp_path / "t.zarr", "--fit-pattern", "*.gif") == 2
    assert "no image files matching --fit-pattern '*.gif'" in capsys.readouterr().err
