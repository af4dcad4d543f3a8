"""Explaining a data set (neon_attrib.scale): store, resume, failures, settings, two gloo ranks, fitting, reading back.

A tiny CNN on 32x32 PNGs (a few images), CPU only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import zarr
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

import neon_attrib
from neon_attrib import DeepNeon, KDEOutlier, KMeansMembership
from neon_attrib.models.positional import PositionalMahalanobis
from neon_attrib.scale import ImageFiles, explain_dataset, fit_dataset, open_results, sample_locations

N_GOOD = 10
BATCH = 4


# ---------------------------------------------------------------------------------------------------------------------
# fixtures and helpers (module level: the spawned ranks import them)
def make_images(folder: Path) -> Path:
    """10 readable 32x32 PNGs, one 32x48 (centre-cropped with size=32), one corrupt file, one too small."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        pixels[8 * (i % 3):8 * (i % 3) + 8] = 255 * (i % 2)  # some structure
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)).save(folder / "wide.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "tiny.png")
    return folder


def assert_same_heatmaps(result: np.ndarray, expected: np.ndarray) -> None:
    """Heatmaps of the same images computed again: equal to float32 rounding (1e-5 of the largest value; CPU kernels
    may split their sums differently from one call to the next with many threads), NaN where the expected has NaN."""
    scale = float(np.nanmax(np.abs(expected))) if np.isfinite(expected).any() else 0.0
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))  # 32 px -> 4 x 4 locations


def files(folder: str | Path) -> ImageFiles:
    return ImageFiles(folder, size=32, preprocessing="torchvision")


def fitted_kde(folder: str | Path, gamma: float = 0.05) -> DeepNeon:
    model = DeepNeon(tiny_cnn(), KDEOutlier(gamma=gamma))
    return fit_dataset(model, files(folder), max_locations=40, seed=3, batch_size=BATCH, progress=False)


def fitted_kmeans(folder: str | Path) -> DeepNeon:
    model = DeepNeon(tiny_cnn(), KMeansMembership(n_clusters=3, n_init=2, random_state=0), pool="positive")
    return fit_dataset(model, files(folder), max_locations=60, seed=1, lloyd_steps=1, batch_size=3, progress=False)


def fitted_positional(folder: str | Path) -> DeepNeon:
    """PaDiM's head: one Gaussian per map position, from every location of every image (streamed statistics)."""
    return fit_dataset(DeepNeon(tiny_cnn(), PositionalMahalanobis()), files(folder), batch_size=3, progress=False)


def run(model: nn.Module, data, out: Path, **kwargs):
    kwargs = {"batch_size": BATCH, "num_workers": 0, "progress": False, **kwargs}
    return explain_dataset(model, data, out, **kwargs)


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store by relative path (the bytes; zarr.json attributes parsed)."""
    contents = {}
    for path in sorted(store.rglob("*")):
        if path.is_file():
            key = path.relative_to(store).as_posix()
            contents[key] = json.loads(path.read_text()) if path.name == "zarr.json" else path.read_bytes()
    return contents


def _rank_main(rank: int, world_size: int, init_file: str, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = fitted_kde(folder)
        run(model, files(folder), Path(out) / "run.zarr")
        kmeans = fitted_kmeans(folder)
        positional = fitted_positional(folder)
        torch.save({"support": model.head.support_, "centroids": kmeans.head.cluster_centers_,
                    "means": positional.head.distance.means, "factors": positional.head.distance.factors,
                    "locations": positional.n_locations_fit_}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def model(folder) -> DeepNeon:
    return fitted_kde(folder)


@pytest.fixture(scope="module")
def reference(folder, model, tmp_path_factory) -> Path:
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference") / "run.zarr"
    run(model, files(folder), out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
def test_store_table_and_failures(folder, model, reference):
    results = open_results(reference)
    assert results.complete and len(results) == N_GOOD + 3
    table = results.table()
    assert table["id"].tolist() == sorted(table["id"].tolist())  # relative paths, sorted
    failed = {row["id"]: row["error"] for row in results.failures()}
    assert set(failed) == {"broken.png", "tiny.png"}
    assert "Could not read" in failed["broken.png"] and "smaller" in failed["tiny.png"]
    ok = table[table["ok"]]
    assert len(ok) == N_GOOD + 1 and np.isfinite(ok["score"]).all() and ok["audit_ok"].all()
    assert (table[~table["ok"]]["target"] == -1).all() and np.isnan(table[~table["ok"]]["score"]).all()
    assert np.isnan(results.heatmap("broken.png")).all()
    assert results.summary == {"n": N_GOOD + 3, "explained": N_GOOD + 1, "failed": 2, "audit_failed": 0}
    # the heatmap of an image is what the explainer gives for its batch
    data = files(folder)
    index = results.index("img_05.png")
    batch = torch.stack([data[i] for i in range(4, 8)])
    with model.explainer() as explainer:
        output, relevance = explainer(batch)
    assert_same_heatmaps(results.heatmap("img_05.png"), relevance[index - 4].numpy())
    assert table["score"][index] == pytest.approx(float(output[index - 4]), rel=1e-5)
    scale = float(relevance[index - 4].double().abs().sum())
    assert table["relevance_sum"][index] == pytest.approx(float(relevance[index - 4].double().sum()), abs=1e-5 * scale)
    csv_lines = (reference / "scores.csv").read_text().splitlines()
    assert len(csv_lines) == len(table) + 1 and csv_lines[0].startswith("index,id,status,score")
    assert any(line.startswith(f"{results.index('broken.png')},broken.png,failed") for line in csv_lines)


def test_two_gloo_ranks_equal_one_process(folder, model, reference, tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(folder), str(tmp_path)), nprocs=2, join=True)
    one, two = open_results(reference), open_results(tmp_path / "run.zarr")
    first, second = one.table(), two.table()
    for name in ("index", "id", "status", "target", "audit_ok", "error"):
        assert first[name].tolist() == second[name].tolist(), name
    for name in ("score", "relevance_sum", "output"):
        np.testing.assert_allclose(second[name], first[name], rtol=1e-6, atol=0, err_msg=name)
    a, b = one.relevance[:], two.relevance[:]
    assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b))
    scale = np.nanmax(np.abs(a))
    assert np.nanmax(np.abs(a - b)) <= 1e-6 * scale
    # the fitted heads: the same sample on 1 and 2 ranks, the same head on both ranks
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(ranks[0]["support"], model.head.support_, rtol=1e-6, atol=1e-7)
    assert torch.equal(ranks[0]["support"], ranks[1]["support"])
    assert torch.equal(ranks[0]["centroids"], ranks[1]["centroids"])
    torch.testing.assert_close(ranks[0]["centroids"], fitted_kmeans(folder).head.cluster_centers_,
                               rtol=1e-6, atol=1e-7)
    # a positional head: every rank's statistics merged on rank 0 = one process over all images
    single = fitted_positional(folder)
    for name in ("means", "factors"):
        assert torch.equal(ranks[0][name], ranks[1][name])
        torch.testing.assert_close(ranks[0][name], getattr(single.head.distance, name), rtol=1e-5, atol=1e-6)
    assert ranks[0]["locations"] == single.n_locations_fit_ == (N_GOOD + 1) * 16


def test_fit_dataset_positional_head_equals_fit_on_all_maps(folder):
    data = files(folder)
    images = torch.stack([data[i] for i in range(len(data)) if data.ids[i] not in ("broken.png", "tiny.png")])
    model = fitted_positional(folder)
    with torch.no_grad():
        maps = model.features(images)
    reference = PositionalMahalanobis().fit(maps)
    torch.testing.assert_close(model.head.distance.means, reference.distance.means, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.head.distance.factors, reference.distance.factors, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fitted on the whole maps of the dataset.*without max_locations"):
        fit_dataset(DeepNeon(tiny_cnn(), PositionalMahalanobis()), data, max_locations=10, progress=False)


class Killed(BaseException):
    """Stands for a kill: not an Exception, so it is not recorded as a failed image."""


class Crashing(Dataset):
    """The folder's images; raises Killed when item ``crash_at`` is read; records what was read."""

    def __init__(self, folder: Path, crash_at: int | None = None):
        self.files, self.crash_at, self.read = files(folder), crash_at, []
        self.ids = self.files.ids

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.crash_at:
            raise Killed
        self.read.append(index)
        return self.files[index]


def test_killed_run_resumes_to_the_same_store(folder, model, tmp_path):
    uninterrupted, resumed = tmp_path / "uninterrupted.zarr", tmp_path / "resumed.zarr"
    run(model, Crashing(folder), uninterrupted)
    with pytest.raises(Killed):
        run(model, Crashing(folder, crash_at=9), resumed)  # in block 2: blocks 0 and 1 are written
    assert not open_results(resumed).complete
    assert open_results(resumed).table()["status"].tolist()[8:] == [0] * 5  # pending
    again = Crashing(folder)
    run(model, again, resumed)
    # the shape probe, a sample of the stored items (their digests checked), then the unfinished blocks
    checked = [index for index in again.read[2:] if index < 8]
    assert again.read[:2] == [0, 1] and len(checked) <= 8 and again.read[2 + len(checked):] == list(range(8, 13))
    assert store_files(resumed) == store_files(uninterrupted)
    # a complete store with the same settings: nothing to redo
    nothing = Crashing(folder)
    run(model, nothing, resumed)
    assert nothing.read[:2] == [0, 1] and len(nothing.read) <= 2 + 8  # the shape probe and the digest sample only
    assert store_files(resumed) == store_files(uninterrupted)


def test_other_settings_are_refused(folder, model, reference, tmp_path):
    with pytest.raises(ValueError, match="other settings.*dtype"):
        run(model, files(folder), reference, dtype="float16")
    with pytest.raises(ValueError, match="batch_size"):
        run(model, files(folder), reference, batch_size=2)
    with pytest.raises(ValueError, match="model"):
        run(fitted_kde(folder, gamma=0.07), files(folder), reference)
    with pytest.raises(ValueError, match="data"):
        run(model, ImageFiles(folder, size=32, preprocessing="caffe"), reference)
    with pytest.raises(FileExistsError, match="resume=True"):
        run(model, files(folder), reference, resume=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a store"):
            run(model, files(folder), tmp_path / "other", overwrite=overwrite)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w").attrs["owner"] = "someone else"
    with pytest.raises(ValueError, match="not a store written by"):
        run(model, files(folder), tmp_path / "theirs.zarr", overwrite=True)
    with pytest.raises(ValueError, match="float16 or float32"):
        run(model, files(folder), tmp_path / "new.zarr", dtype="int8")
    # overwrite starts over: float16 now, same ids and (rounded) values
    copy = tmp_path / "copy.zarr"
    run(model, files(folder), copy)
    half = run(model, files(folder), copy, dtype="float16", overwrite=True)
    assert half.relevance.dtype == np.float16 and half.settings["dtype"] == "float16"
    full = open_results(reference).relevance[:]
    np.testing.assert_allclose(half.relevance[:].astype(np.float32), full, rtol=2e-3,
                               atol=2e-3 * float(np.nanmax(np.abs(full))))


def test_dataloader_tensor_and_folder_inputs(folder, model, reference, tmp_path):
    loader = DataLoader(files(folder), batch_size=BATCH, num_workers=1)  # its batch size and a worker process
    via_loader = explain_dataset(model, loader, tmp_path / "loader.zarr", progress=False)
    assert via_loader.ids == open_results(reference).ids
    assert_same_heatmaps(via_loader.relevance[:], open_results(reference).relevance[:])
    with pytest.raises(ValueError, match="shuffle=False"):
        explain_dataset(model, DataLoader(files(folder), shuffle=True), tmp_path / "x.zarr", progress=False)
    via_path = run(model, folder, tmp_path / "path.zarr", image_size=32)  # the model's preprocessing
    assert_same_heatmaps(via_path.relevance[:], open_results(reference).relevance[:])
    # another shape than the store's is a failure of that image; ids from the caller
    images = torch.rand(5, 3, 32, 32)
    images[3] = 0.5
    mixed = [images[0], images[1], torch.rand(3, 16, 16), images[3], images[4]]
    result = run(model, mixed, tmp_path / "mixed.zarr", ids=list("abcde"), batch_size=2)
    assert result.ids == list("abcde")
    assert [row["error"].split(":")[0] for row in result.failures()] == ["ValueError"]
    assert "the store holds (3, 32, 32)" in result.failures()[0]["error"]


def test_results_reading_and_contact_sheet(folder, reference):
    from matplotlib.figure import Figure

    results = open_results(reference)
    top = results.top(3)
    assert len(top) == 3 and list(top["score"]) == sorted(top["score"], reverse=True)
    assert results.top(3, largest=False)["score"][0] == results.table()["score"][results.table()["ok"]].min()
    rows = results.rows()
    assert isinstance(rows[0], dict) and isinstance(rows[0]["output"], list) and isinstance(rows[0]["score"], float)
    image = results.image("img_00.png")
    np.testing.assert_array_equal(image, files(folder).image(results.index("img_00.png")).numpy())
    figure = results.contact_sheet(4, ncols=2)
    assert isinstance(figure, Figure)
    assert sum(1 for ax in figure.axes if ax.images) == 8  # 4 images and 4 heatmaps
    assert sum(1 for ax in results.contact_sheet(3, images=False).axes if ax.images) == 3
    with pytest.raises(KeyError):
        results.heatmap("missing.png")
    assert neon_attrib.explain_dataset is explain_dataset and neon_attrib.open_results is open_results
    assert neon_attrib.fit_dataset is fit_dataset


def test_sample_is_uniform_and_independent_of_batching(folder):
    model = DeepNeon(tiny_cnn(), KDEOutlier(gamma=0.05))
    data = files(folder)
    everything = sample_locations(model, data, max_locations=None, batch_size=5, progress=False)
    good = [i for i in range(len(data)) if data.ids[i] not in ("broken.png", "tiny.png")]
    with torch.no_grad():
        fmap = model.features(torch.stack([data[i] for i in good]))
    torch.testing.assert_close(everything, DeepNeon._rows(fmap))  # (image, location) order
    first = sample_locations(model, data, max_locations=25, seed=7, batch_size=3, progress=False)
    second = sample_locations(model, data, max_locations=25, seed=7, batch_size=5, progress=False)
    assert first.shape == (25, 8)
    torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-7)  # the same locations (conv rounding by batch)
    assert not torch.equal(first, sample_locations(model, data, max_locations=25, seed=8, progress=False))
    with pytest.raises(ValueError, match="lloyd_steps"):
        fit_dataset(model, data, max_locations=10, lloyd_steps=1, progress=False)


def test_command_line(folder, tmp_path, capsys):
    from neon_attrib.cli.main import main

    few = tmp_path / "few"
    few.mkdir()
    for name in ("img_00.png", "img_01.png", "broken.png"):  # VGG-16 is costly: three images
        (few / name).write_bytes((folder / name).read_bytes())
    store = tmp_path / "cli.zarr"
    argv = ["explain-dataset", str(few), "--out", str(store), "--size", "32", "--batch-size", "2", "--workers", "0",
            "--max-locations", "20", "--quiet", "--dtype", "float16"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err and "Explained 2 of 3 images" in captured.out
    results = open_results(store)
    assert results.relevance.dtype == np.float16 and (store / "scores.csv").is_file()
    assert [row["id"] for row in results.failures()] == ["broken.png"]
    assert np.isfinite(results.heatmap("img_01.png")).all()
    assert main([*argv[:-1], "float32"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["explain-dataset", str(tmp_path / "missing"), "--out", str(store)]) == 2
    assert os.path.isdir(store)


@pytest.mark.parametrize("name", ["neon_attrib.scale.explain", "neon_attrib.scale.fit"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_kmeans_targets_and_scores_are_recorded(folder, tmp_path):
    model = fitted_kmeans(folder)
    results = run(model, files(folder), tmp_path / "kmeans.zarr", target=None)
    table = results.table()
    ok = table[table["ok"]]
    assert ok["output"].shape == (N_GOOD + 1, 3)
    np.testing.assert_array_equal(ok["target"], ok["output"].argmax(1))  # the assigned cluster
    np.testing.assert_array_equal(ok["score"], ok["output"][np.arange(len(ok)), ok["target"]])
    fixed = run(model, files(folder), tmp_path / "cluster0.zarr", target=0).table()
    assert (fixed[fixed["ok"]]["target"] == 0).all()
