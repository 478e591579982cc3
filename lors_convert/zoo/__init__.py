"""Reference architectures in plain torch, for tests, examples and ``--arch`` references.

- ``lors_convert.zoo.resnet``: torchvision-style ResNet/ResNeXt (Bottleneck blocks), same state-dict
  key names, without depending on torchvision.
- ``lors_convert.zoo.adamixer``: the AdaMixer query-based detection decoder (6 stages), faithful to
  MCG-NJU/AdaMixer, taking pre-sampled features.
"""
