"""The documentation's Python code blocks run as written (README.md, then docs/explain.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(doc: str) -> list[str]:
    return BLOCK.findall((ROOT / doc).read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", ["README.md", "docs/explain.md"])
def test_python_blocks_run_in_order(doc, tmp_path, monkeypatch):
    code = blocks(doc)
    assert code, f"{doc} has no python code blocks"
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace: dict = {"__name__": f"doc_{Path(doc).stem}"}
    for i, block in enumerate(code):
        try:
            exec(compile(block, f"{doc} block {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"{doc}: python block {i + 1} failed: {type(exc).__name__}: {exc}\n"
                                 f"{block}") from exc
