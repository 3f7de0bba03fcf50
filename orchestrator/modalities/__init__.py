"""The registry of modalities, addressed by the name the YAML uses (`data.modality`).

Adding a modality is one module that builds a `ModalitySpec` plus one `register_modality`
call; nothing else in the project asks which modality a run is."""

from __future__ import annotations

from orchestrator.modalities import image, text
from orchestrator.modalities.spec import ModalitySpec
from orchestrator.state.config import RunConfig
from runstore.errors import InputError

MODALITIES: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec) -> None:
    MODALITIES[spec.name] = spec


def get_modality(name: str) -> ModalitySpec:
    if name not in MODALITIES:
        raise InputError("data.modality", f"unknown modality {name!r}; expected one of "
                         f"{', '.join(MODALITIES)}")
    return MODALITIES[name]


def modality_of(config: RunConfig) -> ModalitySpec:
    return get_modality(config.data.modality)


def check_config(config: RunConfig) -> ModalitySpec:
    """The run's modality, once the config is one it can train: called by `islands
    validate`, `submit` and before a run starts, so a bad choice never reaches Ray."""
    spec = modality_of(config)
    model = config.experts.model
    owner = next((other for other in MODALITIES.values()
                  if model in other.models and model not in spec.models), None)
    if owner is not None:
        expected = (f"{' or '.join(spec.models)} (or no experts.model: {spec.models[0]})"
                    if spec.models else "a model made for its data")
        raise InputError("experts.model", f"{model!r} is a model for {owner.name} data; "
                         f"{spec.name} runs expect {expected}")
    spec.check_config(config)
    return spec


register_modality(image.spec)
register_modality(text.spec)
