"""nctools.measure and measure_chunks under torch.distributed: no collective call unless
a process group is given (as torchmetrics' functional API never communicates)."""

from __future__ import annotations

import datetime
import json

import torch

from nctools.metrics.measure import measure, measure_chunks
from tests.helpers import clusters, run_ranks


def _data():
    h, y, w, b = clusters(4, 10, 30, seed=11)
    return tuple(torch.from_numpy(a) for a in (h, y, w, b))


def _only_rank0_measures(rank: int, out: str) -> None:
    # a collective with no partner fails after this timeout instead of hanging the test
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    try:
        if rank == 0:
            h, y, w, b = _data()
            alone = measure(h, y, w, b)
            chunked, _ = measure_chunks(lambda: [(h[:50], y[:50]), (h[50:], y[50:])], w, b)
            with open(out, "w") as handle:
                json.dump({"measure": alone, "chunks": chunked}, handle)
    finally:
        torch.distributed.destroy_process_group()


def test_measure_in_a_process_group_does_not_communicate_unless_asked(tmp_path):
    out = tmp_path / "rank0.json"
    run_ranks(_only_rank0_measures, str(out))
    got = json.loads(out.read_text())
    h, y, w, b = _data()
    want = measure(h, y, w, b)
    assert got["measure"] == want
    assert got["chunks"].keys() == want.keys()
    for key, value in want.items():
        assert abs(got["chunks"][key] - value) <= 1e-12 * abs(value) + 1e-15, key
