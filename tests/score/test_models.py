"""Model resolution and safe, cached loading (local files only: tests have no network)."""

from __future__ import annotations

import pickle

import pytest

from etl.config import ModelConf
from tests.helpers.models import TINY_JSON, tiny_state
from udfs import models


@pytest.fixture(scope="module")
def state():
    return tiny_state(0)


@pytest.fixture(scope="module")
def fp16_file(tmp_path_factory, state):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny-fp16.safetensors"
    save_file({k: v.half() for k, v in state.items()}, str(path))
    return path


def test_resolve_custom_json_and_local_weights(fp16_file):
    spec = models.resolve_conf(ModelConf(name="conf/models/dfn-tiny.json", pretrained=str(fp16_file)))
    assert spec.arch == "dfn-tiny"
    assert spec.config_path == TINY_JSON
    assert spec.weights_file == str(fp16_file)
    assert spec.model_id.startswith("dfn-tiny/tiny-fp16-") and len(spec.model_id) == len("dfn-tiny/tiny-fp16-") + 8
    assert models.resolve(TINY_JSON, str(fp16_file)).model_id == spec.model_id  # deterministic
    named = models.resolve_conf(ModelConf(name=TINY_JSON, pretrained=str(fp16_file), model_id="mine"))
    assert named.model_id == "mine"
    pickle.loads(pickle.dumps(spec))  # shipped to workers as a plain value


def test_model_id_changes_with_the_weights(tmp_path, state):
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(state, str(a))
    save_file({**state, "logit_scale": state["logit_scale"] + 1}, str(b))
    assert models.resolve(TINY_JSON, str(a)).model_id != models.resolve(TINY_JSON, str(b)).model_id


@pytest.mark.parametrize("name,pretrained,arch,tag,model_id", [
    ("ViT-B-32", "openai", "ViT-B-32", "openai", "ViT-B-32/openai"),
    ("ViT-H-14-quickgelu", "dfn5b", "ViT-H-14-quickgelu", "dfn5b", "ViT-H-14-quickgelu/dfn5b"),
    ("hf-hub:apple/DFN2B-CLIP-ViT-L-14", "ignored", "hf-hub:apple/DFN2B-CLIP-ViT-L-14", None,
     "hf-hub:apple/DFN2B-CLIP-ViT-L-14"),
    ("ViT-B-32", None, "ViT-B-32", None, "ViT-B-32/random"),
])
def test_resolve_open_clip_names(name, pretrained, arch, tag, model_id):
    spec = models.resolve(name, pretrained)
    assert (spec.arch, spec.pretrained, spec.model_id) == (arch, tag, model_id)
    assert spec.weights_file is None and spec.config_path is None


def test_resolve_local_dir(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{}")
    spec = models.resolve(str(tmp_path))
    assert spec.arch == f"local-dir:{tmp_path}" and spec.model_id == spec.arch


def test_resolve_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        models.resolve(TINY_JSON, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        models.resolve("conf/models/nope.json", None)
    with pytest.raises(ValueError, match="architecture"):
        models.resolve(str(tmp_path / "x.safetensors"), None)


def test_fp16_safetensors_load_cast_to_model_dtype(fp16_file, state):
    import torch

    loaded = models.load(models.resolve(TINY_JSON, str(fp16_file)), "cpu")
    got = loaded.model.state_dict()
    assert set(got) == set(state)
    for k, v in got.items():
        assert v.dtype == state[k].dtype, k
        assert torch.equal(v, state[k].half().to(v.dtype)), k
    assert loaded.embed_dim == 64
    assert not loaded.model.training


def test_torch_checkpoint_loads_with_weights_only(tmp_path, state):
    import torch

    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    loaded = models.load(models.resolve(TINY_JSON, str(path)), "cpu")
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())


class Payload:
    """An arbitrary object: unpickling it would run code, so weights_only must refuse it."""


def test_torch_checkpoint_with_objects_is_refused(tmp_path, state):
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "extra": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        models.load(models.resolve(TINY_JSON, str(path)), "cpu")


def test_wrong_checkpoint_fails_strictly(tmp_path, state):
    from safetensors.torch import save_file

    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("visual.")}, str(path))
    with pytest.raises(RuntimeError, match="Missing key"):
        models.load(models.resolve(TINY_JSON, str(path)), "cpu")


def test_get_model_is_cached_per_process(fp16_file, monkeypatch):
    spec = models.resolve(TINY_JSON, str(fp16_file))
    first = models.get_model(spec, "cpu")
    assert models.get_model(spec, "cpu") is first
    monkeypatch.setattr(models, "_CACHE", {})  # a new process
    assert models.get_model(spec, "cpu") is not first


def test_transposed_tensor_is_refused_naming_it_and_both_shapes(tmp_path, state):
    from safetensors.torch import save_file

    path = tmp_path / "transposed.safetensors"
    proj = state["visual.proj"]  # (128, 64): same element count as its transpose
    save_file({**state, "visual.proj": proj.t().contiguous()}, str(path))
    with pytest.raises(ValueError, match=r"'visual.proj' has shape \[64, 128\] but the model "
                                         r"expects \[128, 64\]"):
        models.load(models.resolve(TINY_JSON, str(path)), "cpu")


def test_only_size_one_dimensions_may_differ(tmp_path, state):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "squeezed.safetensors"
    save_file({**state, "logit_scale": state["logit_scale"].reshape(1, 1),
               "visual.class_embedding": state["visual.class_embedding"][None]}, str(path))
    got = models.load(models.resolve(TINY_JSON, str(path)), "cpu").model.state_dict()
    assert got["logit_scale"].shape == () and torch.equal(got["logit_scale"], state["logit_scale"])
    assert torch.equal(got["visual.class_embedding"], state["visual.class_embedding"])


def test_training_loads_checkpoints_as_strictly_as_scoring(tmp_path, state):
    """One loader: a checkpoint scoring refuses (an unexpected key) is refused by training too."""
    from safetensors.torch import save_file

    from udfs.train import create

    path = tmp_path / "extra.safetensors"
    save_file({**state, "head.extra": state["logit_scale"].clone()}, str(path))
    with pytest.raises(RuntimeError, match="Unexpected key.*head.extra"):
        models.load(models.resolve(TINY_JSON, str(path)), "cpu")
    with pytest.raises(RuntimeError, match="Unexpected key.*head.extra"):
        create(TINY_JSON, str(path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create(TINY_JSON, str(tmp_path / "missing.safetensors"))
