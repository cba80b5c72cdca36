"""The tiny open_clip architecture the tests score and train with (never the trained file)."""

from __future__ import annotations

from etl.config import PROJECT_ROOT

TINY_JSON = str(PROJECT_ROOT / "conf" / "models" / "dfn-tiny.json")


def tiny_state(seed: int = 0) -> dict:
    """A randomly initialised dfn-tiny state_dict (keys exactly as model.state_dict())."""
    import open_clip
    import torch

    from udfs import models

    models.register_config(TINY_JSON)
    torch.manual_seed(seed)
    model = open_clip.create_model("dfn-tiny")
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
