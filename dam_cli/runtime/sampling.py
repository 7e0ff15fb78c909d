"""The sampling options of a generation, checked without torch: the CLI refuses them before anything loads, and
`run_generate` before the model loads (`check_config`), so a library call with a NaN temperature or a seed past
64 bits gets the same one line as the CLI, not torch's error from inside the first step."""

from __future__ import annotations

import math

from dam_cli.errors import DamUsageError

MAX_NEW_TOKENS = 10**8  # no model's context is longer; larger values would only overflow later
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit
MAX_TOP_K = 2**31 - 1  # beyond any vocabulary


def check_sampling(temperature: float, top_p: float, top_k: int, seed: int, max_new_tokens: int) -> None:
    """Refuse sampling options no generation can use, before torch or the model load: `DamUsageError` (exit 2)
    naming the flag. NaN and infinities parse as floats, and integers of any size as ints."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DamUsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise DamUsageError(f"--top-p must be in (0, 1], got {top_p}")
    if not 0 <= top_k <= MAX_TOP_K:
        raise DamUsageError(f"--top-k must be from 0 to {MAX_TOP_K:,} (0 = all tokens), got {top_k:,}")
    if not 0 <= seed <= MAX_SEED:
        raise DamUsageError(f"--seed must be from 0 to {MAX_SEED:,} (2^63 - 1), got {seed:,}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise DamUsageError(f"--max-new-tokens must be from 1 to {MAX_NEW_TOKENS:,}, got {max_new_tokens:,}")
