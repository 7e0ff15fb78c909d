"""A RULER-style long-context task suite, generated offline and deterministically (docs/guides/tasks.md).

Tasks: needle retrieval (single, multi-key, multi-value, multi-query), variable tracking, common- and
frequent-word extraction, and `dam eval`'s passkey; haystacks of prose, code and logs; seed splits for
development and held-out use; exact-match scoring. Modelled on RULER (Hsieh et al., 2024).
"""

from dam_cli.evaluation.suite.haystacks import HAYSTACKS, Haystack, haystack_text
from dam_cli.evaluation.suite.niah import VALUE_KINDS
from dam_cli.evaluation.suite.prompting import Prompt
from dam_cli.evaluation.suite.scoring import found_items, match_all, match_part, score
from dam_cli.evaluation.suite.splits import SPLITS, split_of, split_seeds, suite_prompts
from dam_cli.evaluation.suite.tasks import SUITE_TASKS, TASKS, SuiteTask, make_prompt

__all__ = ["HAYSTACKS", "Haystack", "haystack_text", "VALUE_KINDS", "Prompt", "found_items", "match_all",
           "match_part", "score", "SPLITS", "split_of", "split_seeds", "suite_prompts", "SUITE_TASKS", "TASKS",
           "SuiteTask", "make_prompt"]
