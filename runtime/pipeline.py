"""``FilaPipeline``: artifacts folder -> answers, torch-free.

image(s) + prompt -> preprocess -> vision graph -> packing (unpad + image_newline) -> embed graph
-> merge at image-token positions -> KV-cached decoder loop -> text, with per-stage timings.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import ContextOverflowError, FilaError, ManifestError
from runtime.generate import Decoder, DecoderShape, SamplingParams, generate
from runtime.image_io import load_image
from runtime.manifest import Manifest
from runtime.preprocess import NEWLINE, PreprocessedImage, packing_index, preprocess
from runtime.prompt import PromptBuilder, expand_image_tokens


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    backend: str = "onnxruntime"

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "timings": self.timings,
            "backend": self.backend,
        }


def make_runner(backend: str, path: Path, name: str, **options):
    if backend == "onnxruntime":
        from runtime.backends.onnxruntime import OrtRunner

        return OrtRunner(path, name=name, **options)
    if backend == "tensorrt":
        from runtime.backends.tensorrt import load_engine_runner

        return load_engine_runner(path, name=name, **options)
    raise FilaError(f"unknown backend {backend!r}; use onnxruntime or tensorrt")


PRECISION_GROUPS = ("vision", "embed", "decoder")


def modular_vision_stages(manifest: Manifest) -> list[str]:
    """The modular vision chain in run order (convnext, vit.0, cvfm.0, ..., projector)."""
    names = [n for n in manifest.data.get("vision_chain", []) if n in manifest.stages]
    if "projector" not in names:
        raise ManifestError("this export has no modular vision stages; use vision='fused'")
    return names


def load_runners(
    manifest: Manifest, names: Sequence[str], backend: str, precision: str, **options
) -> dict:
    """One runner per named stage, at the variant ``precision`` picks for it (a warning for a
    variant that missed its accuracy gate). The pipeline loads its stages with it; a benchmark
    loads just the stages it times (without a second copy of the decoder)."""
    choose = precision_chooser(precision, list(manifest.stages))
    runners = {}
    for name in names:
        variant = choose(name, manifest.stage(name)["variants"])
        if manifest.variant(name, variant).get("validated") is False:
            warnings.warn(f"stage {name} ({variant}) did not meet its accuracy gate", stacklevel=3)
        runners[name] = make_runner(backend, manifest.stage_path(name, variant), name, **options)
    return runners


def run_modular_vision(
    runners: dict, image: PreprocessedImage, feeds_seen: dict | None = None
) -> np.ndarray:
    """The modular chain (convnext, then vit.k / cvfm.k in order, then projector) on one image;
    ``feeds_seen`` (when given) collects the inputs each stage got, for timing stages alone."""
    seen = {} if feeds_seen is None else feeds_seen

    def run(name: str, feeds: dict) -> dict:
        seen[name] = feeds
        return runners[name].infer(feeds)

    maps = run("convnext", {"global_view": image.global_view}) if "convnext" in runners else {}
    hidden = None
    for name in runners:
        if name.startswith("vit."):
            x = {"pixel_values": image.pixel_values} if name == "vit.0" else {"hidden": hidden}
            hidden = run(name, x)["hidden_out"]
        elif name.startswith("cvfm."):
            k = name.split(".")[1]
            hidden = run(name, {"hidden": hidden, f"stage{k}": maps[f"stage{k}"]})["hidden_out"]
    return run("projector", {"hidden": hidden})["image_features"]


def precision_chooser(spec: str, stages: Sequence[str] = ()) -> Callable[[str, Sequence[str]], str]:
    """``(stage, its variants) -> variant`` for a precision spec.

    ``"fp16"``: every stage that has that variant, fp32 for the rest (as before). ``"int8,w4"``: a
    preference list, each stage takes the first it has. ``"vision=int8,decoder=w4"``: per stage or
    group (``vision`` covers the fused graph and every modular vision stage); a named stage lacking
    its variant warns and runs fp32. Both forms mix: ``"fp16,decoder=w4"``. Names are checked
    against ``stages`` (and the groups) when given.
    """
    defaults, named = [], {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            defaults.append(item)
        elif not key.strip() or not value.strip():
            raise FilaError(f"precision {spec!r}: {item!r} is not STAGE=PRECISION")
        else:
            named[key.strip()] = value.strip()
    unknown = [k for k in named if stages and k not in (*PRECISION_GROUPS, *stages)]
    if unknown:
        raise FilaError(
            f"precision {spec!r} names {', '.join(unknown)}, which is not a stage; use "
            f"{', '.join(PRECISION_GROUPS)} or one of {', '.join(stages)}"
        )

    def choose(stage: str, variants: Sequence[str]) -> str:
        group = (
            "decoder" if stage.startswith("decoder") else stage if stage == "embed" else "vision"
        )
        wanted = named.get(stage, named.get(group))
        if wanted is not None:
            if wanted in variants:
                return wanted
            warnings.warn(
                f"stage {stage} has no {wanted} variant (it has {', '.join(variants)}); "
                "running it in fp32",
                stacklevel=3,
            )
            return "fp32"
        return next((p for p in defaults if p in variants), "fp32")

    return choose


def choose_decoder(manifest: Manifest, backend: str, wanted: str = "auto") -> str:
    """The decoder stage to run: ``decoder_gqa`` is ONNX Runtime only (a contrib op)."""
    has_gqa = "decoder_gqa" in manifest.stages
    if wanted == "auto":
        return "decoder_gqa" if has_gqa and backend == "onnxruntime" else "decoder"
    if wanted == "portable":
        return "decoder"
    if wanted == "gqa":
        if backend != "onnxruntime":
            raise FilaError("decoder 'gqa' runs on onnxruntime only; use decoder='portable'")
        if not has_gqa:
            raise ManifestError(
                "this export has no decoder_gqa stage (its LLM type is not "
                "supported, or it predates it); use decoder='portable'"
            )
        return "decoder_gqa"
    raise FilaError(f"decoder must be 'auto', 'gqa' or 'portable', got {wanted!r}")


class FilaPipeline:
    def __init__(
        self,
        manifest: Manifest,
        runners: dict,
        prompts: PromptBuilder,
        backend: str = "onnxruntime",
        vision_mode: str = "fused",
        decoder_stage: str = "decoder",
    ) -> None:
        self.manifest = manifest
        self.runners = runners
        self.prompts = prompts
        self.backend = backend
        self.vision_mode = vision_mode
        self.preprocess_config = manifest.preprocess
        self.newline = np.load(manifest.file_path("image_newline"), allow_pickle=False)
        model = manifest.model
        self.image_token_id = int(manifest.data["image_token_id"])
        self.eos_ids = list(manifest.data.get("eos_token_ids", [])) or prompts.eos_token_ids
        self.decoder_shape = DecoderShape.from_text_config(model["text"])
        self.decoder_stage = decoder_stage
        axes = manifest.stage(decoder_stage)["axes"]
        self.max_context = axes["total"]["max"]
        self.max_batch = axes["batch"]["max"] if "batch" in axes else 1

    @classmethod
    def from_artifacts(
        cls,
        folder: str | Path,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        vision: str = "fused",
        decoder: str = "auto",
        **options,
    ) -> FilaPipeline:
        """Load (and hash-check) an export. ``vision``: ``fused`` graph or the ``modular`` chain.
        ``decoder``: ``gqa`` (ONNX Runtime's in-place GroupQueryAttention graph), ``portable``
        (standard ONNX, the TensorRT one), or ``auto``: gqa on onnxruntime when exported."""
        manifest = Manifest.load(folder)
        decoder_stage = choose_decoder(manifest, backend, decoder)
        names = ["embed", decoder_stage]
        if vision == "fused":
            names.append("vision")
        elif vision == "modular":
            names += modular_vision_stages(manifest)
        else:
            raise FilaError(f"vision must be 'fused' or 'modular', got {vision!r}")
        runners = load_runners(manifest, names, backend, precision, **options)
        runners["decoder"] = runners.pop(decoder_stage)
        prompts = PromptBuilder.from_folder(
            manifest.folder, manifest.data.get("tokenizer", "tokenizer.json")
        )
        if manifest.data.get("chat_template"):
            prompts.chat_template = manifest.data["chat_template"]
        return cls(manifest, runners, prompts, backend, vision, decoder_stage)

    # --- vision ---------------------------------------------------------------------------
    def run_vision(self, image: PreprocessedImage) -> np.ndarray:
        """Projected tile features (tiles, n*n, D) from the fused graph or the modular chain."""
        feeds = {"pixel_values": image.pixel_values}
        if image.global_view is not None:
            feeds["global_view"] = image.global_view
        if self.vision_mode == "fused":
            return self.runners["vision"].infer(feeds)["image_features"]
        return run_modular_vision(self.runners, image)

    def pack(self, features: np.ndarray, image: PreprocessedImage) -> np.ndarray:
        """LLaVA-NeXT packing: the same index the reference model uses."""
        index = packing_index(image.image_size, image.grid, self.preprocess_config.tokens_per_side)
        rows = np.concatenate([features.reshape(-1, features.shape[-1]), self.newline[None]])
        return rows[np.where(index == NEWLINE, rows.shape[0] - 1, index)]

    def encode_image(self, source) -> np.ndarray:
        return self.pack(*self._vision(source)[:2])

    def _vision(self, source):
        image = preprocess(load_image(source), self.preprocess_config)
        return self.run_vision(image), image

    # --- text -----------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.runners["embed"].infer({"input_ids": ids})["inputs_embeds"]

    def new_decoder(self, max_len: int, batch: int = 1, runner=None) -> Decoder:
        """A decoder with its cache for ``max_len`` positions, on this pipeline's decoder (or on
        ``runner``, another variant of it, as the accuracy report compares)."""
        return Decoder(runner or self.runners["decoder"], self.decoder_shape, batch, max_len)

    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        need = prompt_len + max_new_tokens
        if need > self.max_context:
            raise ContextOverflowError(
                f"prompt with image tokens is {prompt_len} tokens; with {max_new_tokens} new "
                f"tokens that is {need}, {need - self.max_context} over the context of "
                f"{self.max_context}; shorten the prompt, lower --max-new-tokens, or use a smaller image"
            )

    def generate(
        self,
        images,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] = (),
        raw_prompt: bool = False,
        history: Sequence[tuple[str, str]] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Answer ``prompt`` about one image (path, bytes, PIL image, array) or a list of them."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        timings: dict[str, float] = {}
        text = self.prompts.format(prompt, num_images=len(images), raw=raw_prompt, history=history)
        prompt_ids = self.prompts.encode(text)
        t0 = time.perf_counter()
        loaded = [preprocess(load_image(im), self.preprocess_config) for im in images]
        timings["preprocess_s"] = time.perf_counter() - t0
        counts = [
            int(
                packing_index(im.image_size, im.grid, self.preprocess_config.tokens_per_side).shape[
                    0
                ]
            )
            for im in loaded
        ]
        ids = expand_image_tokens(prompt_ids, self.image_token_id, counts)
        self.check_context(len(ids), max_new_tokens)
        t0 = time.perf_counter()
        feats = [self.pack(self.run_vision(im), im) for im in loaded]
        timings["vision_s"] = time.perf_counter() - t0
        id_array = np.asarray([ids], dtype=np.int64)
        t0 = time.perf_counter()
        embeds = self.embed(id_array)
        if feats:
            embeds[0, id_array[0] == self.image_token_id] = np.concatenate(feats)
        timings["embed_s"] = time.perf_counter() - t0
        decoder = self.new_decoder(len(ids) + max_new_tokens)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        out = generate(
            decoder,
            self.embed,
            embeds,
            np.ones_like(id_array),
            max_new_tokens,
            params,
            self.eos_ids,
            stop,
            self.prompts.decode,
            on_text,
        )
        timings["ttft_s"] = (
            timings["preprocess_s"] + timings["vision_s"] + timings["embed_s"] + out.ttft_s
        )
        timings["prefill_s"] = out.ttft_s
        timings["decode_s"] = out.decode_s
        timings["decode_tokens_per_s"] = out.decode_tokens_per_s
        return GenerationResult(out.texts[0], out.token_ids[0], prompt_ids, timings, self.backend)
