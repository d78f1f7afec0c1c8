"""transfer-cases: the four transfer-learning cases for image classification.

`build(cfg)` turns a composed Hydra config into `(module, datamodule)`; `config_dir()` is where
the packaged configs live. Importing the package registers the `${asset:...}` resolver.
"""

from transfer_cases.training.build import build
from transfer_cases.training.cases import Case
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.config import register_resolvers
from transfer_cases.utils.paths import asset_path, config_dir

register_resolvers()

__all__ = ["Case", "TransferModule", "asset_path", "build", "config_dir", "register_resolvers"]
__version__ = "0.1.0"
