"""Checked-in generated code must match what `make proto` produces from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(REPO)) for p in (REPO / "proto/intertie/v1").glob("*.proto"))
    out = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                          f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    generated = sorted(p.name for p in (tmp_path / "intertie/v1").iterdir())
    checked_in = sorted(p.name for p in (REPO / "runtime/intertie/v1").iterdir()
                        if p.name != "__init__.py" and p.suffix in (".py", ".pyi"))
    assert generated == checked_in, "run `make proto`"
    stale = [n for n in generated if not filecmp.cmp(tmp_path / "intertie/v1" / n,
                                                     REPO / "runtime/intertie/v1" / n, shallow=False)]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
