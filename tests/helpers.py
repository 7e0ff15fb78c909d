"""Helpers shared by the test packages: repository paths (imported as `helpers`; tests/ is on pythonpath)."""

from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_PROFILE = os.path.join(REPO_ROOT, "profiles", "smollm2-135m-instruct.safetensors")
