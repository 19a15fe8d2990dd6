"""The one version of nctools, at the bottom of the package: every layer may import it
(run manifests, snapshot meta, checkpoints, ``nctools --version``) and it imports nothing."""

__version__ = "0.2.0"
# The distribution that installs nctools (pip install nctools-collapse): `nctools` on the
# package index is an unrelated netCDF project, and `neural-collapse` normalises to the
# peer library's own `neural_collapse`. pyproject.toml's [project] name says the same.
DISTRIBUTION = "nctools-collapse"
