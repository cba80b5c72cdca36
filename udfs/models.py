"""Filter-model resolution and the per-worker model cache.

A model is named the way open_clip users name it:

* an architecture + pretrained tag: ``ViT-B-32`` / ``openai``, ``ViT-H-14-quickgelu`` / ``dfn5b``;
* an ``hf-hub:org/repo`` id (or an open_clip ``local-dir:`` folder);
* an architecture (built in, or a custom config JSON such as ``conf/models/dfn-tiny.json``)
  + a local checkpoint (``.safetensors`` preferred; ``.pt``/``.pth``/``.bin`` are read with
  ``torch.load(weights_only=True)`` only).

:class:`ModelSpec` is resolved on the driver without importing torch; :func:`get_model` loads
it lazily on a worker and caches it there, so a model is never shipped from the driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SCHEMAS = ("hf-hub:", "local-dir:")

_CACHE: dict[tuple, LoadedModel] = {}
_LOCK = threading.Lock()
_HASHES: dict[tuple, str] = {}


@dataclass(frozen=True)
class ModelSpec:
    """A fully resolved, picklable model reference (absolute paths, no torch objects)."""

    arch: str  # open_clip model name, or an hf-hub:/local-dir: id
    pretrained: str | None = None  # tag, absolute weights path, or None (random init)
    config_path: str | None = None  # custom architecture JSON to register first
    model_id: str = ""

    @property
    def weights_file(self) -> str | None:
        """The local checkpoint path, if the weights come from a file."""
        if self.pretrained and Path(self.pretrained).is_absolute():
            return self.pretrained
        return None


@dataclass
class LoadedModel:
    """A model ready for inference on one device, with its own preprocessing and tokenizer."""

    spec: ModelSpec
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    embed_dim: int


def resolve(name: str, pretrained: str | None = None, model_id: str | None = None) -> ModelSpec:
    """Resolve config-style names and paths into a :class:`ModelSpec` (no torch import)."""
    config_path = None
    if name.startswith(SCHEMAS):
        arch, pretrained = name, None
    elif name.endswith(".json"):
        config_path = str(_local_path(name, "model config"))
        arch = Path(config_path).stem
    elif name.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"model name {name!r} is a checkpoint; set name to its architecture "
                         f"(e.g. ViT-B-32) and pretrained to the checkpoint path")
    elif _looks_like_path(name) and _is_dir(name):
        arch, pretrained = f"local-dir:{_local_path(name, 'model')}", None
    else:
        arch = name
    if pretrained and (pretrained.endswith(WEIGHT_SUFFIXES) or _looks_like_path(pretrained)):
        pretrained = str(_local_path(pretrained, "checkpoint"))
    spec = ModelSpec(arch, pretrained, config_path)
    return ModelSpec(arch, pretrained, config_path, model_id or default_model_id(spec))


def resolve_conf(conf: Any) -> ModelSpec:
    """Resolve an ``etl.config.ModelConf`` (name, pretrained, model_id)."""
    return resolve(conf.name, conf.pretrained, conf.model_id)


def default_model_id(spec: ModelSpec) -> str:
    """A deterministic id: ``arch/tag``, ``arch/<file stem>-<sha256[:8]>`` or ``arch/random``."""
    if spec.arch.startswith(SCHEMAS):
        return spec.arch
    if spec.weights_file:
        path = Path(spec.weights_file)
        return f"{spec.arch}/{path.stem}-{file_digest(path)[:8]}"
    return f"{spec.arch}/{spec.pretrained or 'random'}"


def file_digest(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) in this process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith(".")


def _is_dir(value: str) -> bool:
    from etl.config import resolve_path

    return resolve_path(value).is_dir()


def _local_path(value: str, what: str) -> Path:
    from etl.config import resolve_path

    path = resolve_path(value)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {value!r} not found (looked at {path}); "
                                f"train or download it, or point the config at another file")
    return path


def get_model(spec: ModelSpec, device: str) -> LoadedModel:
    """The model for ``spec`` on ``device``, loaded once per Python worker and cached."""
    key = (spec, device)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = load(spec, device)
        return _CACHE[key]


def load(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """Build the open_clip model, its eval transform and tokenizer; weights loaded safely."""
    import open_clip

    if spec.config_path:
        register_config(spec.config_path)
    with _quiet(bool(spec.weights_file)):  # open_clip warns "initialized randomly" otherwise
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.arch, pretrained=_tag(spec), weights_only=True)
    if spec.weights_file:
        load_weights(model, spec.weights_file)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(spec.arch)
    return LoadedModel(spec, model, preprocess, tokenizer, device, _probe_dim(model, tokenizer, device))


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    previous = logging.root.manager.disable
    if on:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _tag(spec: ModelSpec) -> str | None:
    return None if spec.weights_file or spec.arch.startswith(SCHEMAS) else spec.pretrained


def register_config(path: str) -> None:
    """Register a custom open_clip architecture JSON (model name = file stem), once."""
    import open_clip

    if Path(path).stem not in open_clip.list_models():
        open_clip.add_model_config(path)


def read_state_dict(path: str) -> dict:
    """Tensors from a checkpoint: safetensors, else ``torch.load(weights_only=True)``."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: Any, path: str) -> None:
    """Load a plain open_clip state_dict (any float dtype) into ``model``, strictly."""
    own = model.state_dict()
    state = read_state_dict(path)
    for k, v in state.items():
        if k in own and v.is_floating_point():
            state[k] = v.to(own[k].dtype).reshape(own[k].shape) if v.numel() == own[k].numel() \
                else v
    model.load_state_dict(state, strict=True)


def _probe_dim(model: Any, tokenizer: Any, device: str) -> int:
    import torch

    with torch.inference_mode():
        return int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])


def clear_cache() -> None:
    """Forget loaded models (tests, or to free accelerator memory)."""
    with _LOCK:
        _CACHE.clear()
