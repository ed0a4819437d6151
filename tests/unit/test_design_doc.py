"""docs/design.md must show the state diagram of the transition table as it is."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_design_document_shows_the_current_state_diagram() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_state_diagram", DOCS / "make_state_diagram.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (DOCS / "design.md").read_text()
    assert module.embedded(text) == module.diagram(), (
        "run: python docs/make_state_diagram.py --write"
    )
