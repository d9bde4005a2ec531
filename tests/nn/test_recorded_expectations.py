"""vqfast.nn against vector-quantize-pytorch's recorded behaviour (tests/data/vq_pytorch_expectations.pt,
written by scripts/record_vq_expectations.py): runs without vector-quantize-pytorch installed. Each
case replays one training step from the recorded initial state, input, seed and output-gradient
weights, and compares quantized output, indices, loss, input and parameter gradients and the state
after the step. Where vector-quantize-pytorch is installed, the recording is re-made and compared,
so it cannot silently go stale."""
import importlib.util
from pathlib import Path

import pytest
import torch

import vqfast.nn
from tests.nn.compare import TOL

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "tests" / "data" / "vq_pytorch_expectations.pt"


def _load_script():
    spec = importlib.util.spec_from_file_location("record_vq_expectations", ROOT / "scripts" / "record_vq_expectations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()
recording = torch.load(RECORDING, weights_only=True)


def assert_close_tree(ours, expected, where: str):
    """Same structure; floating tensors equal to TOL, integer and boolean ones exactly."""
    if isinstance(expected, dict):
        assert isinstance(ours, dict) and list(ours) == list(expected), f"{where}: {list(ours)} != {list(expected)}"
        for key in expected:
            assert_close_tree(ours[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, torch.Tensor):
        assert ours.shape == expected.shape and ours.dtype == expected.dtype, where
        if expected.is_floating_point():
            torch.testing.assert_close(ours, expected, **TOL, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(ours, expected), where
    else:
        assert ours == expected, where


def test_recording_covers_the_cases():
    assert recording["format"] == script.FORMAT_VERSION
    assert list(recording["cases"]) == list(script.CASES)
    for name, (cls_name, kwargs, forward_kwargs, shape) in script.CASES.items():
        case = recording["cases"][name]
        assert case["layer"] == cls_name and case["kwargs"] == kwargs, name
        assert tuple(case["input"].shape) == shape, name
        assert_close_tree(case["forward_kwargs"], forward_kwargs, name)
    assert RECORDING.stat().st_size < 300 * 1024


@pytest.mark.parametrize("name", list(recording["cases"]))
def test_matches_recording(name):
    case = recording["cases"][name]
    layer = getattr(vqfast.nn, case["layer"])(**case["kwargs"])
    layer.load_state_dict(case["initial_state"])  # strict: the same names and shapes
    result = script.training_step(layer, case["input"], case["out_grad"], case["forward_kwargs"], case["seed"])
    for key, value in result.items():
        assert_close_tree(value, case[key], f"{name}.{key}")


def test_recording_is_current():
    """The recording is what the installed vector-quantize-pytorch produces now."""
    pytest.importorskip("vector_quantize_pytorch")
    import importlib.metadata
    installed = importlib.metadata.version("vector-quantize-pytorch")
    assert recording["vector_quantize_pytorch"] == installed, (
        f"recorded with vector-quantize-pytorch {recording['vector_quantize_pytorch']}, {installed} installed: "
        f"re-run scripts/record_vq_expectations.py")
    fresh = script.record()
    assert_close_tree(fresh["cases"], recording["cases"], "recording")
