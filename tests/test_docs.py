"""The documentation's runnable example still runs: docs/api.md cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def first_python_block(markdown: str) -> str:
    match = re.search(r"^```python[ \t]*\n(.*?)^```[ \t]*$", markdown, flags=re.DOTALL | re.MULTILINE)
    assert match, "docs/api.md has no ```python block"
    return match.group(1)


def test_api_example_runs(tmp_path):
    code = first_python_block((DOCS / "api.md").read_text(encoding="utf-8"))
    script = tmp_path / "api_example.py"
    script.write_text(code, encoding="utf-8")
    # Everything the example writes (tempfile.mkdtemp) lands in tmp_path; one thread is
    # plenty for a tiny model and does not starve other work on small machines.
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example printed nothing"
    assert "reconstruction PSNR" in result.stdout
    assert "cancelled:" in result.stdout
