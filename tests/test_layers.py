"""The import layers of docs/architecture.md hold: every services/ folder imports only from the
folders below it, and capsnet_core imports no service code."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Floors, top to bottom (docs/architecture.md "Layout and layers"); folders on one floor are independent.
FLOORS = [{"cli", "client"}, {"worker", "stack"}, {"runs"}, {"results", "metrics"}, {"queue"}, {"spec"}, {"config"},
          {"artifacts"}]
FLOOR_OF = {name: i for i, floor in enumerate(FLOORS) for name in floor}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_services_folders_import_only_downward() -> None:
    services = REPO_ROOT / "services"
    upward = []
    for path in services.rglob("*.py"):
        parts = path.relative_to(services).with_suffix("").parts
        if parts == ("__init__",):
            continue
        mine = parts[0]
        assert mine in FLOOR_OF, f"{path}: a folder or module docs/architecture.md does not place"
        for module in _imports(path):
            if not module.startswith("services."):
                continue
            theirs = module.split(".")[1]
            if theirs != mine and FLOOR_OF[theirs] <= FLOOR_OF[mine]:
                upward.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert not upward, "\n".join(upward)


def test_services_has_only_settings_and_artifacts_at_its_top() -> None:
    top = sorted(p.name for p in (REPO_ROOT / "services").glob("*.py"))
    assert top == ["__init__.py", "artifacts.py", "config.py"]


def test_capsnet_core_imports_no_service_code() -> None:
    for path in (REPO_ROOT / "capsnet_core").rglob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in {"services", "redis", "ray", "click", "prometheus_client"}}
        assert not bad, f"{path}: {bad}"
