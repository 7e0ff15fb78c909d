"""`dam generate` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("generate", help="(not built yet)")
    def _cmd() -> None:
        from ..errors import DamError

        raise DamError("`dam generate` is not built yet")
