"""The examples in the docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["neon_attrib.layers", "neon_attrib.kde", "neon_attrib.kmeans", "neon_attrib.rules", "neon_attrib.composites",
           "neon_attrib.attribution", "neon_attrib.datasets", "neon_attrib.deep", "neon_attrib.viz", "neon_attrib.fast",
           "neon_attrib.captum", "neon_attrib.evaluation", "neon_attrib.pipeline", "neon_attrib.vision.preprocessing",
           "neon_attrib._backend", "neon_attrib.functional", "neon_attrib.graph", "neon_attrib.canonical"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    import numpy as np
    import torch

    import neon_attrib

    globs = {"np": np, "torch": torch, **{k: getattr(neon_attrib, k) for k in neon_attrib.__all__}}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
