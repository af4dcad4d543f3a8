"""Image files, heatmaps and ``neon-attrib explain`` on awkward inputs.

16-bit and float images keep their real range, non-finite relevance is never silently drawn, and every failure of the
command is one line on stderr, exit code 2, before any work and without writing anything. Images are 32-64 px and
VGG-16 has random weights, so every command runs in seconds.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neon_attrib.cli import explain as _explain_cli
from neon_attrib.cli.main import main as cli_main
from neon_attrib.vision import load_image
from neon_attrib.viz import heatmap, heatmap_grid, overlay, save_heatmap, symmetric_limit


def _strict_json(path: Path):
    """Parse JSON as a strict reader would: bare NaN / Infinity are errors."""
    def reject(constant):
        raise ValueError(f"invalid JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def _noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback, nothing else printed before it
    return err


# ---------------------------------------------------------------------------------------------------------------------
# load_image: the image's real range
@pytest.mark.parametrize("kind", ["png16", "tif16", "tif_int32", "pgm16"])
def test_load_image_16_bit_grey_is_divided_by_65535(tmp_path, kind):
    values = np.linspace(0, 65535, 48 * 40).round().astype(np.uint16).reshape(48, 40)
    path = tmp_path / {"png16": "a.png", "tif16": "a.tif", "tif_int32": "a.tif", "pgm16": "a.pgm"}[kind]
    if kind == "pgm16":
        path.write_bytes(b"P5\n40 48\n65535\n" + values.astype(">u2").tobytes())
    else:
        Image.fromarray(values.astype(np.int32) if kind == "tif_int32" else values).save(path)
    image = load_image(path)
    assert image.shape == (3, 48, 40) and image.dtype == torch.float32
    expected = torch.from_numpy(values.astype(np.float64) / 65535).float()
    assert torch.allclose(image[0], expected, atol=1e-6) and torch.equal(image[0], image[2])
    assert float((image == 1.0).float().mean()) < 0.01  # not clipped to white


def test_load_image_16_bit_value_range_stretches_12_bit_data(tmp_path):
    values = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) % 4096
    Image.fromarray(values).save(tmp_path / "12bit.png")
    stretched = load_image(tmp_path / "12bit.png", value_range=(0, 4095))
    assert torch.allclose(stretched[0], torch.from_numpy(values / 4095.0).float(), atol=1e-6)
    assert torch.allclose(load_image(tmp_path / "12bit.png")[0], torch.from_numpy(values / 65535.0).float(),
                          atol=1e-6)


def test_load_image_float_tiff(tmp_path):
    unit = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    assert torch.equal(load_image(tmp_path / "unit.tif")[1], torch.from_numpy(unit))

    celsius = 20 + 60 * unit  # a temperature map in [20, 80]: never silently clipped or rescaled
    Image.fromarray(celsius).save(tmp_path / "celsius.tif")
    with pytest.raises(ValueError, match=r"load_image: .* lie outside \[0, 1\].*value_range"):
        load_image(tmp_path / "celsius.tif")
    assert torch.allclose(load_image(tmp_path / "celsius.tif", value_range=(20.0, 80.0))[0], torch.from_numpy(unit),
                          atol=1e-6)
    with pytest.raises(ValueError, match=r"lie outside \[30, 80\]"):
        load_image(tmp_path / "celsius.tif", value_range=(30.0, 80.0))

    broken = unit.copy()
    broken[3, 3], broken[5, 5] = np.nan, np.inf
    Image.fromarray(broken).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="load_image: .* has 2 non-finite pixel value"):
        load_image(tmp_path / "nan.tif")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1", "CMYK"])
def test_load_image_8_bit_modes_as_pillow_converts_them(tmp_path, mode):
    source = Image.fromarray(_noise((40, 36, 3))).convert(mode)
    source.save(tmp_path / ("a.jpg" if mode == "CMYK" else "a.png"))
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    with Image.open(path) as reread:
        expected = np.asarray(reread.convert("RGB"), dtype=np.float32) / 255
    assert torch.equal(load_image(path), torch.from_numpy(expected).permute(2, 0, 1))


@pytest.mark.parametrize("factor", [0.25, 0.75])  # over twice the limit Pillow raises, over the limit it warns
def test_load_image_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch, factor):
    Image.fromarray(_noise((64, 64))).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(64 * 64 * factor))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="load_image: .*decompression bomb.*MAX_IMAGE_PIXELS"):
            load_image(tmp_path / "bomb.png")


def test_load_image_odd_inputs(tmp_path):
    Image.fromarray(_noise((40, 40, 3))).save(tmp_path / "ok.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:300])
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(_noise((1, 1))).save(tmp_path / "one.png")
    (tmp_path / "folder.png").mkdir()
    cases = [
        (dict(path=tmp_path / "folder.png"), ValueError, "load_image: .* is a directory"),
        (dict(path=tmp_path / "nothere.png"), FileNotFoundError, "load_image: Image not found"),
        (dict(path=tmp_path / "empty.png"), ValueError, "load_image: Could not read"),
        (dict(path=tmp_path / "truncated.jpg"), ValueError, "load_image: Could not read"),
        (dict(path=tmp_path / "one.png"), ValueError, "load_image: .* 1x1 pixels, smaller than VGG-16's minimum"),
        (dict(path=tmp_path / "ok.jpg", size=10**6), ValueError, "load_image: resizing .*MAX_IMAGE_PIXELS"),
        (dict(path=tmp_path / "ok.jpg", size=64.0), ValueError, "'size' parameter of load_image"),
        (dict(path=tmp_path / "ok.jpg", value_range=(1, 1)), ValueError, "'value_range' parameter of load_image"),
        (dict(path=tmp_path / "ok.jpg", value_range=5), ValueError, "'value_range' parameter of load_image"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            load_image(**kwargs)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_load_image_unreadable_file(tmp_path):
    Image.fromarray(_noise((40, 40))).save(tmp_path / "secret.png")
    (tmp_path / "secret.png").chmod(0)
    with pytest.raises(ValueError, match="load_image: Could not read .*Permission denied"):
        load_image(tmp_path / "secret.png")


# ---------------------------------------------------------------------------------------------------------------------
# viz: non-finite relevance is an error, never a silent distortion
def _relevance_with(value) -> np.ndarray:
    relevance = np.random.default_rng(0).normal(size=(3, 32, 32))
    relevance[1, 4, 7] = value
    return relevance


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_heatmap_functions_reject_non_finite_relevance(tmp_path, value):
    relevance, image = _relevance_with(value), np.full((32, 32, 3), 0.5)
    for call, owner in [(lambda: heatmap(relevance), "heatmap"), (lambda: overlay(image, relevance), "overlay"),
                        (lambda: save_heatmap(relevance, tmp_path / "h" / "h.png"), "save_heatmap"),
                        (lambda: heatmap_grid(image, {"a": relevance}, path=tmp_path / "g" / "g.png"),
                         "heatmap_grid")]:
        with pytest.raises(ValueError, match=f"{owner}.*1 non-finite value"):
            call()
    assert not (tmp_path / "h").exists() and not (tmp_path / "g").exists()  # nothing written


@pytest.mark.parametrize("relevance", [np.ones((8, 8)) * (1 + 2j), [[1 + 1j, 0.0], [0.0, 1.0]]])
def test_heatmap_refuses_complex_relevance(relevance):
    with pytest.raises(ValueError, match="heatmap: 'relevance' must hold real numbers"):
        heatmap(relevance)  # the real part alone would be drawn


def test_symmetric_limit_uses_finite_values_only():
    relevance = np.zeros((8, 8))
    relevance[0, :4] = [1.0, -3.0, np.nan, np.inf]
    assert symmetric_limit(relevance, percentile=100) == 3.0
    assert symmetric_limit(np.full((4, 4), np.nan)) == np.finfo(np.float64).tiny


def test_overlay_rejects_images_outside_unit_range():
    relevance = np.ones((16, 16))
    with pytest.raises(ValueError, match=r"overlay: image values must lie in \[0, 1\]"):
        overlay(np.full((16, 16, 3), 200.0), relevance)  # 0-255 floats would be drawn white
    assert overlay(np.full((3, 16, 16), 1.0 + 1e-6), relevance).shape == (16, 16, 3)  # rounding is tolerated
    assert overlay(np.full((16, 16, 3), 200, dtype=np.uint8), relevance).shape == (16, 16, 3)


def test_viz_argument_errors_write_nothing(tmp_path):
    relevance = np.ones((16, 16))
    with pytest.raises(ValueError, match="save_heatmap: cannot tell the image format"):
        save_heatmap(relevance, tmp_path / "new" / "h.xyz")
    with pytest.raises(ValueError, match="heatmap_grid: cannot save a figure"):
        heatmap_grid(np.zeros((16, 16)), [relevance], path=tmp_path / "new" / "g.xyz")
    assert not (tmp_path / "new").exists()
    for call, message in [(lambda: heatmap(relevance, limit=float("nan")), "'limit' parameter of heatmap"),
                          (lambda: heatmap(relevance, percentile=150), "'percentile' parameter of heatmap"),
                          (lambda: heatmap(relevance, cmap="no-such-map"), "'cmap' parameter of heatmap"),
                          (lambda: heatmap(np.zeros((0, 5))), "heatmap: relevance has no pixels"),
                          (lambda: heatmap_grid(np.zeros((16, 16)), [relevance], ncols=0), "'ncols' parameter")]:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------------------------------------------------------------
# the command line: errors before any work
def _write(folder: Path, name: str, array: np.ndarray) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)
    return str(folder / name)


def test_cli_out_that_cannot_be_a_folder(tmp_path, capsys, monkeypatch):
    image = _write(tmp_path, "a.png", _noise((64, 64, 3)))
    (tmp_path / "file.txt").write_text("not a folder")
    for out, message in [(tmp_path / "file.txt", "is a file, not a folder"),
                         (tmp_path / "file.txt" / "sub" / "out", "lies under .*file.txt, which is a file")]:
        assert cli_main(["explain", image, "--out", str(out), "--quiet"]) == 2
        line = _error_line(capsys)
        assert line.startswith("neon-attrib explain: error: --out") and re.search(message, line)

    (tmp_path / "readonly").mkdir()
    real_access = os.access
    monkeypatch.setattr(_explain_cli.os, "access",
                        lambda p, mode: False if Path(p) == tmp_path / "readonly" else real_access(p, mode))
    assert cli_main(["explain", image, "--out", str(tmp_path / "readonly" / "out"), "--quiet"]) == 2
    line = _error_line(capsys)
    assert "its nearest existing parent" in line and "not writable" in line
    assert not (tmp_path / "readonly" / "out").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_cli_read_only_out(tmp_path, capsys):
    image = _write(tmp_path, "a.png", _noise((64, 64, 3)))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        assert cli_main(["explain", image, "--out", str(tmp_path / "ro" / "out"), "--quiet"]) == 2
        assert "not writable" in _error_line(capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_cli_odd_arguments_are_one_line_errors(tmp_path, capsys):
    image = _write(tmp_path, "a.png", _noise((64, 64, 3)))
    Image.fromarray(np.full((64, 64), 40.0, dtype=np.float32)).save(tmp_path / "celsius.tif")
    _write(tmp_path / "masks", "m.png", np.zeros((64, 64), dtype=np.uint8))
    (tmp_path / "dir.png").mkdir()
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "dir.png")], "is a directory"),
        ([str(tmp_path / "celsius.tif")], r"lie outside \[0, 1\].*--value-range"),
        ([image, "--size", "100000"], "--size 100000 gives images of at least"),
        ([image, "--gamma", "inf"], "--gamma must be a finite number"),
        ([image, "--seed", "-1"], "--seed must be >= 0"),
        ([image, "--value-range", "1", "1"], "--value-range LOW HIGH must be finite with LOW < HIGH"),
        ([image, "--fit-pattern", "*.png"], "--fit-pattern only applies with --fit"),
        ([image, "--fit", str(tmp_path), "--fit-pattern", "*.nothing"], "no image files matching --fit-pattern"),
        ([image, "--fit", str(tmp_path), "--fit-pattern", "/abs/*.png"], "is not a usable pattern"),
    ]
    for argv, message in cases:
        assert cli_main(["explain", *argv, "--out", str(out), "--quiet"]) == 2, argv
        assert re.search(message, _error_line(capsys)), argv
        assert not out.exists(), argv
    with pytest.raises(SystemExit) as exit_info:  # no image at all: argparse's own usage error
        cli_main(["explain", "--quiet"])
    assert exit_info.value.code == 2


def test_cli_all_fit_images_constant(tmp_path, capsys):
    image = _write(tmp_path, "a.png", _noise((32, 32, 3)))
    for index in range(2):
        _write(tmp_path / "masks", f"m{index}.png", np.zeros((32, 32), dtype=np.uint8))
    out = tmp_path / "out"
    assert cli_main(["explain", image, "--fit", str(tmp_path / "masks"), "--size", "32", "--out", str(out),
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("warning: --fit: skipping") == 2
    assert "error: --fit: all 2 images in" in err and "constant" in err and not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# the command line: what it writes
def test_cli_fit_pattern_constant_masks_progress_raw_and_clusters(tmp_path, capsys):
    """Photos with black masks beside them: the masks are skipped with a warning, or left out by --fit-pattern;
    the progress bar goes to stderr; --save-raw writes what the PNG shows; --explain-clusters picks the passes."""
    fit = tmp_path / "fit"
    for index in range(3):
        _write(fit, f"tile{index}.jpg", _noise((32, 32, 3), seed=index))
        _write(fit, f"tile{index}.png", np.zeros((32, 32), dtype=np.uint8))  # the defect-free masks: all black
    grey16 = np.random.default_rng(5).integers(0, 65536, size=(32, 40)).astype(np.uint16)
    targets = [_write(tmp_path / "in", "grey16.png", grey16), _write(tmp_path / "in", "rgb.png", _noise((32, 32, 3)))]
    common = ["--head", "kde-outlier", "--head", "kmeans", "--clusters", "2", "--size", "32"]

    out = tmp_path / "out"
    assert cli_main(["explain", *targets, "--fit", str(fit), *common, "--save-raw", "npy", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: --fit: skipping") == 3 and "tile0.png" in err
    assert "neon-attrib explain: 100%" in err and "2/2" in err  # the per-image progress bar
    report = _strict_json(out / "scores.json")
    assert report["settings"]["fit_skipped"] == [str(fit / f"tile{index}.png") for index in range(3)]
    for stem in ("grey16", "rgb"):
        kmeans = report["images"][stem]["kmeans"]
        assigned = kmeans["explained_cluster"]
        assert kmeans["explained_clusters"] == [assigned] and assigned == int(np.argmax(kmeans["scores"]))
        assert sorted(p.name for p in out.glob(f"{stem}_kmeans_c*")) == [f"{stem}_kmeans_c{assigned}.npy",
                                                                         f"{stem}_kmeans_c{assigned}.png"]
    raw = np.load(out / "grey16_kde-outlier.npy")
    assert raw.dtype == np.float32 and raw.shape == (3, 32, 40)
    assert abs(float(raw.sum()) - report["images"]["grey16"]["kde-outlier"]["relevance_sum"]) < 1e-3 * abs(raw.sum())
    with Image.open(out / "grey16_kde-outlier.png") as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), heatmap(raw))

    out2 = tmp_path / "out2"
    assert cli_main(["explain", targets[1], "--fit", str(fit), "--fit-pattern", "*.jpg", *common,
                     "--explain-clusters", "all", "--save-raw", "npz", "--out", str(out2), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipping" not in err and "neon-attrib explain: 100%" not in err  # --quiet: no bar
    report = _strict_json(out2 / "scores.json")
    assert report["settings"]["fit_pattern"] == "*.jpg" and report["settings"]["fit_skipped"] == []
    assert report["images"]["rgb"]["kmeans"]["explained_clusters"] == [0, 1]
    with np.load(out2 / "rgb_relevance.npz") as arrays:
        assert sorted(arrays.files) == ["kde-outlier", "kmeans_c0", "kmeans_c1"]
        assert all(arrays[name].dtype == np.float32 and arrays[name].shape == (3, 32, 32) for name in arrays.files)
        assigned = report["images"]["rgb"]["kmeans"]["explained_cluster"]
        assert np.allclose(arrays[f"kmeans_c{assigned}"], np.load(out / f"rgb_kmeans_c{assigned}.npy"), atol=1e-5)
    assert (out2 / "rgb_kmeans_c0.png").is_file() and (out2 / "rgb_kmeans_c1.png").is_file()


def test_cli_non_finite_scores_are_null_in_strict_json(tmp_path, capsys):
    """Weights that overflow block 5 give a NaN outlier score: scores.json stays valid JSON (null), the user is told,
    and no blank heatmap is written."""
    from neon_attrib.vision import vgg16_features

    torch.manual_seed(0)
    state = vgg16_features().state_dict()
    state["28.weight"] *= 1e30  # block-5 locations near float32's limit: squared distances overflow
    torch.save(state, tmp_path / "overflow.pth")
    image = _write(tmp_path / "in", "a.png", _noise((32, 32, 3)))
    fit = tmp_path / "fit"
    for index in range(2):
        _write(fit, f"f{index}.png", _noise((32, 32, 3), seed=index + 1))
    out = tmp_path / "out"
    assert cli_main(["explain", image, "--fit", str(fit), "--gamma", "0.01", "--size", "32", "--weights",
                     str(tmp_path / "overflow.pth"), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    report = _strict_json(out / "scores.json")
    assert report["images"]["a"]["kde-outlier"]["score"] is None
    assert "written as null" in err and "no heatmap written" in err
    assert not (out / "a_kde-outlier.png").exists() and (out / "a_grid.png").is_file()


def test_unique_stems_never_collide():
    paths = [Path("x/a.png"), Path("y/a.png"), Path("a_1.jpg"), Path("z/a.png")]
    stems = _explain_cli._unique_stems(paths)
    assert len(set(stems)) == 4 and stems[0] == "a"


def test_json_safe_counts_replacements():
    safe, count = _explain_cli._json_safe({"a": [1.0, float("nan")], "b": {"c": float("-inf"), "d": "x", "e": 2}})
    assert safe == {"a": [1.0, None], "b": {"c": None, "d": "x", "e": 2}} and count == 2


def test_docstring_examples_of_images_and_viz():
    import doctest

    from neon_attrib import viz
    from neon_attrib.vision import images

    for module in (images, viz):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__
