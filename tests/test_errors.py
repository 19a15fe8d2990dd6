"""`missing_extra`: which failed imports name an extra to install, through raise ... from."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from nctools.errors import EXTRAS, missing_extra


def test_a_submodule_of_an_optional_library_names_its_extra():
    exc = ModuleNotFoundError("No module named 'timm.data'", name="timm.data")
    assert missing_extra(exc) == 'timm is not installed: pip install "nctools-collapse[timm]"'


def test_the_cause_of_a_library_s_own_import_error_is_followed():
    # pandas raises its own ImportError from the failed `import pyarrow`
    try:
        try:
            raise ModuleNotFoundError("import of pyarrow halted", name="pyarrow")
        except ImportError as inner:
            raise ImportError("pyarrow is required for parquet support") from inner
    except ImportError as outer:
        assert missing_extra(outer) == ('pyarrow is not installed: pip install '
                                        '"nctools-collapse[parquet]"')


@pytest.mark.parametrize("exc", [ModuleNotFoundError("no yaml", name="yaml"),
                                 ImportError("cannot import name 'x'"), ValueError("timm")])
def test_anything_else_is_not_a_missing_extra(exc):
    assert missing_extra(exc) is None


def test_every_extra_named_is_one_of_the_distribution():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras)
    for module, extra in EXTRAS.items():  # the module is a requirement of its extra
        # (accelerate comes with transformers[torch], the Trainer's requirement)
        assert any(r.startswith(module) for r in extras[extra]) or \
            (module, extra) == ("accelerate", "hf"), (module, extra)


def test_the_distribution_name_is_pyprojects_and_not_the_peer_librarys():
    """One name: pyproject's [project] name, the install hints' and the extras' self-references;
    never `neural_collapse` (the peer library) nor `nctools` (a netCDF project) once
    normalised as pip does (PEP 503)."""
    import re

    from nctools._version import DISTRIBUTION

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]
    assert project["name"] == DISTRIBUTION
    assert project["optional-dependencies"]["all"][0].startswith(f"{DISTRIBUTION}[")
    assert f"{DISTRIBUTION}[all]" in project["optional-dependencies"]["dev"]
    normal = re.sub(r"[-_.]+", "-", DISTRIBUTION).lower()
    assert normal not in {"neural-collapse", "nctools"}
