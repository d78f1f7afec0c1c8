"""Data modules for image classification: your own class folders, MNIST and CIFAR-10.

sources.py: where images come from (`ImageSource`, `FileSource`, `SubsetDataset`, image checks);
splits.py: which images go where (labelling, the seeded val split and subsampling, `Stream`);
datamodule.py: `ClassificationDataModule`, and how to plug in a data source of your own.
"""

from transfer_cases.data.cifar10 import CIFAR10DataModule
from transfer_cases.data.datamodule import ClassificationDataModule
from transfer_cases.data.imagefolder import ImageFolderDataModule
from transfer_cases.data.mnist import MNISTDataModule
from transfer_cases.data.sources import FileSource, ImageSource, SubsetDataset
from transfer_cases.data.splits import Splits, Stream
from transfer_cases.data.transforms import eval_transform, train_transform

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "FileSource",
    "ImageFolderDataModule",
    "ImageSource",
    "MNISTDataModule",
    "Splits",
    "Stream",
    "SubsetDataset",
    "eval_transform",
    "train_transform",
]
