"""Which graph runs: a stage's variant from a precision spec, and the decoder graph for a backend.

Both read what the manifest declares (each stage's variants and the backends that can run it), so
the runtime, ``fila build``, ``fila validate``, calibration and the benchmark pick alike.

A precision spec is ``fp16`` (every stage that has it, fp32 for the rest), a preference list
``int8,w4`` (each stage takes the first it has), or per stage or group ``vision=int8,decoder=w4``
(``vision`` covers the fused graph and every modular vision stage, ``decoder`` every decoder
graph); the forms mix (``fp16,decoder=w4``). ``+`` separates like ``,`` (``int8+w4``: one item of
a comma-separated list, such as ``fila bench --precisions fp32,int8+w4``). A name that matches no
variant of the export is an error, not a silent fp32 run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from runtime.backends import fp16_on_cpu
from runtime.errors import FilaError, ManifestError

GROUPS = ("vision", "embed", "decoder")
# Weight-only LLM variants (``fila calibrate --llm``): bits per weight, and the default block of
# weights that share one scale (llama.cpp Q4_0's).
WEIGHT_ONLY_BITS = {"w8": 8, "w4": 4}
WEIGHT_ONLY_BLOCK = 32
DECODER_CHOICES = ("auto", "gqa", "portable")


class PrecisionError(FilaError):
    """A precision spec is malformed or names a stage or variant the export does not have."""


def group_of(stage: str) -> str:
    """``vision``, ``embed`` or ``decoder``: the group a stage answers to in a precision spec."""
    if stage.startswith("decoder"):
        return "decoder"
    return "embed" if stage == "embed" else "vision"


@dataclass
class PrecisionSpec:
    defaults: list[str] = field(default_factory=list)
    named: dict[str, str] = field(default_factory=dict)  # stage or group -> variant
    text: str = "fp32"
    base: str = "fp32"  # what a stage runs when the spec picks none of its variants

    @classmethod
    def parse(cls, text: str | None, base: str = "fp32") -> PrecisionSpec:
        """Read a spec; ``None`` or empty means the export's base precision everywhere."""
        spec = cls(text=text or base, base=base)
        for item in (part.strip() for part in (text or "").replace("+", ",").split(",")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq:
                spec.defaults.append(item)
            elif not key.strip() or not value.strip():
                raise PrecisionError(f"precision {text!r}: {item!r} is not STAGE=PRECISION")
            else:
                spec.named[key.strip()] = value.strip()
        return spec

    def check(self, variants: Mapping[str, Sequence[str]]) -> None:
        """Refuse names that match nothing in an export (``variants``: stage -> its variants)."""
        stages = list(variants)
        unknown = [k for k in self.named if k not in (*GROUPS, *stages)]
        if unknown:
            raise PrecisionError(
                f"precision {self.text!r} names {', '.join(unknown)}, which is not a stage; use "
                f"{', '.join(GROUPS)} or one of {', '.join(stages)}"
            )
        have = sorted({v for vs in variants.values() for v in vs})
        for precision in self.defaults:
            if precision not in have:
                raise PrecisionError(
                    f"precision {precision!r} is not a variant of any stage of this export (it "
                    f"has {', '.join(have)}); pick one of those, or make it with fila export "
                    "--precision fp16 / fila calibrate"
                )
        for key, precision in self.named.items():
            covered = [s for s in stages if s == key or group_of(s) == key]
            if not any(precision in variants[s] for s in covered):
                options = sorted({v for s in covered for v in variants[s]})
                raise PrecisionError(
                    f"precision {key}={precision}: no {key} stage has a {precision} variant (they "
                    f"have {', '.join(options)})"
                )

    def variant(self, stage: str, variants: Sequence[str]) -> str:
        """The variant ``stage`` runs, given the variants it has."""
        wanted = self.named.get(stage, self.named.get(group_of(stage)))
        if wanted is not None:
            if wanted in variants:
                return wanted
            warnings.warn(
                f"stage {stage} has no {wanted} variant (it has {', '.join(variants)}); "
                f"running it in {self.base}",
                stacklevel=3,
            )
            return self.base
        return next((p for p in self.defaults if p in variants), self.base)


def stage_variants(manifest) -> dict[str, list[str]]:
    return {name: list(entry["variants"]) for name, entry in manifest.stages.items()}


def precision_spec(manifest, spec: str | PrecisionSpec | None) -> PrecisionSpec:
    """``spec`` read against this export: its base precision (fp32, or fp16 for a ``--dtype fp16``
    export) fills in, and names that match nothing are refused."""
    if not isinstance(spec, PrecisionSpec):
        spec = PrecisionSpec.parse(spec, manifest.data.get("dtype", "fp32"))
    spec.check(stage_variants(manifest))
    return spec


def choose_variant(manifest, spec: str | PrecisionSpec | None, stage: str) -> str:
    """The variant of ``stage`` that ``spec`` picks in this export (spec checked first)."""
    return precision_spec(manifest, spec).variant(stage, manifest.variants_for(stage))


def stage_variant(manifest, spec: PrecisionSpec, stage: str, backend: str) -> str:
    """The variant of ``stage`` that ``spec`` picks on ``backend``. Where several variants hold
    the precision picked (their entries' ``precision``), one that met its accuracy gate, then
    the one made for the fewest backends runs: on ONNX Runtime, a convolution stage's
    ``int8-cpu`` layout rather than the ``int8`` TensorRT layout (as ``decoder_gqa`` rather than
    ``decoder``)."""
    runnable = manifest.variants_for(stage, backend)
    chosen = spec.variant(stage, runnable)
    entries = {v: manifest.variant(stage, v) for v in runnable}
    default = manifest.stage(stage).get("backends", ["onnxruntime", "tensorrt"])
    same = [v for v in runnable if v == chosen or entries[v].get("precision") == chosen]
    if not same:
        raise PrecisionError(
            f"stage {stage} has no {chosen} variant that runs on {backend} (it has "
            f"{', '.join(runnable) or 'none'})"
        )

    def preference(v: str) -> tuple:  # validated first, then the narrowest, then the name asked
        failed = entries[v].get("validated") is False
        return failed, len(entries[v].get("backends", default)), v != chosen

    return min(same, key=preference)


def decoder_stages(manifest) -> list[str]:
    return [name for name in manifest.stages if group_of(name) == "decoder"]


def choose_decoder(manifest, backend: str, wanted: str = "auto") -> str:
    """The decoder graph to run on ``backend``: ``gqa`` (``decoder_gqa``), ``portable``
    (``decoder``), or ``auto``: of the decoder graphs the manifest says run on this backend, the
    one made for the fewest backends (``decoder_gqa`` on ONNX Runtime; the portable graph on
    TensorRT)."""
    if wanted not in DECODER_CHOICES:
        raise FilaError(f"decoder must be one of {', '.join(DECODER_CHOICES)}, got {wanted!r}")
    runs = {name: manifest.spec(name).backends for name in decoder_stages(manifest)}
    if wanted == "auto":
        usable = [name for name, backends in runs.items() if backend in backends]
        if not usable:
            have = ", ".join(f"{n} ({'/'.join(b)})" for n, b in runs.items()) or "none"
            raise ManifestError(
                f"no decoder graph of this export runs on {backend} (it has {have})"
            )
        return min(usable, key=lambda name: (len(runs[name]), name))
    name = "decoder_gqa" if wanted == "gqa" else "decoder"
    if name not in runs:
        raise ManifestError(
            f"this export has no {name} stage (its LLM type is not supported by it, or it was "
            f"not exported); use --decoder {'portable' if wanted == 'gqa' else 'auto'}"
        )
    if backend not in runs[name]:
        raise FilaError(
            f"decoder '{wanted}' ({name}) runs on {', '.join(runs[name])} only; use --decoder auto"
        )
    return name


def vision_mode(manifest, backend: str, precision, providers=None) -> str:
    """``modular`` where the fused graph and every chain stage would run fp16 on ONNX Runtime's
    CPU provider (each stage's weights are cast to fp32 while it runs: one stage at a time holds
    them, not the whole encoder; ``edge`` w4 run peak 5.5 -> 3.4 GB with per-run sessions) or
    where there is no fused graph; else the ``fused`` graph (an int8 one, say, that the chain lacks)."""
    chain = manifest.vision_chain
    if "projector" not in chain:
        return "fused"
    if "vision" not in manifest.stages:
        return "modular"
    if backend != "onnxruntime":
        return "fused"
    spec = precision_spec(manifest, precision)
    with warnings.catch_warnings():  # a stage lacking the spec's variant: load_runners says so
        warnings.simplefilter("ignore")
        picked = {s: stage_variant(manifest, spec, s, backend) for s in ("vision", *chain)}
    fp16 = all(fp16_on_cpu(s, v, providers) for s, v in picked.items())
    return "modular" if fp16 else "fused"
