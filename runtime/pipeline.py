"""``FilaPipeline``: artifacts folder -> answers, torch-free.

image(s) + prompt -> preprocess -> vision (fused graph or modular chain) -> packing (unpad +
image_newline) -> prompt ids -> embed graph, image features at the image-token positions ->
KV-cached decoder loop -> text, with per-stage timings.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.backends import load_runner
from runtime.errors import ContextOverflowError, FilaError
from runtime.generate import Decoder, DecoderShape, SamplingParams, check_max_new_tokens, generate
from runtime.image_io import load_image
from runtime.manifest import Manifest
from runtime.memory import peak_rss_bytes
from runtime.preprocess import PreprocessedImage, preprocess
from runtime.prompt import PromptBuilder
from runtime.reuse import Reuse, content_key, position_keys
from runtime.variants import (
    PrecisionSpec,
    choose_decoder,
    precision_spec,
    stage_variant,
    vision_mode,
)
from runtime.vision import VisionEncoder, pack

VISION_MODES = ("auto", "fused", "modular", "none")
REUSE_HEADROOM = 1024  # positions a reusable decoder keeps beyond its first request


@dataclass
class ImageFeatures:
    """One image of a request: packed features (num_tokens, D) once encoded, its content key,
    and the time spent (zero when they came from a cache)."""

    packed: np.ndarray | None  # None until ``FilaPipeline.encode`` has run vision
    key: str = ""
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    image: PreprocessedImage | None = None  # kept only until encoded

    @property
    def num_tokens(self) -> int:
        return len(self.packed) if self.packed is not None else self.image.num_tokens


@dataclass
class Request:
    """A prompt as ids (``ids``: image placeholders expanded) with its encoded images."""

    prompt_ids: list[int]
    ids: list[int]
    features: list[ImageFeatures]
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    backend: str = "onnxruntime"
    peak_rss_mb: float = 0.0  # the process's peak resident memory so far (what fila plan predicts)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "timings": self.timings,
            "backend": self.backend,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


def load_runners(
    manifest: Manifest,
    names: Sequence[str],
    backend: str,
    precision: str | PrecisionSpec | None,
    **options,
) -> dict:
    """One runner per named stage, at the variant ``precision`` picks for it (a warning for a
    variant that missed its accuracy gate). The pipeline loads its stages with it; a benchmark
    loads just the stages it times (without a second copy of the decoder)."""
    spec = precision_spec(manifest, precision)
    runners: dict = {}
    try:
        for name in names:
            variant = stage_variant(manifest, spec, name, backend)
            if manifest.variant(name, variant).get("validated") is False:
                warnings.warn(
                    f"stage {name} ({variant}) did not meet its accuracy gate", stacklevel=3
                )
            runners[name] = load_runner(backend, manifest, name, variant, **options)
    except BaseException:
        with contextlib.suppress(Exception):  # the load's own error is the one to report
            close_runners(runners)  # the stages loaded before the one that failed
        raise
    return runners


def close_runners(runners: dict) -> None:
    """Close every runner (device buffers, caches, engines, streams, sessions), each even when
    one before it fails (the first failure is raised after the rest are closed)."""
    with contextlib.ExitStack() as stack:
        for runner in runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                stack.callback(close)


def load_vision_chain(
    manifest: Manifest, backend: str, precision: str | PrecisionSpec | None, **options
) -> VisionEncoder:
    """The modular vision chain alone (no decoder), each stage loaded as the pipeline loads it:
    for benchmarks that time or record its stages one by one."""
    names = manifest.vision_chain
    runners = load_runners(manifest, names, backend, precision, **options)
    return VisionEncoder(runners, [manifest.spec(n) for n in names])


def prompt_builder(manifest: Manifest) -> PromptBuilder:
    """The export's tokenizer and chat template (both files hash-checked)."""
    tokenizer = manifest.data.get("tokenizer", "tokenizer.json")
    manifest.file_path(tokenizer)
    if "tokenizer_config.json" in manifest.data.get("files", {}):
        manifest.file_path("tokenizer_config.json")
    return PromptBuilder.from_folder(manifest.folder, tokenizer)


class FilaPipeline:
    def __init__(
        self,
        manifest: Manifest,
        runners: dict,
        prompts: PromptBuilder,
        backend: str = "onnxruntime",
        decoder_stage: str = "decoder",
    ) -> None:
        self.manifest = manifest
        self.runners = runners
        self.prompts = prompts
        self.backend = backend
        self.decoder_stage = decoder_stage
        self.preprocess_config = manifest.preprocess
        self.newline = np.load(manifest.file_path("image_newline"), allow_pickle=False)
        self.decoder_shape = DecoderShape.from_text_config(manifest.model["text"])
        self.max_context = manifest.stage(decoder_stage)["axes"]["total"]["max"]
        chain = [manifest.spec(n) for n in manifest.vision_chain if n in runners]
        self.vision = VisionEncoder(runners, [] if "vision" in runners else chain)

    @classmethod
    def from_artifacts(
        cls,
        folder: str | Path,
        backend: str = "onnxruntime",
        precision: str | None = None,
        vision: str = "auto",
        decoder: str = "auto",
        **options,
    ) -> FilaPipeline:
        """Load an export (each file hash-checked as it is opened). ``vision``: the ``fused``
        graph, the ``modular`` chain, ``none`` (text only: the LLM's memory alone), or ``auto``
        (``vision_mode``). ``decoder``: ``gqa`` (ONNX Runtime's in-place GroupQueryAttention
        graph), ``portable`` (standard ONNX, the TensorRT one), or ``auto``: the graph the
        manifest made for this backend."""
        if vision not in VISION_MODES:
            raise FilaError(f"vision must be one of {', '.join(VISION_MODES)}, got {vision!r}")
        manifest = Manifest.load(folder)
        decoder_stage = choose_decoder(manifest, backend, decoder)
        chain = manifest.vision_chain
        if vision == "auto":
            vision = vision_mode(manifest, backend, precision, options.get("providers"))
        if vision == "modular" and "projector" not in chain:
            raise FilaError("this export has no modular vision stages; use vision='fused'")
        stages = {"fused": ["vision"], "modular": chain, "none": []}[vision]
        names = ["embed", decoder_stage, *stages]
        runners = load_runners(manifest, names, backend, precision, **options)
        try:
            return cls(manifest, runners, prompt_builder(manifest), backend, decoder_stage)
        except BaseException:
            with contextlib.suppress(Exception):
                close_runners(runners)
            raise

    # --- a request: images and prompt -> the decoder's input --------------------------------
    @property
    def image_token_id(self) -> int:
        return self.prompts.image_token_id

    @property
    def eos_ids(self) -> list[int]:
        return self.prompts.eos_token_ids

    def preprocess(self, source) -> PreprocessedImage:
        return preprocess(load_image(source), self.preprocess_config)

    def run_vision(self, image: PreprocessedImage) -> np.ndarray:
        """Projected tile features (tiles, n*n, D) from the fused graph or the modular chain."""
        return self.vision(image)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.runners["embed"].infer({"input_ids": ids})["inputs_embeds"]

    def prompt_embeds(
        self, ids: Sequence[int], images: Sequence[PreprocessedImage], features: Sequence
    ) -> np.ndarray:
        """(1, len(ids), D): token embeddings with each image's packed features written at its
        image-token positions (``features``: the vision output of each image)."""
        packed = [pack(f, im, self.newline) for f, im in zip(features, images, strict=True)]
        return self.packed_embeds(ids, packed)

    def packed_embeds(self, ids: Sequence[int], packed: Sequence[np.ndarray]) -> np.ndarray:
        """(1, len(ids), D): token embeddings, the images' packed rows at the image tokens."""
        id_array = np.asarray([ids], dtype=np.int64)
        embeds = self.embed(id_array)
        if packed:
            embeds[0, id_array[0] == self.image_token_id] = np.concatenate(packed)
        return embeds

    def new_decoder(self, max_len: int, batch: int = 1, runner=None) -> Decoder:
        """A decoder with its cache for ``max_len`` positions, on this pipeline's decoder (or on
        ``runner``, another variant of it, as the accuracy report compares)."""
        return Decoder(
            runner or self.runners[self.decoder_stage], self.decoder_shape, batch, max_len
        )

    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        need = prompt_len + max_new_tokens
        if need > self.max_context:
            raise ContextOverflowError(
                f"prompt with image tokens is {prompt_len} tokens; with {max_new_tokens} new "
                f"tokens that is {need}, {need - self.max_context} over the context of "
                f"{self.max_context}; shorten the prompt, lower --max-new-tokens, or use a "
                "smaller image"
            )

    def image_features(self, source, reuse: Reuse | None = None) -> ImageFeatures:
        """One image preprocessed (its token count known), or its packed features straight
        from the feature cache when ``reuse`` has one holding this content; ``encode`` runs
        the vision stages on the rest (after the context is checked)."""
        cache = reuse.features if reuse is not None else None
        key = content_key(source) if cache is not None else ""
        if cache is not None and (found := cache.get(key)) is not None:
            return ImageFeatures(found, key)
        t0 = time.perf_counter()
        image = self.preprocess(source)
        return ImageFeatures(None, key, time.perf_counter() - t0, image=image)

    def encode(self, features: Sequence[ImageFeatures], reuse: Reuse | None = None) -> None:
        """Run vision for the images not taken from the cache, and cache their features."""
        cache = reuse.features if reuse is not None else None
        for f in features:
            if f.packed is not None:
                continue
            t0 = time.perf_counter()
            f.packed = pack(self.run_vision(f.image), f.image, self.newline)
            f.vision_s, f.image = time.perf_counter() - t0, None
            if cache is not None:
                cache.put(f.key, f.packed)

    def generate(
        self,
        images,
        prompt: str,
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        raw_prompt: bool = False,
        history: Sequence[tuple[str, str]] = (),
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
        reuse: Reuse | None = None,
        **sampling_options,
    ) -> GenerationResult:
        """Answer ``prompt`` about one image (path, bytes, PIL image, array) or a list of them.
        Sampling comes as ``sampling`` or as its fields (``temperature=0.7, top_p=0.9, ...``);
        ``ignore_eos`` generates exactly ``max_new_tokens`` (benchmarks, accuracy reports);
        ``reuse`` (``runtime.reuse.Reuse``) skips images and prompt prefixes seen before."""
        params = sampling or SamplingParams(**sampling_options)
        check_max_new_tokens(max_new_tokens)
        sources = list(images) if isinstance(images, list | tuple) else [images]
        features = [self.image_features(im, reuse) for im in sources]
        prompt_ids, ids = self.prompts.request_ids(
            prompt, [f.num_tokens for f in features], raw=raw_prompt, history=history
        )
        request = Request(prompt_ids, ids, features, max_new_tokens, params, tuple(stop))
        return self.answer(request, on_text, ignore_eos, reuse)

    def answer(
        self,
        request: Request,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
        reuse: Reuse | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Prefill (only after the longest cached prefix, with ``reuse``) and decode one
        request whose images are preprocessed or encoded; ``should_stop``: asked every step."""
        ids, features = request.ids, request.features
        embeds, timings = self.request_embeds(request, reuse)
        prefixes = reuse.prefixes if reuse is not None and self.backend != "tensorrt" else None
        need = len(ids) + request.max_new_tokens
        decoder, cached, keys = None, 0, []
        if prefixes is not None:
            counts = [len(f.packed) for f in features]
            keys = position_keys(ids, self.image_token_id, [f.key for f in features], counts)
            decoder, cached = prefixes.take(keys, need)
        decoder = decoder or self.new_decoder(need if prefixes is None else self.room(need))
        out = generate(
            decoder,
            self.embed,
            embeds,
            np.ones((1, len(ids)), dtype=np.int64),
            request.max_new_tokens,
            request.sampling,
            () if ignore_eos else self.eos_ids,
            request.stop,
            self.prompts.decode,
            on_text,
            cached=cached,
            should_stop=should_stop,
        )
        if prefixes is not None:
            prefixes.put(keys + out.token_ids[0], decoder)
        before = sum(timings.values())
        timings |= {
            "ttft_s": before + out.ttft_s,
            "prefill_s": out.ttft_s,
            "decode_s": out.decode_s,
            "decode_tokens_per_s": out.decode_tokens_per_s,
            "cached_positions": cached,
        }
        result = GenerationResult(
            out.texts[0], out.token_ids[0], request.prompt_ids, timings, self.backend
        )
        result.peak_rss_mb = peak_rss_bytes() / 2**20
        return result

    def request_embeds(self, request: Request, reuse: Reuse | None = None) -> tuple:
        """The prompt's embeddings (1, n, D) with its images' features (encoded now unless
        cached), after checking it fits the context; and the time each part took."""
        self.check_context(len(request.ids), request.max_new_tokens)  # before any model runs
        features = request.features
        self.encode(features, reuse)
        timings = {
            "preprocess_s": sum(f.preprocess_s for f in features),
            "vision_s": sum(f.vision_s for f in features),
        }
        t0 = time.perf_counter()
        embeds = self.packed_embeds(request.ids, [f.packed for f in features])
        timings["embed_s"] = time.perf_counter() - t0
        return embeds, timings

    def room(self, need: int) -> int:
        """A reusable decoder's length: room for a few more turns, within the context."""
        return min(self.max_context, need + REUSE_HEADROOM)

    def close(self) -> None:
        """Release every runner (sessions, engines, device buffers and caches)."""
        runners, self.runners = self.runners, {}
        close_runners(runners)

    def __enter__(self) -> FilaPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
