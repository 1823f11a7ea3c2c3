"""The README's first command: `bridge demo` runs end to end and exits 0."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_demo_shows_all_three_platforms_converging(tmp_path: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "120", "TERM": "dumb"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("1.", "2.", "3.", "4."):
        assert step in out
    assert "writes: Shoptet 2, MetaKocka 2, Bitrix24 2" in out
    assert "Traceback" not in out + result.stderr
