"""Calibration windows from a long document: tokenized in part (memory bounded by what is used), the same windows
as tokenizing it whole."""

from __future__ import annotations

from dam_cli.profiling import calib


def test_a_long_document_gives_the_windows_of_its_whole_tokenization(tiny_tokenizer, monkeypatch):
    words = ["the", "café", "opens", "at", "nine,", "ünd", "closes", "late.", "A", "harbour", "seal", "1848"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(400_000))  # about 2 MB, longer than the first cut
    whole = tiny_tokenizer(text, add_special_tokens=True)["input_ids"]
    lengths = []
    real = tiny_tokenizer.__class__.__call__
    monkeypatch.setattr(tiny_tokenizer.__class__, "__call__",
                        lambda self, t, **kw: lengths.append(len(t)) or real(self, t, **kw))
    for L, n in ((64, 3), (512, 8), (1024, 40)):
        lengths.clear()
        windows, seen = calib.make_windows(tiny_tokenizer, [("doc", text)], L, n)
        assert windows == [whole[s: s + L] for s in range(0, n * L, L)]
        assert lengths == [max(1 << 20, 32 * n * L)] and lengths[0] < len(text)  # once, in part, never whole
        assert seen == n * L


def test_a_document_too_short_for_the_part_is_tokenized_whole(tiny_tokenizer):
    text = "the cat sat on the mat. " * 60_000  # longer than the cut, but the windows asked for need it all
    whole = tiny_tokenizer(text, add_special_tokens=True)["input_ids"]
    n = len(whole) // 64
    windows, seen = calib.make_windows(tiny_tokenizer, [("doc", text)], 64, n + 5)
    assert seen == len(whole) and windows[:n] == [whole[s: s + 64] for s in range(0, n * 64, 64)]
