"""The docs keep up with the code: every setting is in the README's table, the README stays
short, and the docs' relative links lead somewhere. Pure: no services."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from m3t.settings import PROJECT_ROOT, Settings

README = PROJECT_ROOT / "README.md"
DOCS = [
    README,
    PROJECT_ROOT / "docs" / "architecture.md",
    PROJECT_ROOT / "docs" / "security.md",
    PROJECT_ROOT / "benchmarks" / "README.md",
    PROJECT_ROOT / "trainer" / "README.md",
]
PREFIX = Settings.model_config["env_prefix"]
DELIMITER = Settings.model_config["env_nested_delimiter"]


def env_names(model: type[BaseModel] = Settings, prefix: str = PREFIX) -> list[str]:
    """The environment variable of every field, nested groups' fields included."""
    names = []
    for field, info in model.model_fields.items():
        name = prefix + field.upper()
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names += env_names(info.annotation, name + DELIMITER)
        else:
            names.append(name)
    return names


def test_env_names_walk_the_nested_groups():
    names = env_names()
    assert "M3T_STATE_DIR" in names
    assert "M3T_KAFKA__FETCH_WAIT_MAX_MS" in names
    assert "M3T_TRITON__CXR_PIPELINE" in names
    assert not any(name in names for name in ("M3T_REDIS", "M3T_KAFKA", "M3T_TRITON", "M3T_API"))


def test_readme_names_every_setting():
    mentioned = set(re.findall(r"M3T_[A-Z0-9_]+", README.read_text()))
    missing = [name for name in env_names() if name not in mentioned]
    assert not missing, f"README.md's Settings table lacks {missing}"


def test_readme_names_no_setting_that_does_not_exist():
    unknown = set(re.findall(r"M3T_[A-Z0-9_]+", README.read_text())) - set(env_names())
    assert not unknown, (
        f"README.md names variables that m3t/settings.py does not read: {sorted(unknown)}"
    )


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines < 220, (
        f"README.md has {lines} lines; design goes to docs/, "
        "benchmark detail to benchmarks/README.md"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_relative_links_lead_to_files(doc: Path):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    broken = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not broken, f"{doc.name} links to missing files: {broken}"
