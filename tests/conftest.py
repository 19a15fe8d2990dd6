"""Settings shared by every test file.

The tests use tiny tensors, where intra-op threads cost more than they save (and on a
busy 2-core machine they fight each other): one thread per process, inherited by the
subprocesses the CLI and distributed tests start. MPLBACKEND keeps matplotlib off any display.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # after the thread settings, which torch reads at import

torch.set_num_threads(1)


import pytest  # noqa: E402

from nctools import native  # noqa: E402


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Run a test through measure's C kernels and through its torch route."""
    if request.param == "torch":
        monkeypatch.setenv(native.SWITCH, "0")
    elif not native.available():
        pytest.skip("no C compiler here: the kernels cannot be built")
    return request.param
