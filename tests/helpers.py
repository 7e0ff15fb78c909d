"""Helpers shared by the test packages: repository paths (imported as `helpers`; tests/ is on pythonpath)."""

from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shipped profiles: the paper's recipe (most tests use it: its properties are the spec's) and the recommended one.
SHIPPED_PROFILE = os.path.join(REPO_ROOT, "profiles", "smollm2-135m-instruct-paper.safetensors")
RECOMMENDED_PROFILE = os.path.join(REPO_ROOT, "profiles", "smollm2-135m-instruct.safetensors")
