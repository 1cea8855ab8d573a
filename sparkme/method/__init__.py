"""The SparK method: patch masking, densify, light decoder, masked normalized-pixel loss."""

from sparkme.method.decoder import LightDecoder
from sparkme.method.masking import random_patch_mask
from sparkme.method.spark import SparK, no_weight_decay_names

__all__ = ["LightDecoder", "SparK", "no_weight_decay_names", "random_patch_mask"]
