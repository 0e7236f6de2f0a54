"""``fila doctor`` on recorded machine facts: healthy machines pass, each known problem gets its fix."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fila_export.cli import main
from runtime.doctor import Facts, diagnose

pytestmark = pytest.mark.board

MACHINES = Path(__file__).parent / "fixtures" / "machines"
ROOT = Path(__file__).resolve().parent.parent
TABLES = ("10.3", "10.x")


def facts(name: str, **changes) -> Facts:
    return replace(Facts(**json.loads((MACHINES / f"{name}.json").read_text())), **changes)


def errors(found) -> list:
    return [f for f in found if f.level == "error"]


@pytest.mark.parametrize("machine", ["orin-nano-jp6", "agx-orin-jp6", "cpu-only"])
def test_a_machine_set_up_as_documented_has_no_errors(machine):
    found = diagnose(facts(machine), TABLES)
    assert errors(found) == []
    assert {f.topic for f in found} >= {"platform", "onnxruntime", "tensorrt", "memory"}


def test_board_facts_are_reported_with_power_from_the_right_rails():
    nano = {f.topic: f for f in diagnose(facts("orin-nano-jp6"), TABLES)}
    assert "JetPack 6.1/6.2" in nano["platform"].message
    assert "VDD_IN = 7.1 W" in nano["power rails"].message
    agx = {f.topic: f for f in diagnose(facts("agx-orin-jp6"), TABLES)}
    assert "VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 = 20.4 W" in agx["power rails"].message


BOARD = {**json.loads((MACHINES / "orin-nano-jp6.json").read_text())["packages"]}
PROBLEMS = {
    "numpy 2 on JetPack 6": (dict(packages=BOARD | {"numpy": "2.1.0"}), "numpy", "numpy<2"),
    "PyPI's CPU onnxruntime next to the GPU one": (
        dict(packages=BOARD | {"onnxruntime": "1.32.0"}),
        "onnxruntime",
        "reinstall onnxruntime-gpu alone",
    ),
    "PyPI's CPU onnxruntime alone": (
        dict(
            packages={k: v for k, v in BOARD.items() if k != "onnxruntime-gpu"}
            | {"onnxruntime": "1.32.0"},
            ort_providers=["CPUExecutionProvider"],
        ),
        "onnxruntime",
        "jetson-ai-lab",
    ),
    "cuda-python for CUDA 13 on CUDA 12.6": (
        dict(packages=BOARD | {"cuda-python": "13.0.1"}),
        "cuda-python",
        "cuda-python>=12.6,<12.7",
    ),
    "cuda-python 12.9 on CUDA 12.6 (what >=12.6,<13 resolved to)": (
        dict(packages=BOARD | {"cuda-python": "12.9.4"}),
        "cuda-python",
        "cuda-python>=12.6,<12.7",
    ),
    "TensorRT invisible in a venv": (dict(tensorrt=None), "tensorrt", "--system-site-packages"),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_each_board_problem_is_an_error_with_its_fix(problem):
    changes, topic, fix = PROBLEMS[problem]
    found = errors(diagnose(facts("orin-nano-jp6", **changes), TABLES))
    assert [f.topic for f in found] == [topic]
    assert fix in found[0].fix


def test_the_constraints_file_doctor_names_exists_and_pins_the_board_stack():
    numpy = errors(diagnose(facts("orin-nano-jp6", packages=BOARD | {"numpy": "2.1.0"}), TABLES))
    assert "constraints/jetpack6.txt" in numpy[0].fix
    lines = (ROOT / "constraints" / "jetpack6.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith("#")]
    assert pins == ["numpy<2", "cuda-python>=12.6,<12.7"]
    cuda = facts("orin-nano-jp6", packages=BOARD | {"cuda-python": "12.6.2.post1"})
    assert errors(diagnose(cuda, TABLES)) == []


def test_warnings_name_their_fix():
    nano = facts(
        "orin-nano-jp6",
        nvpmodel="NV Power Mode: 15W\n0",
        meminfo="MemTotal: 7812548 kB\nMemAvailable: 5400000 kB\nSwapTotal: 0 kB\n",
        packages={k: v for k, v in BOARD.items() if k != "onnx"},
        tensorrt="10.7.0",
    )
    warned = {f.topic: f for f in diagnose(nano, TABLES) if f.level == "warn"}
    assert "jetson_clocks" in warned["power mode"].fix
    assert "swap" in warned["memory"].fix
    assert "pip install onnx" in warned["onnx"].fix
    assert "10.3" in warned["tensorrt"].message  # JetPack 6.2 ships 10.3


def test_an_unknown_power_line_is_an_error_not_zero_watts():
    found = errors(diagnose(facts("agx-orin-jp6", tegrastats="RAM 1/2MB POM_5V_IN 1/1"), TABLES))
    assert [f.topic for f in found] == ["power rails"]


def test_fila_doctor_runs_here_and_writes_json(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    code = main(["doctor", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == (1 if report["errors"] else 0)
    assert "platform" in capsys.readouterr().out
    assert report["facts"]["machine"]
