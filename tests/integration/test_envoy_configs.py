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
    base = yaml.safe_load((launcher.envoy_config_dir() / "envoy-original-dst.yaml").read_text())
    duplex = yaml.safe_load((launcher.envoy_config_dir() / "envoy-full-duplex.yaml").read_text())
    assert _ext_proc(duplex)["typed_config"]["processing_mode"]["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    for conf in (base, duplex):
        _ext_proc(conf)["typed_config"].pop("processing_mode")
    assert base == duplex


@pytest.mark.parametrize("name", CONFIGS)
def test_the_routing_header_is_stripped_before_any_route_is_chosen(name):
    conf = yaml.safe_load((launcher.envoy_config_dir() / name).read_text())
    hcm = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [early] = hcm["early_header_mutation_extensions"]
    assert {"remove": "x-gateway-destination-endpoint"} in early["typed_config"]["mutations"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_names_the_fallback_list_length_it_pairs_with(name):
    paired = launcher.paired_fallback_endpoints(name)
    clusters = yaml.safe_load((launcher.envoy_config_dir() / name).read_text())["static_resources"]["clusters"]
    original_dst = any(c.get("type") == "ORIGINAL_DST" for c in clusters)
    assert (paired == 0) == original_dst, "ORIGINAL_DST reads one address; a list needs the override-host policy"


def test_the_default_override_host_config_keeps_the_former_defaults_promises_and_retries_down_the_list():
    base = yaml.safe_load((launcher.envoy_config_dir() / "envoy-original-dst.yaml").read_text())
    override = yaml.safe_load((launcher.envoy_config_dir() / "envoy.yaml").read_text())
    listener = override["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == base["static_resources"]["listeners"][0][
        "per_connection_buffer_limit_bytes"]
    ext_proc, base_ext_proc = _ext_proc(override)["typed_config"], _ext_proc(base)["typed_config"]
    assert ext_proc["failure_mode_allow"] is True and ext_proc["processing_mode"] == base_ext_proc["processing_mode"]
    assert ext_proc["metadata_options"]["receiving_namespaces"] == {"untyped": ["envoy.lb"]}
    [route] = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert {"connect-failure", "reset"} <= set(route["route"]["retry_policy"]["retry_on"].split(","))
    pods = next(c for c in override["static_resources"]["clusters"] if c["name"] == route["route"]["cluster"])
    policy = pods["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["name"] == "envoy.load_balancing_policies.override_host"
    sources = policy["typed_config"]["override_host_sources"]
    assert {"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}} in sources
