"""The Envoy configs we ship load in the Envoy we ship with, and stay in step."""

import subprocess

import pytest
import yaml

from extproc.sim import launcher

CONFIGS = sorted(p.name for p in launcher.envoy_config_dir().glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_validates(name):
    result = subprocess.run(
        ["envoy", "--mode", "validate", "-c", str(launcher.envoy_config_dir() / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _ext_proc(conf: dict) -> dict:
    hcm = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")


def test_variants_differ_from_the_default_only_in_processing_mode():
    base = yaml.safe_load((launcher.envoy_config_dir() / "envoy.yaml").read_text())
    duplex = yaml.safe_load((launcher.envoy_config_dir() / "envoy-full-duplex.yaml").read_text())
    assert _ext_proc(duplex)["typed_config"]["processing_mode"]["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    for conf in (base, duplex):
        _ext_proc(conf)["typed_config"].pop("processing_mode")
    assert base == duplex


def test_the_routing_header_is_stripped_before_any_route_is_chosen():
    conf = yaml.safe_load((launcher.envoy_config_dir() / "envoy.yaml").read_text())
    hcm = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [early] = hcm["early_header_mutation_extensions"]
    assert {"remove": "x-gateway-destination-endpoint"} in early["typed_config"]["mutations"]
