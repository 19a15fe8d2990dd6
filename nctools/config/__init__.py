"""Run configuration: the dataclass schema (`schema`), validated once where it is loaded,
and the YAML-to-dataclass machinery with ``--set`` overrides (`typed_yaml`).

The bottom of the stack: it imports nothing else of nctools but `nctools.errors`.
"""
