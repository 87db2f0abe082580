"""bitsandbytes is imported when something uses it, not when PEFT or transformers' Trainer is imported.

``peft.helpers`` imports bitsandbytes at module level, and ``transformers.trainer_utils`` imports PEFT, so every
``hf-stackwise`` command (``plan`` included) paid bitsandbytes' import (~4 s on 2 busy cores) and printed its
"Failed to load CPU gemm_4bit_forward from kernels-community ... offline" warning, quantized recipe or not.
:func:`defer_bitsandbytes` puts a stand-in module in ``sys.modules``: importing the name is free, and the first
attribute anyone reads from it (``bnb.nn``, ``import bitsandbytes.nn``, ``from bitsandbytes import ...``) imports
the real package, which from then on is ``sys.modules["bitsandbytes"]``; earlier holders of the stand-in read
through to it. ``importlib.util.find_spec("bitsandbytes")`` still answers without importing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types

NAME = "bitsandbytes"


class _Deferred(types.ModuleType):
    """Stand-in for a package not yet imported: any attribute it does not hold imports the real one."""

    def __getattr__(self, attribute: str):
        return getattr(_load(self), attribute)

    def __dir__(self):
        return dir(_load(self))


def _load(stand_in: _Deferred) -> types.ModuleType:
    if sys.modules.get(NAME) is stand_in:
        del sys.modules[NAME]
        try:
            module = importlib.import_module(NAME)
        except BaseException:
            sys.modules[NAME] = stand_in
            raise
        stand_in.__dict__["_real"] = module
        return module
    real = stand_in.__dict__.get("_real")
    return real if real is not None else importlib.import_module(NAME)


def defer_bitsandbytes() -> bool:
    """Install the stand-in unless bitsandbytes is imported already or not installed; True if installed."""
    if NAME in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec(NAME)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    stand_in = _Deferred(NAME)
    # The attributes module scans read (inspect.getmodule, importlib.util.find_spec) answer without importing;
    # no __path__, so importing a submodule goes through __getattr__ and imports the package first.
    stand_in.__dict__.update(__spec__=spec, __file__=spec.origin, __loader__=spec.loader, __package__=NAME)
    sys.modules[NAME] = stand_in
    return True


def bitsandbytes_loaded() -> bool:
    """Whether the real bitsandbytes has been imported (a 4-bit layer can exist only then)."""
    module = sys.modules.get(NAME)
    return module is not None and not isinstance(module, _Deferred)


@contextlib.contextmanager
def without_bitsandbytes():
    """While no 4-bit layer exists (bitsandbytes not imported): PEFT's LoRA dispatch sees no bitsandbytes, so
    attaching adapters to a full-precision model does not import it (``peft.import_utils.is_bnb_4bit_available``
    reads ``bnb.nn``). PEFT's cached answers are primed for the block and cleared after it."""
    if bitsandbytes_loaded():
        yield
        return
    try:
        from peft import import_utils
    except ImportError:
        yield
        return
    checks = [getattr(import_utils, name, None) for name in ("is_bnb_available", "is_bnb_4bit_available")]
    checks = [check for check in checks if hasattr(check, "cache_clear")]
    saved = sys.modules.get(NAME, _MISSING)
    try:
        sys.modules[NAME] = None  # importlib.util.find_spec answers None: "not installed", for this block only
        for check in checks:
            check.cache_clear()
            check()
    finally:
        if saved is _MISSING:
            del sys.modules[NAME]
        else:
            sys.modules[NAME] = saved
    try:
        yield
    finally:
        for check in checks:
            check.cache_clear()


_MISSING = object()
