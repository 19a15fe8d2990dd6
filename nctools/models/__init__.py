"""Networks: the nctools convnet and builder (`networks`), the torchvision-based ResNet,
VGG and DenseNet (`torchvision_nets`), and the one feature extractor (`features`)."""
