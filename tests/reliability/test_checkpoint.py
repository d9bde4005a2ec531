"""Safe checkpoint loading (vqfast/checkpoint.py): round trips, refusal of pickles that
carry code, truncated and corrupt files, all-or-nothing load_into, and the Lightning /
LlamaGen wrappers."""
import os
import pickle
import warnings
import random

import numpy as np
import pytest
import torch

from vqfast.checkpoint import (CheckpointError, load_into, load_state_dict, load_training_state,
                               save_state_dict, save_training_state)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same(state, module):
    now = module.state_dict()
    assert state.keys() == now.keys()
    for k, v in state.items():
        assert torch.equal(v, now[k]), k


class _WritesMarker:
    """A pickle payload that would run code on load: it creates a marker file."""

    def __init__(self, marker, via="open"):
        self.marker, self.via = str(marker), via

    def __reduce__(self):
        if self.via == "exec":
            return (exec, (f"open({self.marker!r}, 'w').close()",))
        return (open, (self.marker, "w"))


@pytest.fixture
def sd():
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(4, 6, generator=g), "b": torch.randn(6, generator=g).double(),
            "n": torch.randint(0, 9, (3,), generator=g), "h": torch.randn(2, 2, generator=g).half()}


def _assert_sd_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip(tmp_path, sd, fmt):
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_state_dict(sd, path)
    else:
        torch.save(sd, path)
    _assert_sd_equal(load_state_dict(path), sd)
    _assert_sd_equal(load_state_dict(str(path)), sd)


def test_save_handles_views_and_shared_storage(tmp_path):
    base = torch.randn(6, 4)
    sd = {"a": base, "tied": base, "t": base.T, "row": base[2]}
    save_state_dict(sd, tmp_path / "w.safetensors")
    out = load_state_dict(tmp_path / "w.safetensors")
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


@pytest.mark.parametrize("via", ["open", "exec"])
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_pickle_with_code_is_refused_and_not_run(tmp_path, how, via):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    payload = {"w": torch.randn(3), "boom": _WritesMarker(marker, via)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Detected pickle protocol 4"
        load_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg and "not a weights-only checkpoint" in msg and "safetensors" in msg
    assert not marker.exists(), "loading ran the pickle's code"
    module = _model()
    before = _snapshot(module)
    with pytest.raises(CheckpointError):
        load_into(module, path)
    assert not marker.exists()
    _assert_same(before, module)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "legacy_pt"])
@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "flipped_header"])
def test_damaged_file_names_the_file(tmp_path, fmt, damage):
    module = _model()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_state_dict(module.state_dict(), path)
    else:
        torch.save(module.state_dict(), path, _use_new_zipfile_serialization=(fmt == "pt"))
    data = path.read_bytes()
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "random_bytes":
        data = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    else:
        data = bytes(b ^ 0x5A for b in data[:16]) + data[16:]
    path.write_bytes(data)
    before = _snapshot(module)
    with pytest.raises(CheckpointError) as info:
        load_into(module, path)
    assert str(path) in str(info.value)
    _assert_same(before, module)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_state_dict(tmp_path / "absent.safetensors")


def test_load_into_is_all_or_nothing(tmp_path):
    src, dst = _model(1), _model(2)
    sd = dict(src.state_dict())
    sd["2.weight"] = torch.randn(3, 8)  # the last tensor has the wrong shape
    path = tmp_path / "bad.safetensors"
    save_state_dict(sd, path)
    before = _snapshot(dst)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*2\.weight"):
        load_into(dst, path)
    _assert_same(before, dst)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(dst, path, strict=False)  # shapes are checked even when keys may differ
    _assert_same(before, dst)
    # strict: a missing key refuses the whole load
    del sd["2.weight"], sd["2.bias"]
    sd_missing = {k: v for k, v in src.state_dict().items() if not k.startswith("2.")}
    save_state_dict(sd_missing, path)
    with pytest.raises(CheckpointError, match="missing key"):
        load_into(dst, path)
    _assert_same(before, dst)
    result = load_into(dst, path, strict=False)
    assert sorted(result.missing_keys) == ["2.bias", "2.weight"] and result.unexpected_keys == []
    for k, v in sd_missing.items():
        assert torch.equal(dst.state_dict()[k], v)


def test_load_into_good_file(tmp_path):
    src, dst = _model(1), _model(2)
    save_state_dict(src.state_dict(), tmp_path / "m.safetensors")
    result = load_into(dst, tmp_path / "m.safetensors")
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same(_snapshot(src), dst)


def test_lightning_and_llamagen_wrappers(tmp_path):
    src = _model(3)
    inner = {f"model.{k}": v for k, v in src.state_dict().items()}
    lightning = {"state_dict": inner, "epoch": 3, "global_step": 120, "optimizer_states": [],
                 "lr_schedulers": [], "callbacks": {"x": 1}}
    torch.save(lightning, tmp_path / "last.ckpt")
    out = load_state_dict(tmp_path / "last.ckpt")
    assert set(out) == set(inner)  # the non-tensor entries are dropped, the weights unwrapped
    dst = _model(4)
    load_into(dst, tmp_path / "last.ckpt", prefix_map={"model.": ""})
    _assert_same(_snapshot(src), dst)

    ema = _model(5)
    llamagen = {"model": src.state_dict(), "ema": ema.state_dict(), "steps": 10,
                "optimizer": torch.optim.Adam(src.parameters()).state_dict()}
    torch.save(llamagen, tmp_path / "0010000.pt")
    load_into(dst, tmp_path / "0010000.pt")  # default: "model"
    _assert_same(_snapshot(src), dst)
    load_into(dst, tmp_path / "0010000.pt", key="ema")
    _assert_same(_snapshot(ema), dst)
    with pytest.raises(CheckpointError, match="key='nope'"):
        load_state_dict(tmp_path / "0010000.pt", key="nope")
    # an already-loaded mapping works the same
    assert set(load_state_dict(llamagen, key="ema")) == set(ema.state_dict())


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="source"):
        load_state_dict(3)
    with pytest.raises(TypeError, match="module"):
        load_into("not a module", tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="tensors"):
        save_state_dict({"a": 1}, tmp_path / "x.safetensors")


def test_training_state_round_trip(tmp_path):
    model = _model(6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 5)).square().mean().backward()
        opt.step()
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    save_training_state(tmp_path / "run", model=model, optimizers={"main": opt}, step=2,
                        config={"lr": 1e-2, "name": "x"}, extra={"best": torch.tensor(0.5), "epoch": 1})
    expected = (torch.rand(4), random.random(), np.random.rand())
    # weights_only=True reads the training state: nothing in it needs unpickling code
    torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)

    model2 = _model(7)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    torch.manual_seed(99)
    step, config, extra = load_training_state(tmp_path / "run", model=model2, optimizers={"main": opt2})
    assert step == 2 and config == {"lr": 1e-2, "name": "x"} and extra["epoch"] == 1
    assert torch.equal(extra["best"], torch.tensor(0.5))
    _assert_same(_snapshot(model), model2)
    got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in s1:
        for k in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k]))


def test_training_state_refuses_mismatch_before_touching_anything(tmp_path):
    model = _model(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_training_state(tmp_path, model=model, optimizers={"main": opt}, step=1, config={})
    other = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 4))
    before = _snapshot(other)
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_training_state(tmp_path, model=other, optimizers={"main": opt_other})
    _assert_same(before, other)
    with pytest.raises(CheckpointError, match="no state for optimizer"):
        load_training_state(tmp_path, model=_model(1), optimizers={"disc": opt})
    with pytest.raises(TypeError, match="config"):
        save_training_state(tmp_path, model=model, optimizers={}, step=1, config={"f": object()})
    with pytest.raises(TypeError, match="extra"):
        save_training_state(tmp_path, model=model, optimizers={}, step=1, config={}, extra={"f": _WritesMarker("m")})
    assert not os.path.exists("m")
