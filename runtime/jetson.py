"""What a Jetson says about itself: its L4T release, and board power from ``tegrastats`` lines.

Power rails differ by module: Orin Nano and Orin NX report the whole module's input as
``VDD_IN``; AGX Orin has no such rail, and its module power is the sum of ``VDD_GPU_SOC``,
``VDD_CPU_CV`` and ``VIN_SYS_5V0``. A line with none of the known rail sets is an error, never a
silent 0 W.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import FilaError

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# module -> rails whose sum is the module's power (the first set found in a line wins)
RAIL_SETS = {
    "Orin Nano / Orin NX": ("VDD_IN",),
    "AGX Orin": ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),
}
RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?")
NOT_RAILS = {"RAM", "SWAP"}  # memory figures share the ``NAME used/total`` form
GR3D = re.compile(r"GR3D_FREQ (\d+)%")
EMC = re.compile(r"EMC_FREQ (\d+)%")
# JetPack releases by L4T major.minor (NVIDIA's release notes)
JETPACK = {
    "36.4": "6.1/6.2",
    "36.3": "6.0",
    "36.2": "6.0 DP",
    "35.6": "5.1.4",
    "35.5": "5.1.3",
    "38.2": "7.0",
}


class PowerError(FilaError):
    """A tegrastats line whose power rails we do not know how to add up."""


@dataclass(frozen=True)
class PowerSample:
    board_mw: float
    module: str
    rails: dict[str, int]
    gr3d_pct: float | None = None
    emc_pct: float | None = None


def parse_tegrastats(line: str) -> PowerSample:
    """Board power (sum of the module's rails, current readings) and GPU/EMC use of one line."""
    rails = {
        m.group(1): int(m.group(2)) for m in RAIL.finditer(line) if m.group(1) not in NOT_RAILS
    }
    for module, names in RAIL_SETS.items():
        if all(n in rails for n in names):
            gr3d, emc = GR3D.search(line), EMC.search(line)
            return PowerSample(
                float(sum(rails[n] for n in names)),
                module,
                {n: rails[n] for n in names},
                float(gr3d.group(1)) if gr3d else None,
                float(emc.group(1)) if emc else None,
            )
    known = "; ".join(f"{m}: {' + '.join(n)}" for m, n in RAIL_SETS.items())
    raise PowerError(
        f"tegrastats line has no known power rails (found {', '.join(rails) or 'none'}; known: "
        f"{known}): {line.strip()[:160]}"
    )


@dataclass(frozen=True)
class L4TRelease:
    major: int
    minor: int
    text: str

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def jetpack(self) -> str | None:
        return JETPACK.get(self.version)


def l4t_release(text: str | None = None) -> L4TRelease | None:
    """The L4T release (``# R36 (release), REVISION: 4.3, ...``), or None off a Jetson."""
    if text is None:
        if not TEGRA_RELEASE.is_file():
            return None
        text = TEGRA_RELEASE.read_text()
    first = text.splitlines()[0].strip() if text.strip() else ""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)", first)
    if not match:
        return None
    return L4TRelease(int(match.group(1)), int(match.group(2)), first)
