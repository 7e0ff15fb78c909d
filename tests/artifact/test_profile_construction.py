"""`Profile.from_masks`, the library's way to build a profile from tensors (tests, notebooks), checks what it is
given before anything is derived from it."""

from __future__ import annotations

import pytest
import torch

from dam_cli.artifact.profile import Profile
from dam_cli.errors import DamError


def test_from_masks_names_what_disagrees():
    """`Profile.from_masks` refuses inconsistent tensors in one line naming the field (it once asserted with no
    message, or built a profile that `save` wrote and `load_profile` then refused)."""
    m = torch.ones(2, 4, 16, 16, dtype=torch.bool).tril()
    o = torch.zeros(2, 4, 16, dtype=torch.bool)
    cases = [
        ((m, o[..., :8], o), {}, r"offsets must be \[N_L, H, L\] = \(2, 4, 16\)"),
        ((m[0], o, o), {}, "from_masks takes tensors: true_mask"),
        (([1], o, o), {}, "from_masks takes tensors"),
        ((m[:, :, :0, :0], o[..., :0], o[..., :0]), {}, "with L >= 1"),
        ((m, o, o), {"full_heads": torch.zeros(3, 3)}, r"full_heads must be \[N_L, H\] = \(2, 4\)"),
        ((m, o, o), {"n_heads": 5}, "n_heads=5 disagrees with the masks' shape"),
        ((m, o, o), {"n_kv_heads": 3}, "n_kv_heads=3 must divide the masks' 4 heads"),
    ]
    for args, kw, needle in cases:
        with pytest.raises(DamError, match=needle):
            Profile.from_masks(*args, **kw)
    assert Profile.from_masks(m, o, o, n_kv_heads=2, n_heads=4).meta.model["n_kv_heads"] == 2
