"""The RULER-style task suite: determinism, seed splits, token budgets, answers really present, scoring.

Lengths are measured with the tiny word-level tokenizer (unknown words count as one <unk> each) and,
behind `slow`, with the real SmolLM2 tokenizer. No model runs here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime

import pytest
from conftest import build_tokenizer

from dam_cli.errors import DamError, DamUsageError
from dam_cli.evaluation.suite import (
    HAYSTACKS,
    SPLITS,
    SUITE_TASKS,
    VALUE_KINDS,
    Haystack,
    Prompt,
    found_items,
    haystack_text,
    make_prompt,
    match_all,
    match_part,
    score,
    split_of,
    split_seeds,
    suite_prompts,
)
from dam_cli.evaluation.suite.aggregation import FWE_NOISE
from dam_cli.evaluation.suite.niah import WORD_VALUES
from dam_cli.evaluation.suite.prose import prose_words
from dam_cli.evaluation.suite.rng import Rng
from dam_cli.evaluation.tasks import PASSKEY_FILLER

NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
HAYSTACK_TASKS = NIAH + ("vt",)
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant :{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = build_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def occurrences(text: str, item: str) -> int:
    """How often `item` occurs in `text` as a whole token (not glued to a letter or digit)."""
    return len(re.findall(rf"(?<![0-9A-Za-z]){re.escape(item)}(?![0-9A-Za-z])", text))


# ---- the generator and the haystacks ---------------------------------------------------------------------

def test_rng_is_splitmix64_and_draws_stay_in_range():
    r = Rng(0)  # the published first outputs of SplitMix64 from state 0
    assert [r.next64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    r = Rng.keyed("test", 1)
    draws = [r.below(7) for _ in range(2000)]
    assert set(draws) == set(range(7))
    picked = r.sample(range(50), 20)
    assert len(set(picked)) == 20 and all(0 <= p < 50 for p in picked)
    assert Rng.keyed("a", 1).next64() != Rng.keyed("a", 2).next64() != Rng.keyed("b", 1).next64()


DIGEST_CODE = """
import hashlib
from conftest import build_tokenizer
from dam_cli.evaluation.suite import HAYSTACKS, haystack_text, suite_prompts

def digest():
    h = hashlib.sha256()
    for kind in HAYSTACKS:
        h.update(haystack_text(kind, 12345, 60).encode())
    for p in suite_prompts(build_tokenizer(), 400, "heldout-a", 2):
        h.update(p.text.encode() + repr(p.answers).encode() + repr(p.ids).encode())
    return h.hexdigest()
"""


def test_same_digest_in_a_fresh_process_with_another_hash_seed():
    """No salted `hash()`, no global state: another process with another hash seed builds the same texts."""
    space: dict = {}
    exec(DIGEST_CODE, space)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "4242", "PYTHONSAFEPATH": "1", "PYTHONPATH": tests}
    r = subprocess.run([sys.executable, "-c", DIGEST_CODE + "\nprint(digest())"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == space["digest"]()


@pytest.mark.parametrize("kind", HAYSTACKS)
def test_haystack_is_a_function_of_seed_and_index(kind):
    a, b = Haystack(kind, 7), Haystack(kind, 7)
    long = a.units(80)
    assert b.units(30) == long[:30]  # unit i does not depend on how many were asked for
    assert Haystack(kind, 8).units(30) != long[:30]
    assert haystack_text(kind, 7, 80) == a.join(long)


@pytest.mark.parametrize("kind", HAYSTACKS)
def test_no_haystack_repeats_a_sentence_more_than_a_few_times(kind):
    """Units (sentences, code blocks, log lines) are varied: at most 3 copies of any in 3000."""
    for seed in (1, 2, 3):
        counts = Counter(Haystack(kind, seed).units(3000))
        assert counts.most_common(1)[0][1] <= 3, counts.most_common(3)
        assert len(counts) >= 2950


def test_prose_mixes_styles_and_is_not_one_sentence():
    text = haystack_text("prose", 5, 400)
    sentences = re.split(r"(?<=\.)\s+", text)
    starts = Counter(s.split()[0] for s in sentences if s)
    assert len(starts) >= 30  # many sentence shapes, not one template
    assert len(set(sentences)) >= 0.98 * len(sentences)


def test_log_timestamps_never_go_back():
    lines = haystack_text("logs", 3, 600).splitlines()
    stamps = []
    for line in lines:
        m = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", line)
        if m:
            stamps.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
        else:
            m = re.search(r"\[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d)", line)
            assert m, line
            stamps.append(datetime.strptime(m.group(1), "%d/%b/%Y:%H:%M:%S"))
    assert stamps == sorted(stamps) and len(stamps) == 600
    assert {"access", "table", "app"} <= {("access" if "HTTP/1.1" in x else "table" if x.startswith("|")
                                           else "app") for x in lines}


def test_needle_words_never_occur_in_a_haystack():
    assert not set(WORD_VALUES) & set(prose_words())
    for kind in HAYSTACKS:
        text = haystack_text(kind, 11, 1500)
        assert [w for w in WORD_VALUES if occurrences(text, w)] == []
        assert not re.search(r"\b\d{7}\b", text)  # no 7-digit number: needle numbers are unique in the text


# ---- prompts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", SUITE_TASKS)
def test_same_arguments_same_prompt_other_seed_other_prompt(tok, task):
    a = make_prompt(task, tok, 500, 3, 1, "logs")
    b = make_prompt(task, tok, 500, 3, 1, "logs")
    assert (a.text, a.answers, a.ids, a.meta) == (b.text, b.answers, b.ids, b.meta)
    c = make_prompt(task, tok, 500, 4, 1, "logs")
    assert c.text != a.text and c.answers != a.answers


@pytest.mark.parametrize("length", [300, 1024, 2500])
@pytest.mark.parametrize("task", HAYSTACK_TASKS)
def test_haystack_prompts_fill_the_budget_to_within_one_unit(tok, task, length):
    for i, kind in enumerate(HAYSTACKS):
        p = make_prompt(task, tok, length, 40 + i, i, kind)
        assert len(p.ids) == p.meta["tokens"] <= length
        # the word tokenizer is additive: one more unit would cost exactly that unit's tokens, and it no longer fits
        nxt = Haystack(kind, 40 + i).units(p.meta["units"] + 1)[-1]
        assert length - len(p.ids) < n_tokens(tok, nxt), (kind, length - len(p.ids))


@pytest.mark.parametrize("length", [300, 1024, 5000])
def test_list_tasks_fill_the_budget(tok, length):
    cwe = make_prompt("cwe", tok, length, 9, 0, "prose")
    entry = n_tokens(tok, "999. word")
    assert 0 <= length - len(cwe.ids) < cwe.meta["repeats"]["rare"] * entry
    fwe = make_prompt("fwe", tok, length, 9, 0, "prose")
    assert 0 <= length - len(fwe.ids) < n_tokens(tok, FWE_NOISE) + 12  # the noise token plus a few coded words
    pk = make_prompt("passkey", tok, length, 9, 0, "prose")
    assert 0 <= length - len(pk.ids) < n_tokens(tok, PASSKEY_FILLER) + 1


@pytest.mark.parametrize("task", NIAH)
def test_niah_answers_are_in_the_haystack_and_distractors_are_not_answers(tok, task):
    kinds = set()
    for i in range(9):
        kind = HAYSTACKS[i % 3]
        p = make_prompt(task, tok, 900, 70 + i, i, kind)
        kinds.add((kind, p.meta["values"]))
        expect = {"niah_single": (1, 0), "niah_multikey": (1, 3), "niah_multivalue": (4, 0),
                  "niah_multiquery": (4, 0)}[task]
        assert (len(p.answers), len(p.meta["distractors"])) == expect
        assert len(set(p.answers)) == len(p.answers)
        assert not set(p.answers) & set(p.meta["distractors"])
        for needle in p.meta["needles"]:
            assert p.text.count(needle) == 1
        for value in p.answers + tuple(p.meta["distractors"]):
            assert occurrences(p.text, value) == 1  # only in its needle
        for key in p.meta["keys"]:
            assert key in p.text.rsplit("above?", 1)[0].split("\n")[-1]  # the question names every asked key
        form = {"number": r"\d{7}", "word": "|".join(WORD_VALUES), "uuid": r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}"}
        assert all(re.fullmatch(form[p.meta["values"]], v) for v in p.answers)
    assert kinds == {(h, v) for h in HAYSTACKS for v in VALUE_KINDS}  # nine samples cover every pair


@pytest.mark.parametrize("task", HAYSTACK_TASKS)
def test_a_sample_at_two_lengths_keeps_its_needles_and_haystack_prefix(tok, task):
    short, long = (make_prompt(task, tok, n, 31, 4, "prose") for n in (400, 1600))
    assert short.answers == long.answers and short.meta["depths"] == long.meta["depths"]
    assert short.meta["units"] < long.meta["units"]
    units = Haystack("prose", 31).units(long.meta["units"])
    for unit in units[:short.meta["units"]]:
        assert unit in short.text and unit in long.text  # the short haystack is the long one's beginning
    assert units[short.meta["units"]] not in short.text


def test_variable_tracking_chains_resolve_to_the_asked_value(tok):
    for i, kind in enumerate(HAYSTACKS):
        p = make_prompt("vt", tok, 1200, 5 + i, i, kind)
        body = p.text
        holds: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", body):
            holds[name] = holds[rhs[4:]] if rhs.startswith("VAR ") else rhs  # every use follows its definition
        assert len(holds) == 10
        asked = re.search(r"assigned the value (\d+) in the text above", body).group(1)
        assert sorted(n for n, v in holds.items() if v == asked) == sorted(p.answers)
        assert set(p.meta["distractors"]) == set(holds) - set(p.answers)
        assert all(holds[d] != asked for d in p.meta["distractors"])


@pytest.mark.parametrize("length", [600, 4096])
def test_cwe_answer_is_the_ten_most_common_words_of_the_list(tok, length):
    p = make_prompt("cwe", tok, length, 21, 0, "code")
    words = re.findall(r"(?<!\S)\d+\. ([a-z]+)", p.text)
    counts = Counter(words)
    top = counts.most_common()
    assert {w for w, _ in top[:10]} == set(p.answers)
    assert top[9][1] > top[10][1]  # no tie at the cut
    assert all(counts[d] < top[9][1] for d in p.meta["distractors"])
    assert len(words) == 10 * p.meta["repeats"]["common"] + p.meta["units"] * p.meta["repeats"]["rare"]


@pytest.mark.parametrize("length", [400, 3000])
def test_fwe_answer_is_the_three_most_frequent_coded_words(tok, length):
    p = make_prompt("fwe", tok, length, 22, 0, "logs")
    coded = p.text.split("Ignore the dots '....'.\n", 1)[1].split("\nQuestion:", 1)[0].split()
    counts = Counter(w for w in coded if w != FWE_NOISE)
    top = counts.most_common()
    assert [w for w, _ in top[:3]] == list(p.answers)
    assert top[0][1] > top[1][1] > top[2][1] > top[3][1]
    assert FWE_NOISE not in p.answers and len(coded) == sum(p.meta["counts"].values())


def test_passkey_is_dam_evals_generator_with_its_answer_in_the_needle(tok):
    p = make_prompt("passkey", tok, 700, 2, 0, "prose")
    assert re.fullmatch(r"\d{5}", p.answers[0]) and p.meta["needles"][0] in p.text
    assert occurrences(p.text, p.answers[0]) == 2  # "The pass key is K. Remember it. K is the pass key."
    assert p.ids == tok(p.text, add_special_tokens=True).input_ids


def test_chat_and_completion_forms(tok, chat_tok):
    for task in SUITE_TASKS:
        auto = make_prompt(task, chat_tok, 700, 1, 0, "prose")
        plain = make_prompt(task, chat_tok, 700, 1, 0, "prose", chat=False)
        assert auto.meta["format"] == "chat" and plain.meta["format"] == "completion"
        assert auto.text.startswith("<s> user :") and "assistant :" in auto.text
        assert not plain.text.startswith("<s>") and "assistant :" not in plain.text
        assert auto.answers == plain.answers
        assert auto.ids == chat_tok(auto.text, add_special_tokens=False).input_ids
        if task != "passkey":
            cue = plain.text.rsplit("\n", 1)[1]  # the completion cue ends the prompt, e.g. "... are:"
            # the memo's cue is its needle's own words ("The code is" before "The code is 12345.")
            assert auto.text.endswith(cue) and (cue.endswith(":") or (task == "memo" and cue == "The code is"))
        assert make_prompt(task, tok, 700, 1, 0, "prose").meta["format"] == "completion"
        with pytest.raises(DamUsageError, match="chat template"):
            make_prompt(task, tok, 700, 1, 0, "prose", chat=True)


# ---- splits ----------------------------------------------------------------------------------------------

def test_splits_never_share_a_seed(tok):
    ranges = list(SPLITS.values())
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            assert a.stop <= b.start or b.stop <= a.start
    assert {"development", "heldout-a", "heldout-b"} <= set(SPLITS)
    seen = {}
    for split in SPLITS:
        prompts = suite_prompts(tok, 300, split, 3, tasks=("niah_single", "cwe"))
        assert [p.meta["task"] for p in prompts] == ["niah_single"] * 3 + ["cwe"] * 3
        for p in prompts:
            assert p.meta["split"] == split and split_of(p.meta["seed"]) == split
            assert seen.setdefault(p.meta["seed"], split) == split
    assert list(split_seeds("heldout-b", 2)) == [SPLITS["heldout-b"].start, SPLITS["heldout-b"].start + 1]


def test_suite_prompts_are_deterministic_and_cover_every_task(tok):
    a = suite_prompts(tok, 350, "development", 3)
    b = suite_prompts(tok, 350, "development", 3)
    assert [(p.text, p.answers) for p in a] == [(p.text, p.answers) for p in b]
    assert len(a) == 3 * len(SUITE_TASKS) and all(isinstance(p, Prompt) for p in a)
    assert {p.meta["task"] for p in a} == set(SUITE_TASKS)
    assert all(len(p.ids) <= 350 for p in a)
    held = suite_prompts(tok, 350, "heldout-a", 3)
    assert not {p.text for p in a} & {p.text for p in held}


def test_bad_arguments_say_what_to_do(tok):
    with pytest.raises(DamUsageError, match="unknown split"):
        suite_prompts(tok, 500, "test", 1)
    with pytest.raises(DamUsageError, match="unknown suite task"):
        suite_prompts(tok, 500, "development", 1, tasks=("niah",))
    with pytest.raises(DamUsageError, match="samples per task"):
        suite_prompts(tok, 500, "development", 0)
    with pytest.raises(DamUsageError, match="unknown haystack"):
        make_prompt("niah_single", tok, 500, 1, 0, "poetry")
    with pytest.raises(DamError, match="too short"):
        make_prompt("vt", tok, 40, 1, 0, "prose")


# ---- scoring ---------------------------------------------------------------------------------------------

def test_scoring_exact_partial_and_none():
    answers = ("4821907", "mango", "ab12cd34-0000-1111-2222-333344445555", "QWERT")
    assert match_all("4821907, Mango, AB12CD34-0000-1111-2222-333344445555 and qwert.", answers) == 1.0
    assert match_all("The values are 4821907 and mango.", answers) == 0.5
    assert match_all("I do not know.", answers) == 0.0
    assert match_part("only mango here", answers) == 1.0 and match_part("nothing", answers) == 0.0
    assert found_items("48219070 mangoes xQWERT", answers) == [False, False, False, False]  # no glued matches
    assert found_items("4821907\x00mango\nqwert", answers) == [True, True, False, True]


def test_score_uses_the_tasks_metric_on_a_real_prompt(tok):
    p = make_prompt("niah_multivalue", tok, 600, 8, 0, "prose")
    assert score(p, " " + ", ".join(p.answers)) == 1.0
    assert score(p, " " + " ".join(p.answers[:3])) == 0.75
    assert score(p, " " + " ".join(p.meta["distractors"] or ["nothing"])) == 0.0


# ---- the real tokenizer ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_tokenizer_budgets_hold_for_every_task():
    from transformers import AutoTokenizer

    from dam_cli.runtime.models import embedded_model_folder
    try:
        folder = embedded_model_folder()
    except DamError as e:
        pytest.skip(str(e))
    real = AutoTokenizer.from_pretrained(folder)
    for length in (1024, 8192):
        for p in suite_prompts(real, length, "development", 3):
            assert p.meta["tokens"] == len(p.ids) <= length
            assert length - len(p.ids) <= max(48, 0.02 * length), (p.meta["task"], p.meta["haystack"], len(p.ids))
            assert all(a in p.text for a in p.answers)


@pytest.mark.parametrize("length", [300, 1024, 2500])
def test_memo_holds_its_code_once_at_its_depth_and_fills_the_budget(tok, length):
    """The code is the only five-digit number of the memo, stated once, at the seeded depth; the memo is varied
    prose (no sentence repeated as the passkey's filler is) and fills the budget to within one sentence."""
    depths = []
    for i in range(6):
        p = make_prompt("memo", tok, length, 21, i, "logs")  # the haystack argument is ignored: always prose
        (code,) = p.answers
        assert re.fullmatch(r"\d{5}", code) and re.findall(r"\b\d{5,}\b", p.text) == [code]
        assert p.meta["haystack"] == "prose" and p.meta["needles"] == [f"The code is {code}."]
        assert len(p.ids) == p.meta["tokens"] <= length and p.text.endswith("\nThe code is")
        body = p.text.split("\n", 1)[1].rsplit("\n", 2)[0]
        sentences = [s for s in re.split(r"(?<=\.)\s+", body) if s]
        at = sentences.index(f"The code is {code}.")
        assert abs(at / len(sentences) - p.meta["depths"][0]) <= 2 / len(sentences) + 0.02
        assert Counter(sentences).most_common(1)[0][1] <= max(3, len(sentences) // 20)  # varied, not one filler
        depths.append(p.meta["depths"][0])
        hay = Haystack("prose", Rng.keyed("memo-haystack", 21, i).randint(0, 1 << 30))
        nxt = hay.units(p.meta["units"] + 1)[-1]  # the word tokenizer is additive: one more sentence would not fit
        assert length - len(p.ids) < n_tokens(tok, nxt), length - len(p.ids)
    assert len(set(depths)) == 6 and max(depths) - min(depths) > 0.3  # depths spread over the memo
