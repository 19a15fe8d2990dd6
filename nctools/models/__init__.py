"""Networks: one path from a name to a network (`registry`), nctools' convnet and builder
(`networks`), the torchvision-based ResNet, VGG and DenseNet (`torchvision_nets`), weights
files into a network (`weights`), a network's own evaluation transform (`transforms`), and
the one feature extractor (`features`)."""
