"""The examples in the docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

from neon_attrib.core.registry import registered_models


def _has_examples(name: str) -> bool:
    return any(test.examples for test in doctest.DocTestFinder().find(importlib.import_module(name)))


_LISTED = ["neon_attrib.core.layers", "neon_attrib.core.rules", "neon_attrib.core.composites",
           "neon_attrib.core.registry", "neon_attrib.pipeline.attribution", "neon_attrib.datasets",
           "neon_attrib.vision.deep", "neon_attrib.viz", "neon_attrib.vision.fast", "neon_attrib.integrations.captum",
           "neon_attrib.evaluation._captum_lrp", "neon_attrib.evaluation.curves", "neon_attrib.pipeline.engine",
           "neon_attrib.vision.preprocessing", "neon_attrib.pipeline.precision", "neon_attrib.core.functional",
           "neon_attrib.pipeline.graph", "neon_attrib.core.canonical", "neon_attrib.models.neuralize"]
#: the listed modules, and every module that defines a registered model and has examples
_MODEL_MODULES = {entry.model.__module__ for entry in registered_models()
                  if entry.model.__module__.startswith("neon_attrib.")}
MODULES = _LISTED + sorted(name for name in _MODEL_MODULES - set(_LISTED) if _has_examples(name))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    import numpy as np
    import torch

    import neon_attrib

    globs = {"np": np, "torch": torch, **{k: getattr(neon_attrib, k) for k in neon_attrib.__all__}}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
