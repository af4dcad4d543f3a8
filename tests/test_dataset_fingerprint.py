"""A store never hands back another data set's results, and one bad item never stops a run.

``explain_dataset`` resumes a store written with the same settings; the data are part of them: the contents of a
tensor or ``TensorDataset``, the sizes and modification times of an image folder's files, and for any other
``Dataset`` a content digest per item, recorded as it is explained and compared for a sample of the stored items on
resume. A NaN image is a failure record naming its item, like a corrupt file.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from neon_attrib import DeepNeon, KDEOutlier
from neon_attrib.scale import ImageFiles, explain_dataset


def _model() -> DeepNeon:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
    return DeepNeon(cnn, KDEOutlier(gamma=0.1)).fit(torch.rand(4, 3, 16, 16), progress=False)


def _run(model, data, out, **kwargs):
    return explain_dataset(model, data, out, batch_size=2, num_workers=0, progress=False, **kwargs)


class _Items(Dataset):
    """A plain Dataset (no fingerprint of its own): its items are checked against the store's digests."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: TensorDataset(x), _Items])
def test_a_store_refuses_other_data_of_the_same_shape(tmp_path, wrap):
    model = _model()
    first, second = torch.rand(5, 3, 16, 16), torch.rand(5, 3, 16, 16)
    out = tmp_path / "run.zarr"
    stored = _run(model, wrap(first), out)
    again = _run(model, wrap(first.clone()), out)  # the same data: resumed, nothing recomputed
    np.testing.assert_array_equal(again.table()["score"], stored.table()["score"])
    with pytest.raises(ValueError, match="the data|not the item explained"):
        _run(model, wrap(second), out)
    fresh = _run(model, wrap(second), out, overwrite=True)  # the user asked to start over: recomputed
    with torch.no_grad():
        np.testing.assert_allclose(fresh.table()["score"], model(second).double().numpy(), rtol=1e-5)


def test_a_store_refuses_an_image_folder_whose_files_changed(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    model = _model()
    out = tmp_path / "run.zarr"
    _run(model, ImageFiles(folder, min_size=16), out)
    _run(model, ImageFiles(folder, min_size=16), out)  # unchanged: resumed
    path = folder / "1.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)  # same name, other pixels
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="data_sha256: the data"):
        _run(model, ImageFiles(folder, min_size=16), out)


def test_a_nan_image_is_a_failure_record_naming_it(tmp_path):
    images = torch.rand(5, 3, 16, 16)
    images[3, 1, 2, 2] = float("nan")
    results = _run(_model(), images, tmp_path / "run.zarr")
    failures = results.failures()
    assert [row["id"] for row in failures] == ["3"] and "1 non-finite value(s)" in failures[0]["error"]
    assert results.summary["explained"] == 4
