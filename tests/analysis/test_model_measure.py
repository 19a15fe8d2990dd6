"""measure_model: each layer's metrics equal nctools.measure on features taken by the
test's own hooks (torchvision and timm networks, randomly initialised), streaming."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nctools
from nctools.metrics.measure import CLASSIFIER_FREE_KEYS, METRIC_KEYS


def batches(num_classes=4, per_class=6, batch=5, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=gen)]
    centres = torch.randn(num_classes, 3, 1, 1, generator=gen)
    images = centres[labels] + 0.5 * torch.randn(len(labels), 3, size, size, generator=gen)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)]


def own_features(model, data, layer, use_input=False, pool="avg"):
    """The test's own hook: (N, D) of ``layer``'s output (or input), pooled as docs/metrics.md."""
    module = dict(model.named_modules())[layer]
    got = []

    def hook(_m, inputs, output):
        x = (inputs[0] if use_input else output).detach()
        if pool == "avg" and x.ndim == 4:
            x = x.mean(dim=(2, 3))
        got.append(x.reshape(x.shape[0], -1).double())

    handle = module.register_forward_hook(hook)
    model.eval()
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    return torch.cat(got), torch.cat([y for _, y in data])


def check_layers(model, data, layers, cls_name, pool="avg"):
    model.train()
    result = nctools.measure_model(model, data, layers=layers, pool=pool)
    assert model.training  # mode restored
    assert list(result) == list(layers)
    lin = dict(model.named_modules())[cls_name]
    for layer in layers:
        feats, labels = own_features(model, data, layer, layer == cls_name, pool)
        if layer == cls_name:
            expected = nctools.measure(feats, labels, lin.weight.detach(), lin.bias.detach())
        else:  # classifier-free
            expected = nctools.measure(feats, labels, None, num_classes=lin.out_features)
        keys = list(expected)
        assert set(keys) >= set(METRIC_KEYS if layer == cls_name else CLASSIFIER_FREE_KEYS)
        assert set(result[layer]) == set(keys)
        for key in keys:
            assert math.isclose(result[layer][key], expected[key], rel_tol=1e-7, abs_tol=1e-10), (
                layer, key, result[layer][key], expected[key])


def test_torchvision_resnet18_layers():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    check_layers(model, batches(), ["layer1", "layer3", "layer4", "fc"], "fc")


def test_timm_model_layers_and_flatten():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    check_layers(model, batches(size=32), ["layer2", "layer4", "fc"], "fc")
    check_layers(model, batches(size=32), ["layer4"], "fc", pool="flatten")


def test_blocks_default_and_bad_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))
    data = batches()
    result = nctools.measure_model(model, data, layers="blocks")
    assert list(result) == ["0", "3"]  # parameter-free children skipped; classifier last
    default = nctools.measure_model(model, data)
    assert default["3"] == result["3"]
    with pytest.raises(ValueError, match="no module named 'nope'"):
        nctools.measure_model(model, data, layers=["nope"])
    with pytest.raises(ValueError, match="pool"):
        nctools.measure_model(model, data, pool="max")


PEAK_SCRIPT = """
import resource, torch
import nctools
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))

class Stream:  # batches made on demand, the same on each pass, never all in memory
    def __init__(self, n):
        self.n = n
    def __iter__(self):
        gen = torch.Generator().manual_seed(1)
        for start in range(0, self.n, 1000):
            y = torch.arange(start, start + 1000) % 4
            yield y[:, None, None, None] + torch.randn(1000, 3, 8, 8, generator=gen), y

for n in (2_000, 40_000):
    # layer "0" flattened: 8 x 8 x 8 = 512 values a sample, 78 MiB at n = 40,000 if kept
    result = nctools.measure_model(net, Stream(n), layers=["0", "4"], pool="flatten")
    assert result["4"]["nc1"] > 0
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # peak so far, MiB
"""


def test_peak_memory_does_not_grow_with_n():
    """Two streaming passes over 2,000 then 40,000 samples: the peak RSS stays put."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    small, large = (float(v) for v in out.stdout.split())
    # holding the 40,000 flattened activations alone would add 78 MiB
    assert large - small < 16, (small, large)


class Shrinking:
    """A loader whose second pass yields only its first batch (a sampler that changed, a
    stream that ran dry): the two passes would read different samples."""

    def __init__(self, data):
        self.data, self.passes = data, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.data if self.passes == 1 else self.data[:1])


def test_a_loader_with_fewer_rows_on_its_second_pass_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4))
    data = batches()
    with pytest.raises(ValueError, match=r"^data yielded 24 rows on the first pass and 5 on "
                                         r"the second: it must return the same rows"):
        nctools.measure_model(net, Shrinking(data), layers=["0", "4"])


class ShuffledDropLast:
    """A shuffled DataLoader with drop_last=True, as a two-pass source: each pass keeps
    16 of the 24 samples, a different 16 (as many rows, other labels)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        self.inputs, self.labels, self.calls = inputs, labels, 0

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(
            self.calls))[:16]
        self.calls += 1
        yield self.inputs[order[:8]], self.labels[order[:8]]
        yield self.inputs[order[8:]], self.labels[order[8:]]


def test_a_loader_with_other_samples_on_its_second_pass_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4))
    inputs, labels = torch.randn(24, 3, 6, 6), torch.arange(24) % 4
    data = ShuffledDropLast(inputs, labels)
    first = torch.bincount(labels[torch.randperm(24, generator=torch.Generator()
                                                 .manual_seed(0))[:16]], minlength=4)
    second = torch.bincount(labels[torch.randperm(24, generator=torch.Generator()
                                                  .manual_seed(1))[:16]], minlength=4)
    k = int(torch.nonzero(first != second)[0])
    with pytest.raises(ValueError, match=rf"^data yielded other samples on its second pass: "
                                         rf"class {k} had {int(first[k])} on the first and "
                                         rf"{int(second[k])} on the second"):
        nctools.measure_model(net, data, layers=["4"])


def test_chunks_with_swapped_labels_on_the_second_pass_are_refused_naming_the_class():
    """measure_chunks with a top_k filter: the class named is the label, not its index
    among the classes kept."""
    from nctools.metrics.measure import measure_chunks

    torch.manual_seed(0)
    labels = torch.tensor([0] * 2 + [1] * 6 + [2] * 4 + [3] * 8)
    features = torch.randn(20, 5) + 3 * torch.eye(4, 5)[labels]
    calls = []

    def stream():
        calls.append(1)
        again = labels.clone()
        if len(calls) == 2:
            again[2], again[8] = 2, 1  # one sample of class 1 becomes class 2, one 2 a 1
            again[3] = 3  # and one of class 1 a 3: class 1 has 5 on the second pass
        yield features, again

    with pytest.raises(ValueError, match=r"^chunks yielded other samples on its second pass: "
                                         r"class 1 had 6 on the first and 5 on the second"):
        measure_chunks(stream, num_classes=4, top_k=3)


def test_a_float64_network_is_measured_in_its_own_precision():
    """Features 1e6 from the origin with a within-class spread of 1e-3: float32 keeps
    steps of 0.06 there, so a cast would leave no spread to measure."""
    torch.manual_seed(1)
    num_classes, dim = 3, 5
    labels = torch.arange(num_classes).repeat(20)
    centres = torch.randn(num_classes, dim, dtype=torch.float64)
    inputs = 1e6 + centres[labels] + 1e-3 * torch.randn(60, dim, dtype=torch.float64)
    net = nn.Sequential(nn.Identity(), nn.Linear(dim, num_classes)).double()
    data = [(inputs[i : i + 16], labels[i : i + 16]) for i in range(0, 60, 16)]
    got = nctools.measure_model(net, data, layers=["1"])["1"]
    want = nctools.measure(inputs, labels, net[1].weight.detach(), net[1].bias.detach())
    for key in ("nc1", "nc1_ratio", "cdnv", "etf_means", "accuracy", "ncc_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


# ------------------------------------------------------------- batches and model zoo shapes
def tiny_vit(num_labels=3):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                       num_labels=num_labels)
    return ViTForImageClassification(config).eval()


def vit_batches():
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(24) % 3
    images = labels[:, None, None, None] + torch.randn(24, 3, 8, 8, generator=gen)
    return [(images[i : i + 8], labels[i : i + 8]) for i in range(0, 24, 8)]


def test_dict_batches_and_longer_tuples_are_measured_as_pairs():
    model = tiny_vit()
    pairs = vit_batches()
    expected = nctools.measure_model(model, pairs, layers=["vit", "classifier"])
    for key in ("labels", "label", "y"):
        as_dicts = [{"pixel_values": x, key: y} for x, y in pairs]
        assert nctools.measure_model(model, as_dicts, layers=["vit", "classifier"]) == expected
    triples = [(x, y, torch.arange(len(y))) for x, y in pairs]
    assert nctools.measure_model(model, triples, layers=["vit", "classifier"]) == expected
    with pytest.raises(ValueError, match=r"a dict batch needs a labels key \(labels, label, y\); "
                                         r"got keys \['pixel_values'\]"):
        nctools.measure_model(model, [{"pixel_values": x} for x, _ in pairs])


def test_a_one_shot_generator_is_refused_with_the_reason():
    model = tiny_vit()
    with pytest.raises(ValueError) as err:
        nctools.measure_model(model, (batch for batch in vit_batches()))
    assert str(err.value) == ("data must be re-iterable (it is read twice): pass a DataLoader "
                              "or a list")


def test_layers_returning_model_outputs_are_measured_on_their_hidden_states():
    model, data = tiny_vit(), vit_batches()
    labels = torch.cat([y for _, y in data])
    with torch.no_grad():
        hidden = torch.cat([model.vit(x).last_hidden_state for x, _ in data])  # float32
    result = nctools.measure_model(model, data, layers="blocks")
    assert list(result) == ["vit", "classifier"]
    # the head reads the CLS token: the default pools the sequence so (the same rows the
    # classifier receives, hence the same NC1)
    cls = nctools.measure(hidden[:, 0].double(), labels, num_classes=3)
    assert result["vit"]["nc1"] == pytest.approx(cls["nc1"], rel=1e-9)
    assert result["classifier"]["nc1"] == pytest.approx(cls["nc1"], rel=1e-9)
    avg = nctools.measure(hidden.mean(1).double(), labels, num_classes=3)
    got = nctools.measure_model(model, data, layers=["vit"], pool="avg")
    assert got["vit"]["nc1"] == pytest.approx(avg["nc1"], rel=1e-9)
    flat = nctools.measure(hidden.flatten(1).double(), labels, num_classes=3)
    got = nctools.measure_model(model, data, layers=["vit"], pool="flatten")
    assert got["vit"]["nc1"] == pytest.approx(flat["nc1"], rel=1e-9)

    class Body(nn.Module):  # an inner layer returning a dict (or a tuple), as backbones do
        def __init__(self, as_tuple: bool):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.as_tuple = as_tuple

        def forward(self, x):
            maps = self.conv(x)
            return (maps, 1) if self.as_tuple else {"maps": maps, "extra": 1}

    class Net(nn.Module):
        def __init__(self, as_tuple: bool):
            super().__init__()
            self.body = Body(as_tuple)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            out = self.body(x)
            return self.head((out[0] if isinstance(out, tuple) else out["maps"]).mean((2, 3)))

    for as_tuple in (False, True):
        torch.manual_seed(0)
        net = Net(as_tuple)
        got = nctools.measure_model(net, data, layers=["body", "head"])
        maps = own_features(net.body.conv, data, "")[0]  # the conv's maps, averaged
        want = nctools.measure(maps, labels, num_classes=3)["nc1"]
        assert got["body"]["nc1"] == pytest.approx(want, rel=1e-9)
        assert got["head"]["nc1"] == pytest.approx(want, rel=1e-9)  # the head reads them


def test_the_default_pool_follows_the_head():
    import timm
    from transformers import BertConfig, BertForSequenceClassification

    from nctools.models.features import reads_cls_token

    bert = BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=3))
    vit_cls = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                num_classes=3)
    vit_avg = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                num_classes=3, global_pool="avg")
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert [reads_cls_token(m) for m in (tiny_vit(), bert, vit_cls, vit_avg, resnet)] == [
        True, True, True, False, False]


def test_timm_blocks_are_its_feature_info_stages():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    result = nctools.measure_model(model, batches(), layers="blocks")
    assert list(result) == ["act1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_as_frame_is_the_same_numbers_in_a_tidy_table():
    model, data = tiny_vit(), vit_batches()
    nested = nctools.measure_model(model, data, layers="blocks")
    frame = nctools.measure_model(model, data, layers="blocks", as_frame=True)
    assert list(frame.columns) == ["layer", "kind", "at", "metric", "value"]
    rows = {(r.layer, r.metric): r.value for r in frame.itertuples()}
    assert rows == {(layer, k): v for layer, values in nested.items() for k, v in values.items()}
    kinds = frame.drop_duplicates("layer").set_index("layer")[["kind", "at"]]
    assert kinds.to_dict("index") == {"vit": {"kind": "ViTModel", "at": "output"},
                                      "classifier": {"kind": "Linear", "at": "input"}}
