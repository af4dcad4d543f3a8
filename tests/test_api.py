"""The public names: everything in ``neon_attrib.__all__`` resolves, and the heavy submodules load lazily."""

from __future__ import annotations

import subprocess
import sys

import neon_attrib


def test_every_public_name_resolves_to_its_submodule_object():
    import importlib

    for name in neon_attrib.__all__:
        value = getattr(neon_attrib, name)
        if name in neon_attrib._LAZY:
            module = importlib.import_module(f"neon_attrib.{neon_attrib._LAZY[name]}")
            assert value is getattr(module, name)
    assert set(neon_attrib._LAZY) <= set(dir(neon_attrib))


def test_unknown_attribute_is_an_attribute_error():
    try:
        neon_attrib.NoSuchThing  # noqa: B018
    except AttributeError as error:
        assert "NoSuchThing" in str(error)
    else:
        raise AssertionError("neon_attrib.NoSuchThing did not raise")


def test_import_does_not_load_captum_or_the_cnn_modules():
    code = ("import sys, neon_attrib; "
            "print(sorted(m for m in ('captum', 'neon_attrib.vision.deep', 'neon_attrib.integrations.captum', "
            "'neon_attrib.dec') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
