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
