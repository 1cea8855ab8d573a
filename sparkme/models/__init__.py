"""Dense networks sparkme ships for data timm does not cover (3D volumes)."""

from sparkme.models.resnet3d import BasicBlock3d, ResNet3d

__all__ = ["BasicBlock3d", "ResNet3d"]
