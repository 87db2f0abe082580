"""``hf-stackwise`` and the pipeline behind it: the commands (``commands``), recipe → config → rack → data →
resolved schedule → cache decisions → arguments → trainer (``pipeline``), the checks before any weight loads
(``preflight``, ``cache_checks``) and ``plan`` with its memory model (``plan``, ``plan_memory``).

May import: anything; nothing imports it.
"""

from .commands import main

__all__ = ["main"]
