"""Backbones: architectures described once as staged bodies, with their weights."""

from transfer_cases.backbones.staged import StagedBody
from transfer_cases.backbones.timm_zoo import TimmBackbone
from transfer_cases.backbones.tiny import TinyCNN
from transfer_cases.backbones.torchvision_zoo import SUPPORTED, TorchvisionBackbone

__all__ = ["SUPPORTED", "StagedBody", "TimmBackbone", "TinyCNN", "TorchvisionBackbone"]
