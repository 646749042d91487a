"""Architecture ids: which Base ControlNet shape an adapter or base was made for."""

from __future__ import annotations

import hashlib
import json

from engine.models.presets import PRESETS, unet_config

# Fields that decide the shapes of the ControlNet's weights.
_SHAPE_FIELDS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                 "attention_head_dim", "norm_num_groups", "use_linear_projection")


def arch_id(controlnet_config) -> str:
    """``sd15`` / ``tiny`` for the presets' shapes, else ``custom-<8 hex>``."""
    key = _shape_key(controlnet_config)
    for preset in PRESETS:
        if _shape_key(unet_config(preset)) == key:
            return preset
    return "custom-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _shape_key(config) -> str:
    c = dict(config)
    return json.dumps({k: list(c[k]) if isinstance(c[k], (list, tuple)) else c[k] for k in _SHAPE_FIELDS},
                      sort_keys=True)
