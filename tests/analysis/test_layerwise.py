"""Layer-wise collapse in training: snapshot.layers -> metrics.csv rows per layer -> figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import nctools
from nctools.analysis.layer_plots import separation_fit
from nctools.analysis.tables import TABLE_METRICS
from nctools.cli import main
from nctools.config.schema import load_config
from nctools.data.sets import load_dataset
from nctools.metrics.measure import CLASSIFIER_FREE_KEYS, METRIC_KEYS, measure
from nctools.models.networks import build_model
from nctools.runs import snapshots
from tests.helpers import tiny_config

BLOCKS = ["body.3", "body.7"]  # ConvNet's blocks but the last (= the features)


@pytest.fixture(scope="module")
def layered_run(tmp_path_factory):
    cfg = tiny_config(snapshots=[1, 3])
    cfg.snapshot.layers = "blocks"
    run = tmp_path_factory.mktemp("layers") / "run"
    nctools.train(cfg, run)
    return run


def test_snapshot_stores_each_layer_checksummed(layered_run):
    meta = snapshots.read_meta(layered_run, 3)
    assert snapshots.snapshot_layers(meta) == BLOCKS
    assert meta["layers"] == {"body.3": 8, "body.7": 16}
    snapshots.verify_snapshot(layered_run, 3)  # the layers live in the checksummed files
    _, labels = snapshots.load_split(layered_run, 3, "train")
    inner, inner_labels = snapshots.load_split(layered_run, 3, "train", layer="body.7")
    assert torch.equal(labels, inner_labels)
    # the same numbers as the test's own hook on the trained network (epoch 3 = the last)
    cfg = load_config(layered_run / "config.yaml")
    model = build_model(cfg.model, 3, 1, 8)
    model.load_state_dict(torch.load(layered_run / "checkpoint.pt", weights_only=True)["model"])
    data = load_dataset(cfg.data, cfg.seed)
    got = []
    model.body[7].register_forward_hook(lambda m, i, o: got.append(o.mean(dim=(2, 3))))
    with torch.no_grad():
        model.eval()(data.train.images)
    torch.testing.assert_close(inner, got[0], rtol=1e-5, atol=1e-6)
    chunks = list(snapshots.iter_split(layered_run, 3, "train", chunk_rows=5, layer="body.3"))
    whole, _ = snapshots.load_split(layered_run, 3, "train", layer="body.3")
    assert torch.equal(torch.cat([c for c, _ in chunks]), whole) and whole.shape == (48, 8)


def test_analyze_writes_every_layer(layered_run):
    table = nctools.analyze(layered_run)
    assert list(pd.unique(table["layer"])) == [*BLOCKS, "features"]
    for epoch in (1, 3):
        for split in ("train", "test"):
            rows = table[(table["epoch"] == epoch) & (table["split"] == split)]
            for layer in BLOCKS:
                got = rows[rows["layer"] == layer].set_index("metric")["value"]
                # in the table's metric order
                assert list(got.index) == [k for k in TABLE_METRICS if k in CLASSIFIER_FREE_KEYS]
            penultimate = list(rows[rows["layer"] == "features"]["metric"])
            assert penultimate[: len(METRIC_KEYS)] == list(METRIC_KEYS)
    # each layer's numbers are nctools.measure on the stored features (train split)
    feats, labels = snapshots.load_split(layered_run, 3, "train", layer="body.7")
    expected = measure(feats, labels, None, num_classes=3)
    rows = table[(table["epoch"] == 3) & (table["split"] == "train") & (table["layer"] == "body.7")]
    for key, value in rows.set_index("metric")["value"].items():
        assert value == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    # test split: NCC centres are the training class means (docs/metrics.md, "On other data")
    test_feats, test_labels = snapshots.load_split(layered_run, 3, "test", layer="body.7")
    means = torch.stack([feats[labels == c].double().mean(0) for c in range(3)])
    nearest = torch.cdist(test_feats.double(), means).argmin(1)
    rows = table[(table["epoch"] == 3) & (table["split"] == "test") & (table["layer"] == "body.7")]
    got = rows.set_index("metric")["value"]["ncc_accuracy"]
    assert got == pytest.approx(float((nearest == test_labels).double().mean()), abs=1e-12)


def test_plot_by_layer_draws_the_figure(layered_run, capsys):
    nctools.analyze(layered_run)
    out = layered_run / "figures" / "depth.png"
    assert main(["plot", str(layered_run), "--by", "layer", "--epochs", "1,3",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert main(["plot", str(layered_run), "--by", "layer", "--epochs", "2"]) == 2
    assert "no snapshot at epoch 2" in capsys.readouterr().err
    # the ordinary collapse figure still draws the penultimate rows only
    assert main(["plot", str(layered_run)]) == 0


def test_separation_fit_recovers_a_geometric_decay():
    depth = np.arange(1.0, 6.0)
    _, intercept, ratio = separation_fit(depth, 7.0 * 0.5**depth)
    assert ratio == pytest.approx(0.5, rel=1e-12)
    assert intercept == pytest.approx(np.log(7.0), rel=1e-12)


def test_bad_layer_name_fails_before_training(tmp_path):
    cfg = tiny_config()
    cfg.snapshot.layers = ["nope"]
    with pytest.raises(nctools.errors.ConfigError, match=r"snapshot\.layers: no module named"):
        nctools.train(cfg, tmp_path / "run")
