"""A network's own evaluation transform: how its inputs were prepared when it was trained.

Usage::

    transform = eval_transform(model, "timm:resnet18")   # PIL image -> (3, H, W) tensor
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from nctools.models.registry import zoo_of


def eval_transform(model: nn.Module, spec: str) -> Callable:
    """The network's own evaluation transform: an image -> its (3, H, W) float input.

    The image is a PIL image (an image folder) or a (C, H, W) float tensor of pixels in
    [0, 1] (an in-memory data set; torchvision's tensor kernels resize it).

    - timm: ``create_transform(**resolve_data_config({}, model=model))`` (its resize,
      centre crop and mean/std; timm's ``MaybeToTensor`` passes tensors through);
    - torchvision: the architecture's default weights' ``transforms()`` (looked up by
      name, nothing downloaded; they take tensors);
    - Hugging Face: the folder's image processor (tensors already in [0, 1]: no rescale);
    - otherwise (a user's network, a torchvision name without weights, an HF folder
      without a processor): :func:`imagenet_eval_transform`, cropped to the HF config's
      ``image_size`` where it names one (a ViT's position embeddings fix its input size).
    """
    zoo, name = zoo_of(spec), spec.partition(":")[2]
    if zoo == "timm":
        import timm.data

        return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    if zoo == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model_weights(name).DEFAULT.transforms()
        except (ValueError, KeyError, AttributeError):
            return imagenet_eval_transform()
    if zoo == "hf":
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError):
            size = getattr(getattr(model, "config", None), "image_size", 224)
            return imagenet_eval_transform(size if isinstance(size, int) else 224)

        def hf_transform(image):
            # in-memory pixels are floats in [0, 1] already: the processor must not rescale
            extra = {"do_rescale": False} if isinstance(image, Tensor) else {}
            return processor(images=image, return_tensors="pt", **extra)["pixel_values"][0]

        return hf_transform
    return imagenet_eval_transform()


def imagenet_eval_transform(size: int = 224) -> Callable:
    """ImageNet's evaluation transform: resize 256, centre crop 224, ImageNet mean/std
    (for another crop ``size``, the same 256/224 ratio).

    PIL images are resized by PIL, tensors by torchvision's tensor kernels (antialiased).
    """
    from torchvision.transforms import v2

    from nctools.data.torchvision_sets import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose([
        v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ])  # fmt: skip
