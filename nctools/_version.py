"""The one version of nctools, at the bottom of the package: every layer may import it
(run manifests, snapshot meta, checkpoints, ``nctools --version``) and it imports nothing."""

__version__ = "0.2.0"
