"""`FilaConfig`: one dataclass for the whole model, with named presets.

On disk a FILA config is a transformers LLaVA-NeXT ``config.json`` plus a ``"fila"`` block, so a
FILA checkpoint without the ConvNeXt branch is exactly a LLaVA-NeXT checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SUPPORTED_TEXT_MODELS = ("llama", "qwen2", "mistral")
CONVNEXT_STRIDE = 32


@dataclass
class ConvNextConfig:
    """The high-resolution branch: a timm ConvNeXt of four stages."""

    arch: str = "convnext_atto"  # timm model name; depths/dims override its defaults
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    dims: list[int] = field(default_factory=lambda: [40, 80, 160, 320])
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))


@dataclass
class FilaConfig:
    """Everything needed to build the model and its preprocessing.

    ``vision`` is a transformers ``CLIPVisionConfig`` dict, ``text`` a causal-LM config dict with a
    ``model_type``; ``convnext`` is None for a plain LLaVA-NeXT model (no ConvNeXt branch, no CVFM).
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    convnext: ConvNextConfig | None = None
    interaction_layers: list[int] = field(default_factory=lambda: [2, 6, 12, 20])
    image_grid_pinpoints: list[list[int]] = field(default_factory=lambda: LLAVA_NEXT_PINPOINTS)
    image_token_index: int = 3
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    global_view_scale: float | None = None  # None: ConvNeXt stride / ViT patch (32/14)
    cvfm_gate_init: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.convnext, dict):
            self.convnext = ConvNextConfig(**self.convnext)
        self.validate()

    # --- derived sizes -------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision["patch_size"])

    @property
    def tokens_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def num_feature_layers(self) -> int:
        """ViT layers that run: the projector reads the output of the last one."""
        n = int(self.vision["num_hidden_layers"])
        layer = self.vision_feature_layer
        return layer if layer >= 0 else n + 1 + layer

    @property
    def has_convnext(self) -> bool:
        return self.convnext is not None

    @property
    def global_scale(self) -> float:
        if self.global_view_scale is not None:
            return float(self.global_view_scale)
        return CONVNEXT_STRIDE / self.patch_size

    @property
    def global_tile_size(self) -> int:
        """Pixels of the ConvNeXt view that cover one ViT tile."""
        return round(self.tile_size * self.global_scale)

    @property
    def text_model_type(self) -> str:
        return str(self.text.get("model_type", "llama"))

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.text.get("max_position_embeddings", 2048))

    def vit_segments(self) -> list[tuple[int, int]]:
        """[start, end) ViT layer ranges between interaction layers (one range without ConvNeXt):
        each is a ``vit.k`` stage, with a ``cvfm.k`` block after it."""
        bounds = self.interaction_layers if self.has_convnext else []
        edges = [0, *bounds, self.num_feature_layers]
        return list(zip(edges[:-1], edges[1:], strict=True))

    def cvfm_windows(self) -> list[int]:
        """ConvNeXt cells per tile side at each stage (stage strides 4, 8, 16, 32)."""
        return [self.global_tile_size // (4 * 2**i) for i in range(4)]

    def validate(self) -> None:
        """Refuse configs the model cannot be built from, naming the field and the fix."""
        if self.text_model_type not in SUPPORTED_TEXT_MODELS:
            raise ConfigError(
                f"text model_type {self.text_model_type!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_TEXT_MODELS)}"
            )
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                "vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        if not isinstance(self.vision_feature_layer, int):
            raise ConfigError(
                "vision_feature_layer must be one integer (a list of layers is not supported), "
                f"got {self.vision_feature_layer!r}"
            )
        if self.tile_size % self.patch_size:
            raise ConfigError(
                f"tile size {self.tile_size} is not a multiple of the ViT patch {self.patch_size}"
            )
        for hw in self.image_grid_pinpoints:
            if len(hw) != 2 or hw[0] % self.tile_size or hw[1] % self.tile_size:
                raise ConfigError(
                    f"grid pinpoint {hw} is not [height, width] in multiples of the tile size "
                    f"{self.tile_size}"
                )
        if not 0 <= self.image_token_index < self.vocab_size:
            raise ConfigError(
                f"image_token_index {self.image_token_index} is outside the vocabulary "
                f"(size {self.vocab_size})"
            )
        if self.convnext is not None:
            if len(self.convnext.dims) != 4 or len(self.interaction_layers) != 4:
                raise ConfigError(
                    "FILA fuses four ConvNeXt stages at four ViT layers: convnext.dims has "
                    f"{len(self.convnext.dims)} entries and interaction_layers "
                    f"{len(self.interaction_layers)}; give four of each"
                )
            tile_global = self.tile_size * self.global_scale
            if abs(tile_global - round(tile_global)) > 1e-6 or round(tile_global) % CONVNEXT_STRIDE:
                raise ConfigError(
                    f"global_view_scale {self.global_scale} maps a {self.tile_size} px tile to "
                    f"{tile_global:g} px; it must be a whole multiple of ConvNeXt's stride "
                    f"{CONVNEXT_STRIDE} so every tile owns whole ConvNeXt cells"
                )
            last = self.num_feature_layers
            layers = self.interaction_layers
            if sorted(layers) != layers or layers[0] < 1 or layers[-1] > last:
                raise ConfigError(
                    f"interaction_layers {layers} must be increasing 1-based ViT layers <= {last} "
                    "(the layer whose output feeds the projector)"
                )

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FilaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown FilaConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**copy.deepcopy(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FilaConfig:
        return cls.from_dict(json.loads(text))

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` form: a LLaVA-NeXT config plus a ``fila`` block."""
        arch = (
            "FilaForConditionalGeneration"
            if self.has_convnext
            else "LlavaNextForConditionalGeneration"
        )
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": "llava_next",
            "vision_config": {"model_type": "clip_vision_model", **self.vision},
            "text_config": copy.deepcopy(self.text),
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "image_token_index": self.image_token_index,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "tie_word_embeddings": bool(self.text.get("tie_word_embeddings", False)),
        }
        if self.has_convnext:
            out["fila"] = {
                "convnext": dataclasses.asdict(self.convnext),
                "interaction_layers": self.interaction_layers,
                "global_view_scale": self.global_view_scale,
                "cvfm_gate_init": self.cvfm_gate_init,
            }
        return out

    @classmethod
    def from_hf_dict(
        cls, data: dict[str, Any], preprocessor: dict[str, Any] | None = None
    ) -> FilaConfig:
        """Read a FILA or LLaVA-NeXT ``config.json`` (+ ``preprocessor_config.json``)."""
        model_type = data.get("model_type")
        if model_type != "llava_next":
            raise ConfigError(
                f"unknown architecture: config.json has model_type {model_type!r}, expected "
                "'llava_next' (a FILA or LLaVA-NeXT checkpoint)"
            )
        for key in ("vision_config", "text_config"):
            if not isinstance(data.get(key), dict):
                raise ConfigError(f"config.json has no {key!r} block")
        vision = {k: v for k, v in data["vision_config"].items() if k in _VISION_KEYS}
        text = {k: v for k, v in data["text_config"].items() if k in _TEXT_KEYS}
        text.setdefault("model_type", "llama")
        fila = data.get("fila") or {}
        kwargs: dict[str, Any] = {
            "vision": vision,
            "text": text,
            "image_grid_pinpoints": data.get("image_grid_pinpoints", LLAVA_NEXT_PINPOINTS),
            "image_token_index": data.get("image_token_index", data.get("image_token_id", 32000)),
            "vision_feature_layer": data.get("vision_feature_layer", -2),
            "vision_feature_select_strategy": data.get("vision_feature_select_strategy", "default"),
            "projector_hidden_act": data.get("projector_hidden_act", "gelu"),
        }
        if fila:
            kwargs["convnext"] = ConvNextConfig(**fila["convnext"])
            kwargs["interaction_layers"] = list(fila["interaction_layers"])
            kwargs["global_view_scale"] = fila.get("global_view_scale")
            kwargs["cvfm_gate_init"] = fila.get("cvfm_gate_init", 1.0)
        if preprocessor:
            kwargs["image_mean"] = list(preprocessor.get("image_mean", CLIP_MEAN))
            kwargs["image_std"] = list(preprocessor.get("image_std", CLIP_STD))
            if "image_grid_pinpoints" in preprocessor:
                kwargs["image_grid_pinpoints"] = preprocessor["image_grid_pinpoints"]
        return cls(**kwargs)

    def preprocessor_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` form, readable by transformers' LLaVA-NeXT processor."""
        return {
            "image_processor_type": "LlavaNextImageProcessor",
            "processor_class": "LlavaNextProcessor",
            "crop_size": {"height": self.tile_size, "width": self.tile_size},
            "size": {"shortest_edge": self.tile_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "resample": 3,
            "rescale_factor": 1 / 255,
        }

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FilaConfig:
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: a checkpoint folder needs a config.json")
        pre = folder / "preprocessor_config.json"
        preprocessor = json.loads(pre.read_text()) if pre.is_file() else None
        return cls.from_hf_dict(json.loads(path.read_text()), preprocessor)


_VISION_KEYS = {
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "num_channels",
    "projection_dim",
}
_TEXT_KEYS = {
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "hidden_act",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
}


def _vision(hidden: int, inter: int, layers: int, heads: int, image: int, patch: int) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image,
        "patch_size": patch,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
    }


def _text(
    model_type: str,
    vocab: int,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv_heads: int,
    max_pos: int,
) -> dict:
    return {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def _tiny() -> FilaConfig:
    tile = 56
    return FilaConfig(
        vision=_vision(32, 64, 5, 2, tile, 14),
        text=_text("llama", 512, 64, 128, 2, 4, 2, 4096),
        convnext=ConvNextConfig(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32]),
        interaction_layers=[1, 2, 3, 4],
        # a 1x1 canvas too, so tests cover every crop count from 1 to 4 sub-images
        image_grid_pinpoints=[
            [tile, tile],
            [tile, 2 * tile],
            [2 * tile, tile],
            [2 * tile, 2 * tile],
            [3 * tile, tile],
            [tile, 3 * tile],
        ],
    )


def _small() -> FilaConfig:
    return FilaConfig(
        vision=_vision(512, 2048, 9, 8, 336, 14),
        text=_text("llama", 32000, 1024, 2816, 12, 16, 4, 4096),
        convnext=ConvNextConfig(depths=[2, 2, 6, 2], dims=[40, 80, 160, 320]),
        interaction_layers=[2, 4, 6, 8],
    )


def _edge() -> FilaConfig:
    """~2.1 B, the Orin Nano class: CLIP ViT-L/14-336, ConvNeXt-B on the global view, and a
    Qwen2-1.5B-shaped LLM (tied embeddings over a 151,936-token vocabulary). The bundled tokenizer
    is a small one whose ids sit inside the model's vocabulary: shapes are what count."""
    text = _text("qwen2", 151936, 1536, 8960, 28, 12, 2, 32768)
    text |= {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True}
    return FilaConfig(
        vision=_vision(1024, 4096, 24, 16, 336, 14),
        text=text,
        convnext=ConvNextConfig(
            arch="convnext_base", depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024]
        ),
        interaction_layers=[2, 6, 12, 20],
    )


def _paper() -> FilaConfig:
    """~7.2 B, the published size: ViT-L/14-336, ConvNeXt-L, a 7 B Llama (LLaVA-NeXT-vicuna's
    shapes; the image token is the bundled tokenizer's, id 3, where vicuna's own uses 32000)."""
    text = _text("llama", 32064, 4096, 11008, 32, 32, 32, 4096)
    return FilaConfig(
        vision=_vision(1024, 4096, 24, 16, 336, 14),
        text=text,
        convnext=ConvNextConfig(
            arch="convnext_large", depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536]
        ),
        interaction_layers=[2, 6, 12, 20],
    )


PRESETS = {"tiny": _tiny, "small": _small, "edge": _edge, "paper": _paper}


def preset(name: str) -> FilaConfig:
    """A fresh config for a named preset: ``tiny`` (tests), ``small`` (CPU bench), ``edge``
    (~2.1 B, Orin Nano class), ``paper`` (~7.2 B)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def preprocess_config(config: FilaConfig):
    """The runtime's preprocessing parameters for this model."""
    from runtime.preprocess import PreprocessConfig

    conv = config.convnext
    return PreprocessConfig(
        tile_size=config.tile_size,
        patch_size=config.patch_size,
        grid_pinpoints=tuple(tuple(p) for p in config.image_grid_pinpoints),
        image_mean=tuple(config.image_mean),
        image_std=tuple(config.image_std),
        global_tile_size=config.global_tile_size if conv else None,
        global_mean=tuple(conv.image_mean) if conv else None,
        global_std=tuple(conv.image_std) if conv else None,
    )
