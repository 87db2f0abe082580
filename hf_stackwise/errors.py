"""The errors a user can fix; every message names the recipe key (or path) and what would fix it."""

from __future__ import annotations


class StackwiseError(ValueError):
    """Base of every error the user can fix (bad recipe, run folder, checkpoint, export or plot source)."""


class RecipeError(StackwiseError):
    """Every problem found in a recipe, each naming its key path and the fix."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the recipe:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)
