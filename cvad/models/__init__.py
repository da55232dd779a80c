"""Method registry: a name -> AnomalyModel subclass, for every method ``cvad.catalog`` names (a test holds the two
equal). Import a method module to register it."""

from __future__ import annotations

from cvad.models.base import AnomalyModel, AnomalyOutput, MethodParams, Setup, SetupError, Task
from cvad.models.cfa import CFA
from cvad.models.components.stored import store_weights
from cvad.models.dinomaly import Dinomaly
from cvad.models.padim import PaDiM
from cvad.models.paste import PaSTe
from cvad.models.patchcore import PatchCore
from cvad.models.simplenet import SimpleNet
from cvad.models.stfpm import STFPM
from cvad.registry import Registry

METHODS: Registry[type[AnomalyModel]] = Registry("model")
for method in (PaDiM, PatchCore, STFPM, PaSTe, SimpleNet, CFA, Dinomaly):
    METHODS.register(method.name)(method)


def build_model(name: str, params: dict | MethodParams, setup: Setup) -> AnomalyModel:
    """Instantiate a registered method with validated parameters on ``setup``, its frozen backbone's weights kept as
    ``setup.compression.backbone`` says."""
    cls = METHODS.get(name)
    if not isinstance(params, MethodParams):
        params = cls.Params(**params)
    model = cls(params, setup)
    for extractor in model.frozen_extractors().values():
        store_weights(extractor, setup.compression.backbone)
    return model


__all__ = ["METHODS", "AnomalyModel", "AnomalyOutput", "MethodParams", "Setup", "SetupError", "Task", "build_model"]
