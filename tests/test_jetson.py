"""Board facts from tegrastats lines and /etc/nv_tegra_release, parsed without a board."""

from pathlib import Path

import pytest

from benchmarks.machine import power_summary
from runtime.jetson import PowerError, l4t_release, parse_tegrastats

pytestmark = pytest.mark.board

LINES = Path(__file__).parent / "fixtures" / "tegrastats"


def line(name: str) -> str:
    return (LINES / f"{name}.txt").read_text().strip()


def test_orin_nano_power_is_the_module_input_rail_alone():
    sample = parse_tegrastats(line("orin-nano"))
    assert sample.module == "Orin Nano / Orin NX"
    assert sample.board_mw == 7123.0  # current reading, not the running average (6810)
    assert sample.rails == {"VDD_IN": 7123}
    assert (sample.gr3d_pct, sample.emc_pct) == (87.0, 12.0)


def test_agx_orin_power_is_the_sum_of_its_three_module_rails():
    sample = parse_tegrastats(line("agx-orin"))
    assert sample.module == "AGX Orin"
    assert sample.board_mw == 14213.0 + 1989.0 + 4226.0  # VDDQ_VDD2_1V8AO is not added
    assert sample.gr3d_pct == 95.0


@pytest.mark.parametrize(
    ("board", "hand_summed_mw"),
    [("orin-nano", 7123.0), ("orin-nx", 12840.0), ("agx-orin", 14213.0 + 1989.0 + 4226.0)],
)
def test_board_power_and_energy_per_token_are_the_hand_summed_rails(board, hand_summed_mw):
    summary = power_summary([line(board)] * 3, seconds=2.0, tokens=40)
    assert summary["avg_power_w"] == pytest.approx(hand_summed_mw / 1000)
    assert summary["joules_per_token"] == pytest.approx(hand_summed_mw / 1000 * 2.0 / 40)
    assert summary["joules_per_token"] > 0


def test_unknown_rails_are_an_error_naming_what_was_found_never_zero_watts():
    with pytest.raises(PowerError, match="POM_5V_IN"):
        parse_tegrastats(line("xavier"))
    with pytest.raises(PowerError, match="found none"):
        parse_tegrastats("RAM 100/200MB CPU [1%@100]")


def test_l4t_release_maps_to_its_jetpack():
    text = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n"
    release = l4t_release(text)
    assert (release.major, release.minor, release.version) == (36, 4, "36.4")
    assert release.jetpack == "6.1/6.2"
    assert l4t_release("# R99 (release), REVISION: 1.0").jetpack is None
    assert l4t_release("not a release file") is None
