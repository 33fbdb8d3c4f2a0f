import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIDPO_SHARED", REPO.parent / "shared"))


def shared_path(*parts) -> Path:
    """A file under ../shared, or skip the test with the reason when it is absent (fresh clone outside CI)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is missing: this test needs ../shared (MiniMind test data) beside the checkout")
    return p
