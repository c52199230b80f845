"""Config validation: every bad key, type or path is an error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedqc.config import Config, load_config, to_dict
from fedqc.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base(tmp_path: Path) -> dict:
    (tmp_path / "site_a").mkdir(exist_ok=True)
    return {"sites": [{"name": "a", "root": "site_a", "labelled": True, "filter": {"VENDOR": "Philips"}}]}


def test_valid_config_is_typed_frozen_and_resolves_paths(tmp_path):
    config = load_config(write(tmp_path, base(tmp_path) | {"train": {"epochs": 3, "lr": 1}}))
    assert isinstance(config, Config)
    assert config.train.epochs == 3 and config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.sites[0].root == (tmp_path / "site_a").resolve()
    assert config.sites[0].filter["VENDOR"] == "Philips"
    assert config.labelled_sites == config.sites
    with pytest.raises(AttributeError):
        config.train.epochs = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("patch", "key", "hint"),
    [
        ({"train": {"epochz": 2}}, "train.epochz", "allowed keys here"),
        ({"train": {"epochs": "two"}}, "train.epochs", "integer"),
        ({"train": {"augment": "yes"}}, "train.augment", "true or false"),
        ({"qc": {"classes": "lv"}}, "qc.classes", "'rv', 'foreground'"),
        ({"views": ["SA", "XX"]}, "views[1]", "allowed values"),
        ({"preprocess": {"size_px": 100}}, "<root>", "multiple of 16"),
        ({"federation": {"strategy": "fedsgd"}}, "federation.strategy", "fedavg"),
        ({"federation": {"aggregation": "krum"}}, "federation.aggregation", "'trimmed-mean'"),
        ({"federation": {"norm_factor": 0.5}}, "federation.norm_factor", "0 (off) or a number >= 1"),
        ({"federation": {"norm_factor": "big"}}, "federation.norm_factor", "number"),
        ({"federation": {"trim_fraction": 0.5}}, "federation.trim_fraction", "[0, 0.5)"),
        ({"federation": {"min_sites": 3, "start_sites": 2}}, "federation.start_sites", "at least min_sites (3)"),
        ({"bogus": 1}, "bogus", "allowed keys"),
    ],
)
def test_bad_values_name_the_key(tmp_path, patch, key, hint):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, base(tmp_path) | patch))
    assert f"'{key}'" in str(info.value) or key == "<root>"
    assert hint in str(info.value)
    assert str(tmp_path / "c.yaml") in str(info.value)


def test_missing_site_root_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"sites\[0\].root.*not found"):
        load_config(write(tmp_path, {"sites": [{"name": "a", "root": "nowhere"}]}))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    # With simulated data the root is created on first use, so it may be absent.
    config = load_config(write(tmp_path, {"sites": [{"name": "a", "root": "nowhere"}], "simulated": {}}))
    assert config.simulated is not None


def test_duplicate_sites_and_missing_required(tmp_path):
    data = base(tmp_path)
    data["sites"].append(dict(data["sites"][0]))
    with pytest.raises(ConfigError, match="unique"):
        load_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match=r"sites\[0\].name.*required"):
        load_config(write(tmp_path, {"sites": [{"root": "."}]}))


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sites: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_round_trip_through_to_dict(tmp_path):
    config = load_config(write(tmp_path, base(tmp_path)))
    again = load_config(write(tmp_path, to_dict(config)))
    assert again == config


def test_overrides(tmp_path):
    config = load_config(write(tmp_path, base(tmp_path)), overrides={"train.epochs": 1, "qc.hausdorff": "p95"})
    assert config.train.epochs == 1 and config.qc.hausdorff == "p95"
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(write(tmp_path, base(tmp_path)), overrides={"train.nope": 1})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path, check_paths=False)  # real-data examples point at folders we do not have
    assert config.sites


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(["train", "qc", "refine", "preprocess", "model", "federation", "sites", "views"]),
       value=yaml_values)
def test_loader_only_ever_raises_config_error(tmp_path_factory, section, value):
    tmp_path = tmp_path_factory.mktemp("h")
    data = base(tmp_path)
    data[section] = value
    try:
        load_config(write(tmp_path, data))
    except ConfigError:
        pass


def test_robust_aggregation_options_reach_the_federation_settings(tmp_path):
    from fedqc.fl.from_config import federation_settings

    config = load_config(write(tmp_path, base(tmp_path)), overrides={
        "federation.aggregation": "trimmed-mean", "federation.trim_fraction": 0.25, "federation.norm_factor": 0})
    settings = federation_settings(config)
    assert (settings.aggregation, settings.trim_fraction, settings.norm_factor) == ("trimmed-mean", 0.25, 0.0)
    assert settings.site_run_config["federation.aggregation"] == "trimmed-mean"  # flat scalars
    defaults = federation_settings(load_config(write(tmp_path, base(tmp_path))))
    assert (defaults.aggregation, defaults.trim_fraction, defaults.norm_factor) == ("mean", 0.2, 10.0)
    assert (defaults.start_sites, federation_settings(load_config(write(tmp_path, base(tmp_path)), overrides={
        "federation.start_sites": 4})).start_sites) == (0, 4)
