"""One builder owns the steps every backbone family shares, as timm's `build_model_with_cfg` does:
the weights setting checked against the case, a local weights file (or a checkpoint's body) loaded,
the stage table applied and checked. A family supplies only its model (with its own named weights)
and its stage table."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from transfer_cases.backbones.check import check_stages
from transfer_cases.backbones.staged import StagedBody
from transfer_cases.backbones.weights import CLASSIFIER_PREFIXES, is_weights_path, load_weights_path
from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import ConfigError


class BackboneBuilder:
    """Base of the backbone configs (`TorchvisionBackbone`, `TimmBackbone`, `TinyCNN`).

    A family sets `weights` and implements `arch`, `create` and `stage`; `build` does the rest."""

    arch: str  # a field or a property of the family
    weights: str | None
    # What to write instead of a null `weights` when the case starts from pretrained weights; None: a
    # null `weights` means random initialisation (the tiny test body).
    weights_example: ClassVar[str | None] = "a weights name or file"
    checks_own_stages: ClassVar[bool] = False  # the family's `stage` runs `check_stages` itself

    def create(self, named_weights: bool) -> tuple[nn.Module, Preprocess, tuple[str, ...]]:
        """The family's model, with its own named weights loaded when `named_weights`; their
        preprocessing; the prefixes of its classifier's keys (dropped from a weights file)."""
        raise NotImplementedError

    def stage(self, model: nn.Module, preprocess: Preprocess) -> StagedBody:
        """The family's stage table applied to `model`."""
        raise NotImplementedError

    def is_local(self, weights: str) -> bool:
        """Whether `weights` names a local file (else a name the family's `create` knows)."""
        return is_weights_path(weights)

    def build(self, pretrained: bool = True) -> StagedBody:
        """Build the body, loading the weights when `pretrained` (else random initialisation)."""
        if pretrained and not self.weights and self.weights_example:
            raise ConfigError(
                f"the case starts from pretrained weights but backbone.weights is null for {self.arch}; "
                f"give {self.weights_example}, or train from scratch with case.init=scratch"
            )
        local = bool(pretrained and self.weights and self.is_local(str(self.weights)))
        model, preprocess, classifier = self.create(bool(pretrained and self.weights and not local))
        body_state = None
        if local:
            preprocess, body_state = load_weights_path(
                model, self.arch, str(self.weights), classifier=classifier, default=preprocess
            )
        body = self.stage(model, preprocess)
        if not self.checks_own_stages:
            check_stages(body)
        if body_state is not None:
            body.load_body_state(body_state, str(self.weights))
        return body


__all__ = ["CLASSIFIER_PREFIXES", "BackboneBuilder"]
