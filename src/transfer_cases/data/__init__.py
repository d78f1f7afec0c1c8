"""Data modules for image classification: your own class folders, MNIST and CIFAR-10."""

from transfer_cases.data.base import ClassificationDataModule
from transfer_cases.data.cifar10 import CIFAR10DataModule
from transfer_cases.data.imagefolder import ImageFolderDataModule
from transfer_cases.data.mnist import MNISTDataModule
from transfer_cases.data.transforms import eval_transform, train_transform

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "eval_transform",
    "train_transform",
]
