"""Filter-model resolution and the per-worker model cache.

A model is named the way open_clip users name it:

* an architecture + pretrained tag: ``ViT-B-32`` / ``openai``, ``ViT-H-14-quickgelu`` / ``dfn5b``;
* an ``hf-hub:org/repo`` id, optionally pinned to a revision (``hf-hub:org/repo@<revision>``
  or ``revision:`` in the model config; a pinned id is downloaded with
  ``huggingface_hub.snapshot_download`` and loaded as an open_clip ``local-dir:``), or an
  open_clip ``local-dir:`` folder;
* an architecture (built in, or a custom config JSON such as ``conf/models/dfn-tiny.json``)
  + a local checkpoint (``.safetensors`` preferred; ``.pt``/``.pth``/``.bin`` are read with
  ``torch.load(weights_only=True)`` only).

:class:`ModelSpec` is resolved on the driver without importing torch; :func:`get_model` loads
it lazily on a worker and caches it there, so a model is never shipped from the driver.

Every model also has a *weights digest* that changes whenever its weights do, even when its
name does not: the sha256 of a local checkpoint file, ``revision:<rev>`` for a pinned hub id,
``random-init`` for random weights, and otherwise the sha256 of the loaded state_dict
(:func:`weights_digest`, computed where the model is loaded: on a worker).
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
    revision: str | None = None  # hub revision (commit, tag or branch) an hf-hub: id is pinned to

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


def resolve(name: str, pretrained: str | None = None, model_id: str | None = None,
            revision: str | None = None) -> ModelSpec:
    """Resolve config-style names and paths into a :class:`ModelSpec` (no torch import).

    ``hf-hub:org/repo@rev`` and ``revision=rev`` pin a hub id to a revision (not both, unless
    equal); a revision for anything but a hub id is an error.
    """
    config_path = None
    name, revision = split_revision(name, revision)
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
    spec = ModelSpec(arch, pretrained, config_path, revision=revision)
    return ModelSpec(arch, pretrained, config_path, model_id or default_model_id(spec), revision)


def split_revision(name: str, revision: str | None) -> tuple[str, str | None]:
    """(name without ``@rev``, the revision) for ``hf-hub:org/repo@rev`` and/or ``revision``."""
    pinned = None
    if name.startswith("hf-hub:") and "@" in name:
        name, pinned = name.rsplit("@", 1)
        if not pinned:
            raise ValueError(f"model name {name + '@'!r}: empty revision after '@'; write "
                             f"hf-hub:org/repo@<commit, tag or branch>")
    if pinned and revision and pinned != revision:
        raise ValueError(f"model {name}: pinned to {pinned!r} in the name but revision is "
                         f"{revision!r}; keep one of them")
    revision = pinned or revision
    if revision and not name.startswith("hf-hub:"):
        raise ValueError(f"model {name}: revision {revision!r} applies to hf-hub: ids only; "
                         f"drop it, or name the model as hf-hub:org/repo")
    return name, revision


def resolve_conf(conf: Any) -> ModelSpec:
    """Resolve an ``etl.config.ModelConf`` (name, pretrained, model_id, revision)."""
    return resolve(conf.name, conf.pretrained, conf.model_id, getattr(conf, "revision", None))


def default_model_id(spec: ModelSpec) -> str:
    """A deterministic id: ``arch/tag``, ``arch/<file stem>-<sha256[:8]>``, ``arch/random``, or
    the hub id (with ``@revision`` when pinned)."""
    if spec.arch.startswith(SCHEMAS):
        return f"{spec.arch}@{spec.revision}" if spec.revision else spec.arch
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


RANDOM_INIT = "random-init"


def declared_digest(spec: ModelSpec) -> str | None:
    """The weights digest knowable without loading the model (cheap, driver-safe): a local
    checkpoint's sha256, ``revision:<rev>``, ``random-init``; None for tags, unpinned hub ids
    and ``local-dir:`` folders (only their loaded state_dict tells, see :func:`weights_digest`)."""
    if spec.weights_file:
        return file_digest(Path(spec.weights_file))
    if spec.revision:
        return f"revision:{spec.revision}"
    if spec.pretrained is None and not spec.arch.startswith(SCHEMAS):
        return RANDOM_INIT
    return None


def weights_digest(spec: ModelSpec) -> str:
    """:func:`declared_digest`, else load the model on CPU here (a worker) and hash its
    state_dict (:func:`state_digest`); the model is not cached."""
    return declared_digest(spec) or state_digest(load(spec, "cpu").model)


def state_digest(model: Any) -> str:
    """sha256 over a model's state_dict: every tensor's name, dtype, shape and bytes."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{list(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    name = open_clip_name(spec)
    with _quiet(bool(spec.weights_file)):  # open_clip warns "initialized randomly" otherwise
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=_tag(spec), weights_only=True)
    if spec.weights_file:
        load_weights(model, spec.weights_file)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(name)
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


def open_clip_name(spec: ModelSpec, download: Any = None) -> str:
    """The name open_clip loads: ``spec.arch``, or for a pinned hub id the ``local-dir:`` of
    that revision's snapshot (``download``: ``huggingface_hub.snapshot_download`` by default)."""
    if not spec.revision:
        return spec.arch
    if download is None:
        from huggingface_hub import snapshot_download as download
    folder = download(repo_id=spec.arch.removeprefix("hf-hub:"), revision=spec.revision,
                      allow_patterns=HUB_FILES)
    return f"local-dir:{folder}"


HUB_FILES = ["*.json", "*.txt", "*.model", "open_clip_model.safetensors",
             "open_clip_pytorch_model.bin"]


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
    """Load a plain open_clip state_dict (any float dtype) into ``model``, strictly.

    The one checkpoint loader (scoring, training and evaluation all use it): every key must
    match, floats are cast to the model's dtypes, and a tensor may differ in shape only by
    size-1 dimensions (``[]`` vs ``[1]``); anything else is an error naming the tensor.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    own = model.state_dict()
    state = read_state_dict(path)
    for k, v in state.items():
        if k in own:
            v = fit_shape(k, v, tuple(own[k].shape), path)
            state[k] = v.to(own[k].dtype) if v.is_floating_point() else v
    model.load_state_dict(state, strict=True)


def fit_shape(name: str, tensor: Any, shape: tuple[int, ...], path: str = "checkpoint") -> Any:
    """``tensor`` viewed as ``shape`` when the two differ only by size-1 dimensions.

    A transposed or otherwise rearranged tensor with the same element count is refused: a
    reshape would load it silently with its values scrambled.
    """
    got = tuple(tensor.shape)
    if got == shape:
        return tensor
    if [d for d in got if d != 1] != [d for d in shape if d != 1]:
        raise ValueError(f"{path}: tensor {name!r} has shape {list(got)} but the model expects "
                         f"{list(shape)}; only size-1 dimensions may differ (is the checkpoint "
                         f"for another architecture, or saved transposed?)")
    return tensor.reshape(shape)


def _probe_dim(model: Any, tokenizer: Any, device: str) -> int:
    import torch

    with torch.inference_mode():
        return int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
