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


def test_a_mask_larger_than_free_memory_and_a_layer_that_is_no_int_are_named(monkeypatch):
    """`Profile.mask` allocates `[H, S, S]`: beyond the free memory it says so (with what to use instead) before
    torch's allocator fails, asking the machine only for masks above `MASK_CHECK_BYTES`; a layer that is not an int
    is named as such, not as out of range."""
    from dam_cli import memory
    from dam_cli.artifact import profile as profile_mod

    m = torch.ones(2, 4, 16, 16, dtype=torch.bool).tril()
    o = torch.zeros(2, 4, 16, dtype=torch.bool)
    p = Profile.from_masks(m, o, o)
    monkeypatch.setattr(memory, "available_memory", lambda: pytest.fail("asked for memory for a small mask"))
    assert p.mask(0, 1000).shape == (4, 1000, 1000)
    monkeypatch.setattr(profile_mod, "MASK_CHECK_BYTES", 0)
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)
    with pytest.raises(DamError, match=r"the 1,000 x 1,000 mask of layer 0's 4 heads needs about 7.6 MiB, more than "
                                       r"the 1.0 MiB free: take rows of it with mask_rows"):
        p.mask(0, 1000)
    assert p.mask(0, 100).shape == (4, 100, 100)
    with pytest.raises(DamError, match="layer must be an int, got 'a'"):
        p.mask("a", 10)


def test_a_profile_path_that_is_no_path_is_named(tmp_path):
    from dam_cli.artifact.profile import load_profile

    for bad in (None, 123):
        with pytest.raises(DamError, match=f"the profile path to read must be a str or os.PathLike, got "
                                           f"{type(bad).__name__}"):
            load_profile(bad)
    m = torch.ones(1, 2, 8, 8, dtype=torch.bool).tril()
    o = torch.zeros(1, 2, 8, dtype=torch.bool)
    with pytest.raises(DamError, match="the profile path to save to must be a str or os.PathLike, got NoneType"):
        Profile.from_masks(m, o, o).save(None)
