"""Hugging Face models built from a config (no weights downloaded), and inputs for them.

Used by ``fusedmlp fuse --hf-config`` and by the tests. transformers is imported lazily: it is an
optional dependency (the ``hf`` extra).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

# Small enough for a CPU (and Triton's interpreter) in seconds; every model type picks the keys it
# knows and keeps the rest as inert attributes. The token ids must lie inside the tiny vocabulary.
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "image_size": 32,
    "patch_size": 8,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["hidden_size=128", "hidden_act=gelu"] -> {"hidden_size": 128, "hidden_act": "gelu"} (JSON values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def hf_config(name_or_path: str, overrides: dict[str, Any] | None = None, tiny: bool = True) -> Any:
    """A transformers config: from a local directory or config.json (used as is, plus
    ``overrides``), else from a model type the installed transformers knows (with TINY sizes,
    unless ``tiny`` is False: the family's own defaults)."""
    from transformers import AutoConfig

    overrides = overrides or {}
    if os.path.exists(name_or_path):
        path = name_or_path
        if os.path.isfile(path):  # a config.json: its directory
            path = os.path.dirname(path) or "."
        return AutoConfig.from_pretrained(path, **overrides)
    try:
        return AutoConfig.for_model(name_or_path, **({**TINY, **overrides} if tiny else overrides))
    except ValueError:
        raise ValueError(
            f"{name_or_path!r} is neither a local config path nor a model type this transformers "
            "knows (transformers.CONFIG_MAPPING lists those)"
        ) from None


def build_model(
    config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The base model (AutoModel) for ``config``, randomly initialised, in eval mode."""
    from transformers import AutoModel

    return AutoModel.from_config(config).to(device=device, dtype=dtype).eval()


def example_inputs(model: nn.Module, tokens: int = 8, batch: int = 2) -> dict[str, Tensor]:
    """Random inputs for the model's main input (token ids or an image batch)."""
    config = model.config  # type: ignore[attr-defined]
    param = next(model.parameters())
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        ids = torch.randint(3, config.vocab_size, (batch, tokens), device=param.device)
        if getattr(config, "is_encoder_decoder", False):  # T5, BART: the decoder needs ids too
            return {"input_ids": ids, "decoder_input_ids": ids}
        return {"input_ids": ids}
    if name == "pixel_values":
        size = config.image_size
        x = torch.randn(batch, config.num_channels, size, size, device=param.device, dtype=param.dtype)
        return {"pixel_values": x}
    raise ValueError(f"cannot make inputs for a model whose main input is {name!r}")
