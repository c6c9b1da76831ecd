"""The hook-surface check (vllm_cos.adapters.surface_check; scripts/check_hooks.py): static only."""

import subprocess
import sys
from pathlib import Path

from vllm_cos.adapters.surface import SURFACE, Entry
from vllm_cos.adapters.surface_check import CHANGED, MISSING, PRESENT, check_tree, format_results

ROOT = Path(__file__).resolve().parent.parent


def _installed_site_packages() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin, "vLLM is not installed"
    return Path(spec.origin).parent.parent


def test_installed_vllm_has_every_hook():
    results = check_tree(_installed_site_packages())
    bad = format_results(results, verbose=False)[:-1]
    assert not bad, "\n".join(bad)
    assert len(results) == len(SURFACE) and all(r.status == PRESENT for r in results)


def test_surface_entries_are_unique_and_well_formed():
    keys = [(e.module, e.qualname) for e in SURFACE]
    assert len(keys) == len(set(keys))
    for e in SURFACE:
        assert e.module.startswith("vllm") and e.kind in ("function", "method", "class", "attribute", "string")
        assert (e.params is not None) == (e.kind in ("function", "method")), e


def _fake_tree(tmp_path: Path) -> Path:
    pkg = tmp_path / "vllm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .base import Base as Base\n")
    (pkg / "sub" / "base.py").write_text(
        "class Base:\n"
        "    def __init__(self):\n        self.field = 1\n"
        "    def hook(self, a, b, *, c=None):\n        pass\n")
    (pkg / "sub" / "child.py").write_text(
        "from vllm.sub import Base\n"
        "class Child(Base):\n    def own(self, x):\n        pass\n"
        "def helper(y, **kw):\n    pass\n"
        "KEY = 'secret_attr'\n")
    return tmp_path


ENTRIES = [
    Entry("vllm.sub.child", "Child.hook", "method", ("a", "b", "c")),  # inherited through an import
    Entry("vllm.sub.child", "Child.field", "attribute"),  # self.field in the base's __init__
    Entry("vllm.sub.child", "Child.own", "method", ("x", "extra")),  # changed
    Entry("vllm.sub.child", "helper", "function", ("y", "**kw")),
    Entry("vllm.sub.child", "Child.gone", "method", ()),  # missing
    Entry("vllm.sub.child", "nothing", "function", ()),  # missing
    Entry("vllm.sub.child", "KEY", "class"),  # changed: not a class
    Entry("vllm.sub.child", "secret_attr", "string"),
    Entry("vllm.nowhere", "X", "attribute"),  # missing module
]


def test_fake_tree_reports_missing_and_changed(tmp_path):
    results = check_tree(_fake_tree(tmp_path), ENTRIES)
    status = [r.status for r in results]
    assert status == [PRESENT, PRESENT, CHANGED, PRESENT, MISSING, MISSING, CHANGED, PRESENT, MISSING]
    assert results[0].where == "vllm.sub.base:Base"
    assert results[2].found_params == ("x",)
    lines = format_results(results)
    assert "CHANGED  vllm.sub.child:Child.own (method): parameters differ; expected (x, extra), found (x)" in lines
    assert "MISSING  vllm.sub.child:Child.gone (method)" in lines
    assert lines[-1] == "hook surface: 9 names, 4 present, 3 missing, 2 changed"


def test_script_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_hooks.py"), "-q",
                         str(_installed_site_packages())], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith("0 missing, 0 changed")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_hooks.py"), "-q",
                          str(_fake_tree(tmp_path))], capture_output=True, text=True)
    assert bad.returncode == 1 and "MISSING" in bad.stdout


def test_changed_bodies_lists_hooked_code_that_differs_not_reformatting(tmp_path):
    from vllm_cos.adapters.surface_check import changed_bodies

    old, new = _fake_tree(tmp_path / "old"), _fake_tree(tmp_path / "new")
    child = new / "vllm" / "sub" / "child.py"
    text = child.read_text()
    # helper: reformatted and commented only; Child.own: one statement more
    child.write_text(text.replace("def helper(y, **kw):\n    pass\n", "def helper(y,\n           **kw):  # note\n    pass\n")
                     .replace("    def own(self, x):\n        pass\n", "    def own(self, x):\n        x = 1\n"))
    entries = [e for e in ENTRIES if e.qualname in ("Child.own", "helper", "Child.hook", "Child.gone")]
    assert changed_bodies(old, new, entries) == ["vllm.sub.child:Child.own"]
    assert changed_bodies(old, old, entries) == []
