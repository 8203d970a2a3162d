"""Settings: precedence, coercion and one-line validation errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from kgsupervisor import config
from kgsupervisor.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("env, message", [
    ({"KG_NUM_WORKERS": "-1"}, "KG_NUM_WORKERS=-1: expected a whole number from 1 to 256"),
    ({"KG_NUM_WORKERS": "two"}, "KG_NUM_WORKERS='two': expected a whole number"),
    ({"KG_SERVICE_URL": "localhost:8088"}, "KG_SERVICE_URL='localhost:8088': expected an http"),
    ({"KG_POLL_INTERVAL": "0"}, "KG_POLL_INTERVAL=0.0: expected a number > 0"),
    ({"KG_SERVICE_ENABLED": "maybe"}, "KG_SERVICE_ENABLED='maybe': expected true or false"),
    ({"KG_POLL_INTERVAL": "nan"}, "KG_POLL_INTERVAL='nan': expected a number"),
])
def test_bad_environment_values_name_the_variable_and_value(env, message):
    with pytest.raises(ConfigError) as info:
        config.load({}, env)
    assert message in str(info.value)


def test_booleans_and_numbers_from_the_environment():
    s, _ = config.load({}, {"KG_SERVICE_ENABLED": "false", "KG_NUM_WORKERS": "4", "KG_SERVICE_TIMEOUT": "90"})
    assert (s.service_enabled, s.num_workers, s.service_timeout) == (False, 4, 90.0)


def test_empty_environment_values_are_ignored():
    s, sources = config.load({}, {"KG_NUM_WORKERS": ""})
    assert s.num_workers == 2 and sources["num_workers"] == "default"


def test_token_file_and_masking(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    s, _ = config.load({}, {"KG_SERVICE_TOKEN_FILE": str(token_file)})
    assert s.token() == "s3cret"
    s, _ = config.load({}, {"KG_SERVICE_TOKEN": "abc"})
    assert s.masked()["service_token"] == "********"
    with pytest.raises(ConfigError, match="a readable file"):
        config.load({}, {"KG_SERVICE_TOKEN_FILE": str(tmp_path / "missing")})[0].token()


@hsettings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(config.ENV_NAMES)), st.text(max_size=12), max_size=6))
def test_any_environment_either_loads_or_raises_config_error(env):
    try:
        settings, sources = config.load({}, env)
    except ConfigError as exc:
        assert "\n" not in str(exc) and ": expected " in str(exc)
    else:
        config.validate(settings)


def test_the_shipped_example_config_loads():
    import pathlib
    example = pathlib.Path(__file__).parent.parent / "conf" / "kgsupervisor.toml"
    settings, sources = config.load({}, {}, str(example))
    assert settings.db_path == "/var/lib/crawl/crawl.db"
    assert sources["num_workers"].startswith("file ")


def test_several_kg_service_urls_from_the_environment_and_from_a_toml_list(tmp_path):
    s, _ = config.load({}, {"KG_SERVICE_URL": "http://gpu1:8088, http://gpu2:8088/ ,http://gpu3:8088"})
    assert s.service_urls() == ["http://gpu1:8088", "http://gpu2:8088", "http://gpu3:8088"]
    path = tmp_path / "kg.toml"
    path.write_text('[kgsupervisor]\nservice_url = ["http://gpu1:8088", "https://gpu2"]\n')
    s, _ = config.load({}, {}, str(path))
    assert s.service_urls() == ["http://gpu1:8088", "https://gpu2"]
    assert config.load({}, {})[0].service_urls() == ["http://localhost:8088"]


@pytest.mark.parametrize("value, message", [
    ("http://gpu1:8088,gpu2:8088", "KG_SERVICE_URL='http://gpu1:8088,gpu2:8088': expected an http:// or https:// "
                                   "URL with a host, e.g. http://localhost:8088 (or several, comma-separated; "
                                   "'gpu2:8088' is not one)"),
    ("http://gpu1:8088,http://gpu1:8088/", "expected each KG service URL once"),
    (" , ", "expected an http:// or https:// URL with a host"),
])
def test_a_bad_url_in_a_list_is_named_in_one_line(value, message):
    with pytest.raises(ConfigError) as info:
        config.load({}, {"KG_SERVICE_URL": value})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_toml_list_of_non_strings_is_one_line(tmp_path):
    path = tmp_path / "kg.toml"
    path.write_text('service_url = ["http://gpu1:8088", 8088]\n')
    with pytest.raises(ConfigError, match=r"service_url=\['http://gpu1:8088', 8088\]: expected a list of strings"):
        config.load({}, {}, str(path))
    path.write_text('num_workers = [1, 2]\n')
    with pytest.raises(ConfigError, match="num_workers"):
        config.load({}, {}, str(path))
