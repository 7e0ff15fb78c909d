"""What a model identity (`dam_cli.runtime.models.model_identity`) says about each layer's attention.

Sliding windows and the attention-logit soft-cap, read the same way by `dam inspect`, the capture files and
anything else that has only a profile's or capture's metadata. No torch import.
"""

from __future__ import annotations

import math
from typing import Any


def _positive_int(x: Any) -> int | None:
    return int(x) if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def layer_windows(model: dict[str, Any]) -> list[int | None]:
    """Each layer's sliding window W (row `i` sees key `j` iff `0 <= i - j < W`; None: global attention) as a
    model identity (`dam_cli.runtime.models.model_identity`) states it: `sliding_window` on the layers whose
    `layer_types` entry is "sliding_attention", on every layer without `layer_types`; a malformed W: none."""
    n = int(model["n_layers"])
    window, types = _positive_int(model.get("sliding_window")), model.get("layer_types")
    if not isinstance(types, list) or len(types) != n:
        types = ["sliding_attention"] * n
    return [window if window and t == "sliding_attention" else None for t in types]


def layer_softcap(model: dict[str, Any]) -> float | None:
    """The attention-logit soft-cap a model identity states (`attn_logit_softcapping`, every layer), or None."""
    cap = model.get("attn_logit_softcapping")
    ok = isinstance(cap, (int, float)) and not isinstance(cap, bool) and math.isfinite(cap) and cap > 0
    return float(cap) if ok else None
