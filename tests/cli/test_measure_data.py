"""`nctools measure --ood-dataset` (nc5) and named sets through a network's own transform."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from nctools.cli import main
from nctools.config.schema import DataConfig, ModelConfig
from nctools.data.sets import load_dataset
from nctools.metrics.measure import METRIC_KEYS, measure
from nctools.models.networks import build_model
from tests.helpers import hooked, make_net, measure_json

SYN = ["--set", "data.image_size=8", "--set", "data.num_classes=3", "--set",
       "data.train_per_class=6", "--set", "data.test_per_class=3"]


def synthetic(seed: int, **keys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw (unstandardised) synthetic train images, train labels and test images."""
    cfg = DataConfig(dataset="synthetic", image_size=8, num_classes=3, train_per_class=6,
                     test_per_class=3, **keys)
    data = load_dataset(cfg, seed=seed, standardise=False)
    return data.train.images, data.train.labels, data.test.images


def standardise(images, like):
    """Per-channel standardisation with the mean and std of ``like`` (N, C, H, W), in
    float32 as the pixels are (the features then match to the last bit)."""
    var, mean = torch.var_mean(like, dim=(0, 2, 3), correction=0)
    return (images - mean[:, None, None]) / var.sqrt()[:, None, None]


def input_of(net, layer, images):
    """The input of ``layer`` over ``images`` (the test's own hook), float64."""
    return hooked(net, images, layer, use_input=True)


def close(got, expected, keys):
    for key in keys:
        assert got[key] == pytest.approx(expected[key], rel=1e-10, abs=1e-12), key


# ------------------------------------------------------------------------- nc5


def test_ood_dataset_user_network_nc5(capsys):
    """--model with nctools' standardisation: the OOD set (synthetic, seed 1) is
    standardised with the in-distribution training mean and std."""
    train, labels, _ = synthetic(0)
    _, _, ood = synthetic(1)  # the OOD set is drawn from seed + 1
    net = make_net(num_classes=3, in_channels=1)
    got = measure_json(capsys, "--model", "tests.helpers:make_net", "--dataset", "synthetic", *SYN,
                       "--ood-dataset", "synthetic", "--layers", "block2,head")
    feats = input_of(net, net.head, standardise(train, train))
    ood_feats = input_of(net, net.head, standardise(ood, train))
    expected = measure(feats, labels, net.head.weight.detach(), net.head.bias.detach(),
                       ood_features=ood_feats)
    assert 0 < expected["nc5"] < 1
    close(got["head"], expected, [*METRIC_KEYS, "nc5"])
    assert "nc5" not in got["block2"]  # defined at the classifier's input only


def test_ood_dataset_arch_checkpoint_mnist5k(capsys, tmp_path):
    """--arch with a checkpoint on mnist5k (a subset), OOD synthetic digits-sized images."""
    torch.manual_seed(3)
    net = build_model(ModelConfig(arch="convnet", width=4), 10, 1, 28).eval()
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    got = measure_json(capsys, "--arch", "convnet", "--checkpoint", str(path), "--dataset",
                       "mnist5k", "--set", "model.width=4", "--set", "data.samples_per_class=5",
                       "--ood-dataset", "synthetic", "--set", "data.image_size=28")
    data = load_dataset(DataConfig(dataset="mnist5k", samples_per_class=5), seed=0,
                        standardise=False)
    ood = load_dataset(DataConfig(dataset="synthetic", image_size=28), seed=1,
                       standardise=False).test.images
    train = data.train.images
    feats = input_of(net, net.classifier, standardise(train, train))
    ood_feats = input_of(net, net.classifier, standardise(ood, train))
    expected = measure(feats, data.train.labels, net.classifier.weight.detach(),
                       net.classifier.bias.detach(), ood_features=ood_feats)
    assert list(got)[-2:] == ["nc5", "nc5_uncentred"]
    close(got, expected, [*METRIC_KEYS, "nc5"])


def test_ood_dataset_bad_inputs(capsys, tmp_path):
    base = ["measure", "--model", "tests.helpers:make_net", "--dataset", "synthetic", *SYN]
    assert main([*base, "--ood-dataset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nctools: error: --ood-dataset: unknown data set 'nope'; valid names: ")
    assert err.count("\n") == 1
    assert main([*base, "--ood-dataset", f"folder:{tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith(
        f"nctools: error: --ood-dataset folder:{tmp_path}: no class folders of images")
    # mnist5k's 28 px digits do not fit a network measured on 8 px images
    assert main([*base, "--ood-dataset", "mnist5k"]) == 2
    err = capsys.readouterr().err
    assert err == ("nctools: error: --ood-dataset mnist5k: images of 1 channel(s), 28 px, but "
                   "the network takes synthetic's 1 channel(s), 8 px\n")
    digits = ["measure", "--model", "tests.helpers:make_net", "--dataset", "mnist5k", "--set",
              "data.samples_per_class=2", "--ood-dataset", "synthetic", "--set",
              "data.image_size=28", "--set", "data.channels=3"]
    assert main(digits) == 2
    assert capsys.readouterr().err == (
        "nctools: error: --ood-dataset synthetic: images of 3 channel(s), 28 px, but the "
        "network takes mnist5k's 1 channel(s), 28 px\n")


# --------------------------------------------------- the network's own transform


def test_timm_named_set_through_its_own_transform(capsys, tmp_path, caplog):
    """synthetic through timm's test_resnet evaluation transform (160 px, bilinear, mean
    and std 0.5): the CLI's numbers equal this test's own resize, crop and normalise."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    cfg = net.pretrained_cfg
    assert (cfg["input_size"], cfg["mean"], cfg["std"]) == ((3, 160, 160), (0.5,) * 3, (0.5,) * 3)
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bilinear", 0.95)
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    with caplog.at_level("INFO"):
        got = measure_json(capsys, "--model", "timm:test_resnet", "--weights", str(path),
                           "--dataset", "synthetic", *SYN, "--ood-dataset", "synthetic")["fc"]
    assert "1-channel images repeated to 3 channels" in caplog.text

    def pipeline(images):  # 1 -> 3 channels, shorter side 160 / 0.95 -> 168, crop 160
        x = images.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(168, 168), mode="bilinear", align_corners=False,
                          antialias=True)
        return (x[:, :, 4:164, 4:164] - 0.5) / 0.5

    train, labels, _ = synthetic(0)
    _, _, ood = synthetic(1)
    feats = input_of(net, net.fc, pipeline(train))
    expected = measure(feats, labels, net.fc.weight.detach(), net.fc.bias.detach(),
                       ood_features=input_of(net, net.fc, pipeline(ood)))
    close(got, expected, [*METRIC_KEYS, "nc5"])

    # --set data.preprocess=nctools: the standardised 8 px images, a 1-channel network
    torch.manual_seed(1)
    gray = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1).eval()
    torch.save(gray.state_dict(), path)
    got = measure_json(capsys, "--model", "timm:test_resnet", "--weights", str(path),
                       "--dataset", "synthetic", *SYN, "--set", "data.preprocess=nctools")["fc"]
    expected = measure(input_of(gray, gray.fc, standardise(train, train)), labels,
                       gray.fc.weight.detach(), gray.fc.bias.detach())
    close(got, expected, METRIC_KEYS)
    assert main(["measure", "--model", "timm:test_resnet", "--dataset", "synthetic",
                 "--set", "data.preprocess=pil"]) == 2
    assert "data.preprocess must be one of model, nctools" in capsys.readouterr().err



def test_torchvision_named_set_through_its_weights_transforms(capsys, tmp_path):
    """synthetic through the transforms of torchvision's default MobileNetV3-Small weights
    (looked up by name, nothing downloaded: resize 256 with antialiasing, centre crop 224,
    ImageNet mean and std), on randomly initialised weights given with --weights: the
    CLI's numbers equal this test's own pipeline and hooks."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    got = measure_json(capsys, "--model", "torchvision:mobilenet_v3_small", "--weights",
                       str(path), "--dataset", "synthetic", *SYN)
    head = net.classifier[3]  # the last nn.Linear: the classifier W, b

    def pipeline(images):  # 1 -> 3 channels, 8 -> 256 px, centre 224, ImageNet mean/std
        x = images.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False,
                          antialias=True)[:, :, 16:240, 16:240]
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        return (x - mean) / std

    train, labels, _ = synthetic(0)
    expected = measure(input_of(net, head, pipeline(train)), labels, head.weight.detach(),
                       head.bias.detach())
    (layer,) = got
    close(got[layer], expected, METRIC_KEYS)

def test_hf_folder_image_processor(capsys, tmp_path):
    """A local Hugging Face folder with its image processor (16 px, mean and std 0.5): the
    16 px synthetic images are only repeated to 3 channels and normalised."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=8, num_labels=3)
    net = ViTForImageClassification(config).eval()
    net.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(tmp_path)
    keys = [*SYN[2:], "--set", "data.image_size=16"]
    got = measure_json(capsys, "--model", f"hf:{tmp_path}", "--dataset", "synthetic", *keys,
                       "--ood-dataset", "synthetic")["classifier"]
    cfg = DataConfig(dataset="synthetic", image_size=16, num_classes=3, train_per_class=6,
                     test_per_class=3)
    data = load_dataset(cfg, seed=0, standardise=False)
    ood = load_dataset(cfg, seed=1, standardise=False).test.images

    def pipeline(images):
        return (images.expand(-1, 3, -1, -1) - 0.5) / 0.5

    feats = input_of(net, net.classifier, pipeline(data.train.images))
    expected = measure(feats, data.train.labels, net.classifier.weight.detach(),
                       net.classifier.bias.detach(),
                       ood_features=input_of(net, net.classifier, pipeline(ood)))
    close(got, expected, [*METRIC_KEYS, "nc5"])


def test_measure_model_ood_batches():
    """measure_model(ood=...): nc5 at the classifier's input equals measure(ood_features=)
    whatever the batching; a classifier-free layer alone gets a warning and no nc5."""
    from nctools import measure_model

    net = make_net(num_classes=3, in_channels=1)
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(3).repeat_interleave(5)
    images = labels[:, None, None, None] + torch.randn(15, 1, 6, 6, generator=gen)
    ood = 2 + torch.randn(7, 1, 6, 6, generator=gen)
    data = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    got = measure_model(net, data, ood=[(ood[:3], torch.zeros(3)), (ood[3:], torch.zeros(4))])
    expected = measure(input_of(net, net.head, images), labels, net.head.weight.detach(),
                       net.head.bias.detach(), ood_features=input_of(net, net.head, ood))
    close(got["head"], expected, [*METRIC_KEYS, "nc5"])
    with pytest.warns(UserWarning, match="nc5 is measured at the classifier's input only"):
        inner = measure_model(net, data, layers=["block1"], ood=[(ood, None)])
    assert "nc5" not in inner["block1"]
