"""The TensorRT and cuda-python stand-ins (``tests/standins``): their surface is NVIDIA's, they
enforce the rules TensorRT documents, and the runner and build type-check against the stubs.

They prove the runner's and build's use of the API and the data flow; never TensorRT's numerics
or speed (the ``gpu`` tests are the proof on hardware)."""

from __future__ import annotations

import enum
import inspect
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT
from onnx import TensorProto, helper
from standins import cudart_standin, stubs, trt_standin

pytestmark = pytest.mark.board


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory):
    if stubs.installed() is None:
        pytest.fail(f"NVIDIA's tensorrt-stubs are not installed here: {stubs.FIX}")
    return stubs.repaired(tmp_path_factory.mktemp("trt-stubs"))


def public(cls) -> dict[str, object]:
    """What a stand-in class offers: its own public and dunder members (enum values too)."""
    skip = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__"}
    found = {
        k: v
        for k, v in vars(cls).items()
        if k not in skip and not (k.startswith("_") and not k.startswith("__"))
    }
    if issubclass(cls, enum.Enum):
        found = {k: v for k, v in found.items() if not k.startswith("__")}
        found |= dict(cls.__members__)
    return found


def signature_names(member) -> list[str] | None:
    func = member.fget if isinstance(member, property) else member
    if isinstance(func, staticmethod | classmethod):
        func = func.__func__
    if not inspect.isfunction(func):
        return None
    return [p for p in inspect.signature(func).parameters if p not in ("self", "this")]


def test_every_class_method_and_parameter_of_the_standin_is_in_nvidias_stubs(stub_dir):
    classes = stubs.stub_classes(stub_dir)
    own = {"standins.trt_standin", "standins.trt_build", "standins.trt_types"}
    offered = {
        name: value
        for name, value in vars(trt_standin).items()
        if not name.startswith("_")
        and name not in trt_standin.STANDIN_ONLY
        and getattr(value, "__module__", None) in own
    }
    assert set(offered) == set(trt_standin.__all__)
    assert {"Builder", "Runtime", "ICudaEngine", "IExecutionContext", "OnnxParser"} <= set(offered)
    problems = []
    for name, cls in offered.items():
        if name not in classes:
            problems.append(f"class {name} is not in the stubs")
            continue
        check_class(name, cls, classes, problems)
    assert trt_standin.__version__.startswith("10.13.0.35")  # the stubs' TensorRT
    assert not problems, "\n".join(problems)


def check_class(name: str, cls, classes: dict, problems: list[str]) -> None:
    stub = stubs.members(classes[name], classes)
    for member_name, member in public(cls).items():
        if isinstance(member, type) and f"{name}.{member_name}" in classes:
            check_class(f"{name}.{member_name}", member, classes, problems)
            continue
        if member_name not in stub:
            if member_name == "__init__" and "__init__" not in stub:
                continue  # made by TensorRT only (engines, contexts): no public constructor
            problems.append(f"{name}.{member_name} is not in the stubs")
            continue
        params, stub_params = signature_names(member), stub[member_name]
        if params is None or stub_params is None or "*" in stub_params:
            continue
        extra = [p for p in params if p not in stub_params]
        if extra:
            problems.append(f"{name}.{member_name}: parameter(s) {extra} not in {stub_params}")


def test_runner_and_build_type_check_against_the_stubs(stub_dir):
    """mypy, with TensorRT's types from NVIDIA's stubs: the engine, context, builder and config
    the runner and build hold are annotated, so a wrong call or argument is an error here."""
    pytest.importorskip("mypy")
    files = [
        "runtime/backends/tensorrt/runner.py",
        "runtime/backends/tensorrt/loader.py",
        "runtime/backends/tensorrt/memory.py",
        "fila_export/tensorrt/build.py",
    ]
    config = stub_dir / "mypy.ini"  # NVIDIA's stubs have errors of their own: not ours to report
    config.write_text("[mypy]\n[mypy-tensorrt_bindings.*]\nignore_errors = True\n")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-error-summary"]
    cmd += ["--follow-imports=silent", "--ignore-missing-imports"]
    cmd += ["--cache-dir", str(stub_dir / ".mypy_cache"), *files]
    env = {"MYPYPATH": str(stub_dir), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the rules it enforces, on a one-node graph ------------------------------------------------
def doubling_graph(path):
    """y = 2 x for x of shape (n, 4), n dynamic."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    node = helper.make_node("Mul", ["x", "two"], ["y"])
    model = helper.make_model(
        helper.make_graph([node], "double", [x], [y], [two]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def trt(monkeypatch):
    """The stand-ins under their real names, with nothing allocated."""
    import standins

    cudart_standin.reset()
    standins.install(monkeypatch_dict := {})
    for name, module in monkeypatch_dict.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield trt_standin
    cudart_standin.reset()


def build(trt, onnx_path, lo=(1, 4), hi=(8, 4)):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(onnx_path))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", lo, lo, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    return trt.Runtime(logger).deserialize_cuda_engine(plan)


def alloc(nbytes: int) -> int:
    err, ptr = cudart_standin.cudaMalloc(nbytes)
    assert err == 0
    return ptr


def test_a_correct_run_computes_the_graph(trt, tmp_path):
    engine = build(trt, doubling_graph(tmp_path / "g.onnx"))
    ctx = engine.create_execution_context()
    _, stream = cudart_standin.cudaStreamCreate()
    x, y = alloc(64), alloc(64)
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    cudart_standin.cudaMemcpy(x, data.ctypes.data, 32, 1)
    assert ctx.set_input_shape("x", (2, 4))
    assert tuple(ctx.get_tensor_shape("y")) == (2, 4)
    assert ctx.set_tensor_address("x", x) and ctx.set_tensor_address("y", y)
    assert ctx.execute_async_v3(int(stream))
    out = np.empty((2, 4), np.float32)
    cudart_standin.cudaMemcpy(out.ctypes.data, y, 32, 2)
    np.testing.assert_array_equal(out, 2 * data)


def test_a_misaligned_address_is_refused(trt, tmp_path):
    ctx = build(trt, doubling_graph(tmp_path / "g.onnx")).create_execution_context()
    ptr = alloc(256)
    with pytest.raises(trt.StandInViolation, match="not 256-byte aligned"):
        ctx.set_tensor_address("x", ptr + 64)


def test_an_unset_address_is_refused_at_execute(trt, tmp_path):
    ctx = build(trt, doubling_graph(tmp_path / "g.onnx")).create_execution_context()
    assert ctx.set_input_shape("x", (2, 4))
    ctx.set_tensor_address("x", alloc(32))
    with pytest.raises(trt.StandInViolation, match="no address for y"):
        ctx.execute_async_v3(0)


def test_a_buffer_too_small_for_the_shape_is_refused(trt, tmp_path):
    ctx = build(trt, doubling_graph(tmp_path / "g.onnx")).create_execution_context()
    assert ctx.set_input_shape("x", (8, 4))
    ctx.set_tensor_address("x", alloc(128))
    ctx.set_tensor_address("y", alloc(64))  # 8 x 4 fp32 needs 128
    with pytest.raises(trt.StandInViolation, match="run past the end"):
        ctx.execute_async_v3(0)


def test_shapes_outside_the_profile_fail_and_outputs_need_every_input_shape(trt, tmp_path):
    ctx = build(trt, doubling_graph(tmp_path / "g.onnx")).create_execution_context()
    with pytest.raises(trt.StandInViolation, match="before every input shape"):
        ctx.get_tensor_shape("y")
    assert ctx.set_input_shape("x", (9, 4)) is False  # the profile's max is 8
    assert ctx.set_input_shape("x", (2, 5)) is False  # a static dim
    assert ctx.set_input_shape("x", (2, 4))
    assert ctx.set_optimization_profile_async(0, 0)  # switching forgets the shapes
    assert ctx.infer_shapes() == ["x"]


def test_freed_memory_and_destroyed_streams_are_refused(trt, tmp_path):
    ctx = build(trt, doubling_graph(tmp_path / "g.onnx")).create_execution_context()
    ptr = alloc(64)
    cudart_standin.cudaFree(ptr)
    with pytest.raises(trt.StandInViolation, match="not in any live device allocation"):
        ctx.set_tensor_address("x", ptr)
    _, stream = cudart_standin.cudaStreamCreate()
    cudart_standin.cudaStreamDestroy(stream)
    with pytest.raises(trt.StandInViolation, match="not a live cudaStreamCreate stream"):
        ctx.execute_async_v3(int(stream))
    assert (
        cudart_standin.cudaFree(ptr)[0] == cudart_standin.cudaError_t.cudaErrorInvalidDevicePointer
    )


def test_a_plan_is_refused_when_its_onnx_changed_or_another_tensorrt_built_it(
    trt, tmp_path, monkeypatch
):
    path = doubling_graph(tmp_path / "g.onnx")
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    plan = build(trt, path).serialize()
    assert trt.Runtime(logger).deserialize_cuda_engine(plan) is not None
    monkeypatch.setattr(trt, "__version__", "10.3.0.30")
    assert trt.Runtime(logger).deserialize_cuda_engine(plan) is None
    monkeypatch.undo()
    path.write_bytes(path.read_bytes() + b"\n")
    assert trt.Runtime(logger).deserialize_cuda_engine(plan) is None
