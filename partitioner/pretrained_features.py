"""Pretrained image features, as in Decentralized Diffusion Models (which clusters DINOv2
features): DINOv2's pooled CLS token or CLIP's image embedding, from a Hugging Face model
that is already on this machine (a folder, or a hub id in the local cache).

Nothing is downloaded: every load passes `local_files_only=True` under HF_HUB_OFFLINE, and
only safetensors weights are read. The saved state names the model and the sha256 of its
config, weights and image processor, so a later run embeds new images the same way or
refuses a different model. `transformers` is imported only when a model is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from runstore.errors import InputError

INFERENCE_ROWS = 64
"""Images per forward pass."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub access off for one lookup or load: HF_HUB_OFFLINE in the environment, and in
    huggingface_hub's constants, which read it once at import (the process may have
    imported it earlier)."""
    from huggingface_hub import constants

    before, flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = flag
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' warnings (weights of a CLIP text tower left unused, a slow image
    processor without torchvision) and progress bars off for one load."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class PretrainedImageFeatures:
    """One pretrained vision model's embedding of every image, in batches under
    torch.inference_mode, on the GPU when there is one. No fitting: `fit` loads the model."""

    modality: ClassVar[str] = "image"
    reads_model: ClassVar[bool] = True
    """make_extractor hands it `partition.model_path`."""
    name: ClassVar[str]
    example_repo: ClassVar[str]
    """The hub id the error message suggests downloading."""
    model_types: ClassVar[tuple[str, ...]]
    """The config.json `model_type`s it loads."""
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(self, components: int = 0, seed: int = 0, model_path: str | None = None,
                 expected: dict[str, str] | None = None) -> None:
        self.components, self.seed = components, seed
        if importlib.util.find_spec("transformers") is None:
            raise InputError("partition.features", f"{self.name!r} needs the optional extra: "
                             "pip install 'islands[features]'")
        if not model_path:
            raise InputError("partition.model_path", f"features {self.name!r} need a model: "
                             f"{self._how_to_obtain('PATH')}")
        self.model_path = model_path
        self.folder = self._resolve(model_path)
        self.expected = expected  # the hashes a saved state recorded
        self.hashes = self._hashes()
        self.model: Any = None
        self.processor: Any = None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _how_to_obtain(self, path: str) -> str:
        return (f"on a machine with internet run `hf download {self.example_repo} --local-dir "
                f"{path}` (`huggingface-cli download` on older huggingface_hub), copy the "
                "folder here, then set partition.model_path to it")

    def _resolve(self, model_path: str) -> Path:
        """The model's folder: `model_path` itself, or its snapshot in the local Hugging
        Face cache when it is a hub id; never the network."""
        folder = Path(model_path).expanduser()
        if not folder.exists() and _HUB_ID.fullmatch(model_path):
            from huggingface_hub import try_to_load_from_cache

            with _offline():
                cached = try_to_load_from_cache(model_path, "config.json")
            if isinstance(cached, str):
                folder = Path(cached).parent
        if not (folder / "config.json").is_file():
            raise InputError("partition.model_path", f"no model at {model_path!r} (neither a "
                             "folder with config.json nor a hub id in the local Hugging Face "
                             f"cache); {self._how_to_obtain(model_path)}")
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (ValueError, AttributeError) as err:
            raise InputError(str(folder / "config.json"), f"not a model config ({err})") from None
        if model_type not in self.model_types:
            raise InputError("partition.model_path", f"{model_path!r} is a {model_type!r} "
                             f"model; features {self.name!r} expect model_type "
                             f"{' or '.join(self.model_types)}")
        if not sorted(folder.glob("*.safetensors")):
            raise InputError("partition.model_path", f"{str(folder)!r} holds no .safetensors "
                             "weights; expected a model saved as safetensors (other weight "
                             "files are pickles and are not read)")
        return folder.resolve()

    def _hashes(self) -> dict[str, str]:
        processor = self.folder / "preprocessor_config.json"
        hashes = {
            "config_sha256": _sha256_files([self.folder / "config.json"]),
            "weights_sha256": _sha256_files(sorted(self.folder.glob("*.safetensors"))),
            "processor_sha256": _sha256_files([processor]) if processor.is_file() else "",
        }
        for key, value in (self.expected or {}).items():
            if hashes.get(key) != value:
                raise InputError("partition.model_path", f"the model at {self.model_path!r} "
                                 f"differs from the one the partition used ({key} "
                                 f"{hashes.get(key)!r}, expected {value!r}); point it at the "
                                 "same model to embed images as the partition did")
        return hashes

    def _load_model(self, folder: Path) -> Any:
        raise NotImplementedError

    def _embed(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _load(self) -> Any:
        if self.model is None:
            with _offline(), _quiet():
                model = self._load_model(self.folder)
                if (self.folder / "preprocessor_config.json").is_file():
                    from transformers import AutoImageProcessor

                    self.processor = AutoImageProcessor.from_pretrained(
                        str(self.folder), local_files_only=True)
            self.model = model.to(self.device).eval()
        return self.model

    def _checked(self, model: Any, info: dict[str, Any]) -> Any:
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise InputError("partition.model_path", f"{str(self.folder)!r} lacks weights the "
                             f"{self.name} features need ({', '.join(missing[:4])}"
                             f"{', ...' if len(missing) > 4 else ''}); expected a full "
                             f"{self.name} checkpoint")
        return model

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, C] -> the model's normalised float input [N, 3, S, S]: by the
        model's image processor, or (a folder without one) resized to the config's image
        size and normalised with the family's mean and std."""
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        images = np.ascontiguousarray(images[..., :3])
        if self.processor is not None:
            return self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        size = int(self.model.config.image_size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic",
                                            align_corners=False, antialias=True)
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (x.clamp(0.0, 1.0) - mean) / std

    def fit(self, images: np.ndarray) -> PretrainedImageFeatures:
        self._load()
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        model = self._load()
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images), INFERENCE_ROWS):
                pixels = self._pixels(images[start:start + INFERENCE_ROWS]).to(self.device)
                parts.append(self._embed(model, pixels).float().cpu().numpy())
        if not parts:
            return np.zeros((0, self._dim()), np.float32)
        return np.concatenate(parts).astype(np.float32)

    def _dim(self) -> int:
        return int(self._load().config.hidden_size)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return {}, {"components": str(self.components), "seed": str(self.seed),
                    "model_path": self.model_path, **self.hashes}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor],
                   meta: dict[str, str]) -> PretrainedImageFeatures:
        expected = {key: meta[key] for key in ("config_sha256", "weights_sha256",
                                               "processor_sha256")}
        return cls(int(meta["components"]), int(meta["seed"]), meta["model_path"], expected)


class DinoV2Features(PretrainedImageFeatures):
    """DINOv2's pooled output: the final layer-normed CLS token."""

    name = "dinov2"
    example_repo = "facebook/dinov2-small"
    model_types = ("dinov2",)
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def _load_model(self, folder: Path) -> Any:
        from transformers import Dinov2Model

        model, info = Dinov2Model.from_pretrained(str(folder), local_files_only=True,
                                                  use_safetensors=True,
                                                  output_loading_info=True)
        return self._checked(model, info)

    def _embed(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels).pooler_output


class ClipImageFeatures(PretrainedImageFeatures):
    """CLIP's image embedding (the vision tower through its projection), L2-normalised as
    CLIP compares images and texts by cosine similarity. A full CLIP checkpoint works; its
    text tower is not loaded."""

    name = "clip"
    example_repo = "openai/clip-vit-base-patch32"
    model_types = ("clip", "clip_vision_model")
    mean, std = CLIP_MEAN, CLIP_STD

    def _load_model(self, folder: Path) -> Any:
        from transformers import CLIPVisionModelWithProjection

        model, info = CLIPVisionModelWithProjection.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True)
        return self._checked(model, info)

    def _embed(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds, dim=-1)

    def _dim(self) -> int:
        return int(self._load().config.projection_dim)
