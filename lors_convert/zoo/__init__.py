"""Small reference architectures for tests, examples and ``--arch`` references.

``lors_convert.zoo.resnet`` mirrors torchvision's ResNet/ResNeXt (Bottleneck blocks) with the same
state-dict key names, without depending on torchvision.
"""
