"""A newcomer's first screen is the plan: `plan` over every shipped recipe prints no warning the user did not
cause, and bitsandbytes is imported only when a 4-bit model needs it (issue 24 point 2, issue 18 point 3)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if ACCELERATE_CONFIGS not in p.parents)
# What a library's warning looks like on the screen: Python warnings, logging warnings, bitsandbytes' kernel notice.
WARNING = re.compile(r"warn|deprecat|Failed to load|Skipping publisher|is not available|UserWarning", re.I)

SCRIPT = textwrap.dedent(
    """
    import contextlib, io, sys
    import hf_stackwise
    from hf_stackwise.cli.commands import main
    from hf_stackwise.deferred import bitsandbytes_loaded

    for recipe in sys.argv[1:]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["plan", recipe])
        print(f"=== {recipe} status {status}", file=sys.stderr, flush=True)
    print(f"bitsandbytes loaded: {bitsandbytes_loaded()}", file=sys.stderr)
    """
)


@pytest.fixture(scope="module")
def plan_screen():
    """One process plans every shipped recipe (a fresh process: bitsandbytes' import-time warning shows)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *map(str, RECIPES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_plan_prints_no_warning_for_any_shipped_recipe(plan_screen):
    assert len(RECIPES) >= 15
    for recipe in RECIPES:
        assert f"=== {recipe} status 0" in plan_screen, f"plan {recipe} failed"
    warnings = [line for line in plan_screen.splitlines() if WARNING.search(line)]
    assert warnings == []


@pytest.mark.slow
def test_plan_never_imports_bitsandbytes_even_for_a_quantized_recipe(plan_screen):
    assert any("quantization:" in p.read_text() for p in RECIPES)
    assert "bitsandbytes loaded: False" in plan_screen


def test_importing_the_trainer_defers_bitsandbytes():
    """PEFT imports bitsandbytes at module level and the Trainer imports PEFT; the stand-in keeps it unloaded,
    and the first real use imports the real package."""
    script = textwrap.dedent(
        """
        import sys, importlib.util, warnings
        import hf_stackwise
        from hf_stackwise.trainer import StackwiseTrainer
        import peft.helpers
        from hf_stackwise.deferred import bitsandbytes_loaded
        assert "bitsandbytes" in sys.modules and not bitsandbytes_loaded()
        assert importlib.util.find_spec("bitsandbytes") is not None and not bitsandbytes_loaded()
        # LoRA on a full-precision base: PEFT's dispatch would read bitsandbytes.nn; it does not need to
        from transformers import AutoModelForCausalLM, LlamaConfig
        from hf_stackwise.rack.adapters import attach_adapters
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "blocks": [2, 3]}
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # PEFT's read of a deprecated property stays quiet
            model = attach_adapters(AutoModelForCausalLM.from_config(config), {"stack_1": lora}, "model.layers")
        assert any("lora_A" in n for n, _ in model.named_parameters()) and not bitsandbytes_loaded()
        from peft.import_utils import is_bnb_4bit_available
        linear4bit = peft.helpers.bnb.nn.Linear4bit  # a holder of the stand-in reads through to the real package
        import bitsandbytes
        assert bitsandbytes_loaded() and bitsandbytes.nn.Linear4bit is linear4bit
        assert is_bnb_4bit_available()  # PEFT's cached answer was not left at "unavailable"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
