"""Safe checkpoint loading and saving, and resumable training state.

Nothing here unpickles code: ``.safetensors`` files go through safetensors, anything
else through ``torch.load(weights_only=True)``. A pickle that needs more than tensors
and plain containers is refused with :class:`CheckpointError`, as is a truncated or
corrupt file; the message names the file and the underlying reason.

* :func:`load_state_dict` -- a flat ``{name: tensor}`` from a path or a mapping, with
  Lightning's ``{"state_dict": ...}`` and LlamaGen's ``{"model": ..., "ema": ...}``
  unwrapped. Non-tensor entries are dropped.
* :func:`load_into` -- checks every key and shape against the module before copying
  anything, so a bad checkpoint leaves the module as it was.
* :func:`save_state_dict` -- safetensors, written atomically.
* :func:`save_training_state` / :func:`load_training_state` -- weights, config,
  optimizer states, step and every RNG state, so a resumed run matches the
  uninterrupted one bit for bit.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["CheckpointError", "load_state_dict", "load_into", "save_state_dict",
           "save_training_state", "load_training_state",
           "read_run_config", "MODEL_FILE", "CONFIG_FILE", "TRAINING_STATE_FILE", "CHECKPOINT_DIR"]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"
CHECKPOINT_DIR = "checkpoint"  # a run's --out holds its training state in this folder


def read_run_config(path, what: str, hint: str) -> tuple[str, dict]:
    """``(checkpoint folder, its config.json)`` of a run: ``path`` is the run's ``--out`` directory
    or its checkpoint folder. ``what`` and ``hint`` word the error when there is no config."""
    sub = os.path.join(path, CHECKPOINT_DIR)
    directory = sub if os.path.isdir(sub) else str(path)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{what}: {str(path)!r} holds no {CONFIG_FILE} ({hint})")
    with open(cfg_path) as f:
        return directory, json.load(f)

# Wrappers unwrapped by load_state_dict when key is None, in order of preference.
# Lightning keeps the weights under "state_dict"; LlamaGen keeps "model" and, when
# trained with EMA, "ema" beside it: "model" wins by default (the weights the
# optimizer trained), pass key="ema" for the averaged ones.
_WRAPPER_KEYS = ("state_dict", "model", "ema")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely: not weights-only, truncated, corrupt,
    or not matching the module it is loaded into."""


# ---- loading -------------------------------------------------------------------

def _not_weights_only(path, globals_) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a weights-only checkpoint; refusing to unpickle it, since it imports "
        f"{', '.join(globals_[:5])} and loading it could run arbitrary code. If you trust the file, convert it "
        f"once in a trusted environment: sd = torch.load({str(path)!r}, weights_only=False) "
        f"(unwrap sd['state_dict'] or sd['model'] if present); "
        f"vqfast.checkpoint.save_state_dict(sd, 'model.safetensors'), and load the .safetensors file.")


def _first_line(err) -> str:
    """The line of err's message that says what went wrong (torch's weights-only refusal
    wraps the reason in paragraphs of advice)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    specific = [line for line in lines if "Unsupported" in line or "unsupported" in line]
    text = specific[-1] if specific else (lines[0] if lines else "")
    return f"{type(err).__name__}: {text.removeprefix('WeightsUnpickler error: ')}".rstrip(": ")


def _load_file(path: Path, map_location):
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        device = str(map_location) if map_location is not None else "cpu"
        try:
            return load_file(str(path), device=device)
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(err)})") from err
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler refused the stream: either it names a global
        # (a class or function to import -- code), or the bytes are damaged. Its message
        # cannot tell which for a plain pickle, so read the opcodes without running them.
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise _not_weights_only(path, unsafe) from err
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(err)})") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(err)})") from err


# Globals torch.load(weights_only=True) itself accepts by default: tensors, storages and
# the containers a state dict is built from.
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode")
_SAFE_BUILTINS = {f"{module}.{name}" for module in ("builtins", "__builtin__")
                  for name in ("set", "frozenset", "bytearray", "slice", "complex", "range")}


def _unsafe_globals(path: Path) -> list[str]:
    """The globals the file's pickle(s) import outside weights-only's default set.

    Static: pickletools reads the opcodes and nothing is executed. A torch zip checkpoint's
    pickle is ``<archive>/data.pkl``; a legacy file or plain pickle is a run of pickles
    followed by raw storage bytes, so reading stops at the first opcode stream that does
    not parse.
    """
    import pickletools
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError, EOFError):
        return []
    stream, found = io.BytesIO(data), []
    for _ in range(8):  # a legacy torch file has five pickles before its raw bytes
        strings = []
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # damaged or not a pickle: what was read so far is the answer
            break
        if stream.tell() >= len(data):
            break
    return [g for g in found if not (g.startswith(_SAFE_GLOBAL_PREFIXES) or g in _SAFE_BUILTINS)]


def _unwrap(obj, key, where):
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a mapping of names to tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{where}: key={key!r} not in the checkpoint; its top-level keys are "
                                  f"{sorted(map(str, obj))[:20]}")
        obj = obj[key]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{where}: entry {key!r} is a {type(obj).__name__}, not a mapping of tensors")
        return obj
    for name in _WRAPPER_KEYS:
        inner = obj.get(name)
        if isinstance(inner, Mapping) and not isinstance(inner, torch.Tensor):
            return inner
    return obj


def load_state_dict(source, *, key: str | None = None, map_location="cpu") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` read safely from ``source``.

    source: a path (``*.safetensors`` via safetensors, anything else via
    ``torch.load(weights_only=True)``) or an already-loaded mapping.
    key: the entry holding the weights (e.g. ``"ema"`` in a LlamaGen checkpoint). By
    default ``"state_dict"`` (Lightning), then ``"model"``, then ``"ema"`` is unwrapped
    when present; otherwise the mapping itself is the state dict.
    Entries that are not tensors (Lightning's epoch counters, hyper-parameters) are dropped.

    Raises CheckpointError (a ValueError) naming the file when the file is not a
    weights-only checkpoint (a pickle that would import code), or is truncated or corrupt.
    """
    if isinstance(source, (str, os.PathLike)):
        where = Path(source)
        obj = _load_file(where, map_location)
    elif isinstance(source, Mapping):
        where, obj = "state dict", source
    else:
        raise TypeError(f"load_state_dict: source must be a path or a mapping of names to tensors, "
                        f"got {type(source).__name__}")
    obj = _unwrap(obj, key, where)
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _apply_prefix_map(sd, prefix_map):
    if not prefix_map:
        return sd
    out = {}
    for name, value in sd.items():
        for old, new in prefix_map.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = value
    return out


def load_into(module: torch.nn.Module, source, *, strict: bool = True, key: str | None = None,
              prefix_map: Mapping[str, str] | None = None):
    """Load ``source`` (see :func:`load_state_dict`) into ``module``, all or nothing.

    Every key and shape is checked against ``module.state_dict()`` before anything is
    copied, so on error the module is untouched. prefix_map renames keys first, the first
    matching prefix winning (e.g. ``{"model.": ""}`` for a Lightning module's ``self.model``).
    strict=True raises on missing or unexpected keys; strict=False reports them in the
    returned ``_IncompatibleKeys``. A shape mismatch always raises.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"load_into: module must be a torch.nn.Module, got {type(module).__name__}")
    where = source if isinstance(source, (str, os.PathLike)) else "state dict"
    sd = _apply_prefix_map(load_state_dict(source, key=key), prefix_map)
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)}, module {tuple(v.shape)}"
                 for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if bad_shape:
        problems.append(f"shape mismatch for {len(bad_shape)} tensor(s): " + "; ".join(bad_shape[:10]))
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {missing[:10]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {unexpected[:10]}")
    if problems:
        raise CheckpointError(f"{where}: does not match {type(module).__name__}; nothing was loaded. "
                              + " | ".join(problems))
    module.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


# ---- saving --------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then os.replace: a crash never leaves a half-written file at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path) -> None:
    """Save tensors to ``path`` as safetensors, atomically.

    Each tensor is detached, moved to the CPU and cloned contiguous, so views and tensors
    sharing storage (tied weights) save as independent copies, which safetensors requires.
    """
    from safetensors.torch import save_file
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"save_state_dict: state_dict must be a mapping of names to tensors, "
                        f"got {type(state_dict).__name__}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"save_state_dict: state_dict entries must be tensors; {bad[:5]} are not")
    tensors = {str(k): v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # An ndarray would need a non-default global to unpickle: store the keys as a tensor.
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def save_training_state(directory, *, model: torch.nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                        step: int, config: Mapping, extra: Mapping | None = None) -> None:
    """Write a resumable training state into ``directory``.

    ``model.safetensors`` (the weights), ``config.json`` (config, JSON-serializable) and
    ``training_state.pt``: step, each optimizer's state_dict, extra, and the torch CPU,
    CUDA, Python and NumPy RNG states, all readable by ``torch.load(weights_only=True)``.
    Each file is written atomically. extra must hold only tensors and plain containers.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"save_training_state: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizers, Mapping):
        raise TypeError("save_training_state: optimizers must be a dict of name -> torch.optim.Optimizer")
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"save_training_state: step must be an int, got {type(step).__name__}")
    directory = Path(directory)
    try:
        config_text = json.dumps(dict(config), indent=2, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"save_training_state: config must be JSON-serializable ({err})") from err
    state = {"step": step, "optimizers": {str(k): o.state_dict() for k, o in optimizers.items()},
             "rng": _rng_state(), "extra": dict(extra or {})}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:  # refuse to write a state we could not read back safely
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except pickle.UnpicklingError as err:
        raise TypeError(f"save_training_state: extra (or an optimizer state) holds objects that "
                        f"torch.load(weights_only=True) refuses ({_first_line(err)})") from err
    save_state_dict(model.state_dict(), directory / MODEL_FILE)
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text))
    _atomic_write(directory / TRAINING_STATE_FILE, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def _check_optimizer_state(opt, saved, where) -> None:
    """What Optimizer.load_state_dict checks, done before anything is restored."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, (list, tuple)) or len(groups) != len(opt.param_groups):
        raise CheckpointError(f"{where}: has {len(groups) if isinstance(groups, (list, tuple)) else 'no'} "
                              f"parameter groups, the optimizer {len(opt.param_groups)}")
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in opt.param_groups]:
        raise CheckpointError(f"{where}: parameter group sizes {sizes} do not match the optimizer's "
                              f"{[len(g['params']) for g in opt.param_groups]}")


def load_training_state(directory, *, model: torch.nn.Module, optimizers: Mapping[str, torch.optim.Optimizer]):
    """Restore what :func:`save_training_state` wrote: model weights, optimizer states and
    RNG states, in place. Returns ``(step, config, extra)``.

    Everything is read and checked before anything is restored, so a failure leaves the
    model, the optimizers and the RNGs as they were.
    """
    directory = Path(directory)
    state_path = directory / TRAINING_STATE_FILE
    state = _load_file(state_path, "cpu")
    if not isinstance(state, Mapping) or not {"step", "optimizers", "rng"} <= set(state):
        raise CheckpointError(f"{state_path}: not a vqfast training state (needs step, optimizers, rng)")
    missing = [k for k in optimizers if k not in state["optimizers"]]
    if missing:
        raise CheckpointError(f"{state_path}: no state for optimizer(s) {missing}; "
                              f"it has {sorted(state['optimizers'])}")
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_path}: unreadable config ({_first_line(err)})") from err
    for name, opt in optimizers.items():
        _check_optimizer_state(opt, state["optimizers"][name], f"{state_path} optimizer {name!r}")
    load_into(model, directory / MODEL_FILE)
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    _set_rng_state(state["rng"])
    return int(state["step"]), config, dict(state.get("extra") or {})
