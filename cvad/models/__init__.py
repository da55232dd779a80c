"""Method registry: a name -> AnomalyModel subclass. Import a method module to register it."""

from __future__ import annotations

from cvad.models.base import AnomalyModel, AnomalyOutput, MethodParams, Task
from cvad.models.cfa import CFA
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


def build_model(name: str, params: dict | MethodParams, *, backbone: str, weights: str, image_size: int, seed: int) -> AnomalyModel:
    """Instantiate a registered method with validated parameters."""
    cls = METHODS.get(name)
    if not isinstance(params, MethodParams):
        params = cls.Params(**params)
    return cls(params, backbone=backbone, weights=weights, image_size=image_size, seed=seed)


__all__ = ["METHODS", "AnomalyModel", "AnomalyOutput", "MethodParams", "Task", "build_model"]
