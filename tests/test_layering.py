"""Imports point one way: pure core -> engine set-up -> adapters -> offline helpers / CLI.

The pure core and the engine set-up import nothing from vLLM or from the adapters; the
adapters import nothing from the offline helpers, the CLI or the benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_cos"
CORE = ["combine", "sampling", "verify", "ledger", "schedule", "config", "rules", "cosd", "model_files",
        "coupling", "overrides", "adaptive", "lazy", "mixture", "reference", "drafter_losses", "drafter_blocks",
        "drafter_training"]
ENGINE_SETUP = ["engine"]
ABOVE_ADAPTERS = ("vllm_cos.offline", "vllm_cos.cli", "vllm_cos.bench", "vllm_cos.demo")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_and_engine_setup_import_neither_vllm_nor_adapters():
    for name in CORE + ENGINE_SETUP:
        bad = {m for m in imported_modules(PACKAGE / f"{name}.py")
               if m == "vllm" or m.startswith(("vllm.", "vllm_cos.adapters"))}
        assert not bad, f"vllm_cos/{name}.py imports {sorted(bad)}"


def test_adapters_do_not_import_the_layers_above_them():
    for path in sorted((PACKAGE / "adapters").glob("*.py")):
        bad = {m for m in imported_modules(path) if m.startswith(ABOVE_ADAPTERS)}
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_pure_step_stash_and_chain_modules_import_no_vllm():
    for name in ("step", "stash", "chain"):
        bad = {m for m in imported_modules(PACKAGE / "adapters" / f"{name}.py") if m.split(".")[0] == "vllm"}
        assert not bad, f"adapters/{name}.py imports {sorted(bad)}"
