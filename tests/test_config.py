"""Bad configs fail before any work starts, with a message that names the key."""

from __future__ import annotations

import pytest

from schemas.config import ConfigError, CurateConfig, load_config


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_ordered():
    cfg = load_config(None)
    assert "sharpness" in cfg.signals and cfg.rules["short_side"].min == 256


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sharpnes: {}\n", "sharpnes"),
        ("rules:\n  sharpness: {min: 10, mni: 3}\n", "mni"),
        ("rules:\n  sharpness: {min: 100, max: 10}\n", "above max"),
        ("rules:\n  sharpness: {}\n", "min, max or both"),
        ("rules:\n  blurriness: {min: 1}\n", "blurriness"),
        ("signals: {resolution: {}}\nrules:\n  sharpness: {min: 1}\n", "needs signal 'sharpness'"),
        ("signals: {sharpnes: {}}\n", "unknown signal"),
        ("signals: {sharpness: {short_side: 8}}\nrules: {}\n", "short_side"),
        ("decode: {max_pixels: -5}\n", "max_pixels"),
        ("buckets: {base_side: 1000}\n", "multiple"),
        ("output: {max_rows_per_shard: zero}\n", "max_rows_per_shard"),
        ("- just\n- a list\n", "mapping"),
        ("rules: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert needle in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/t2i.yaml")


def test_analyze_config_has_every_signal_and_no_rule():
    cfg = CurateConfig(signals={"resolution": {}}, rules={}).without_rules()
    assert cfg.rules == {} and {"resolution", "sharpness", "phash", "caption"} <= set(cfg.signals)
