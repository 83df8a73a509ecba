"""Bad configs fail before any work starts, with a message that names the key."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from schemas.config import (
    DEFAULT_RULES,
    DEFAULT_SIGNALS,
    Bounds,
    ConfigError,
    CurateConfig,
    RunConfig,
    SourceConfig,
    config_differences,
    format_validation_error,
    load_config,
)
from tasks.signals import registry


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
        ("sharpnes: {}\n", "sharpnes: Extra inputs"),
        ("rules:\n  sharpness: {min: 10, mni: 3}\n", "rules.sharpness.mni: Extra inputs"),
        ("rules:\n  sharpness: {min: 100, max: 10}\n", "rules.sharpness: min 100 is above max 10"),
        ("rules:\n  sharpness: {}\n", "rules.sharpness: a rule needs min, max or both"),
        ("rules:\n  blurriness: {min: 1}\n", "rules.blurriness: no signal makes"),
        ("signals: {resolution: {}}\nrules:\n  sharpness: {min: 1}\n", "rules.sharpness: needs signal 'sharpness'"),
        ("signals: {sharpnes: {}}\n", "signals.sharpnes: unknown signal"),
        ("signals: {sharpness: {short_side: 8}}\nrules: {}\n", "signals.sharpness.short_side: Input should be"),
        ("decode: {max_pixels: -5}\n", "decode.max_pixels: Input should be"),
        ("buckets: {base_side: 1000}\n", "buckets.base_side: Input should be a multiple"),
        ("output: {max_rows_per_shard: zero}\n", "output.max_rows_per_shard: Input should be"),
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


# --- every error names its dotted path -----------------------------------------------------


def test_a_bad_signal_parameter_reads_file_path_and_message(tmp_path):
    path = write(tmp_path, "signals: {sharpness: {short_side: 8}}\nrules: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: signals.sharpness.short_side: Input should be greater than or equal to 32"


def test_errors_in_nested_sections_are_one_line_each(tmp_path):
    path = write(tmp_path, "source: {batch_rows: x, changed: maybe}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).splitlines() == [
        f"{path}: source.batch_rows: Input should be a valid integer, unable to parse string as an integer",
        f"{path}: source.changed: Input should be 'refuse' or 'recurate'",
    ]


def test_format_validation_error_puts_the_prefix_before_the_location():
    with pytest.raises(ValidationError) as err:
        Bounds.model_validate({"min": "low"})
    assert format_validation_error(err.value, ("rules", "sharpness")) == (
        "rules.sharpness.min: Input should be a valid number, unable to parse string as a number"
    )


# --- rule bounds within what the column can hold ---------------------------------------------


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("short_side: {min: -256}", "rules.short_side.min: -256 is below 0, the smallest short_side can be"),
        ("caption_words: {max: -1}", "rules.caption_words.max: -1 is below 0, the smallest caption_words can be"),
        ("face_area_ratio: {max: 1.5}",
         "rules.face_area_ratio.max: 1.5 is above 1, the largest face_area_ratio can be"),
        ("ocr_confidence: {min: 2}", "rules.ocr_confidence.min: 2 is above 1, the largest ocr_confidence can be"),
        ("sharpness: {min: -0.5}", "rules.sharpness.min: -0.5 is below 0, the smallest sharpness can be"),
        ("ocr_text: {min: 1}", "rules.ocr_text: ocr_text holds string values; a rule can only bound a numeric"),
    ],
)
def test_a_rule_the_column_cannot_meet_is_refused(tmp_path, rule, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"rules:\n  {rule}\n"))
    assert f": {message}" in str(err.value)


@pytest.mark.parametrize(
    "rules",
    [
        {"face_area_ratio": {"min": 0, "max": 1}},
        {"aspect_ratio": {"min": 0}},
        {"quality": {"min": -50, "max": 500}},  # BRISQUE has no bounds
        {"aesthetic": {"min": -1, "max": 11}},  # nor does the aesthetic head
    ],
)
def test_a_rule_at_or_inside_the_range_is_accepted(rules):
    signals = DEFAULT_SIGNALS | {"aesthetic": {}}
    assert CurateConfig.model_validate({"signals": signals, "rules": rules}).rules.keys() == rules.keys()


def test_every_numeric_column_declares_its_range():
    for cls in registry().values():
        numeric = {f.name for f in cls.fields if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)}
        assert set(cls.ranges) == numeric, cls.name
        for lo, hi in cls.ranges.values():
            assert lo is None or hi is None or lo < hi, cls.name


# --- how defaults merge ----------------------------------------------------------------------


def test_signals_without_rules_get_the_default_rules_of_those_signals_only(tmp_path):
    from_yaml = load_config(write(tmp_path, "signals: {resolution: {}, sharpness: {}}\n"))
    in_python = CurateConfig(signals={"resolution": {}, "sharpness": {}})
    expected = {c: Bounds(**DEFAULT_RULES[c]) for c in ("short_side", "aspect_ratio", "sharpness")}
    assert from_yaml.rules == in_python.rules == expected


def test_given_rules_replace_the_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "rules: {caption_chars: {min: 5}}\n"))
    assert cfg.rules == {"caption_chars": Bounds(min=5)} and cfg.signals == DEFAULT_SIGNALS
    assert load_config(write(tmp_path, "signals: {resolution: {}}\nrules: {}\n")).rules == {}


def test_no_signals_and_no_rules_give_all_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "run: {workers: 8}\n"))
    assert cfg.signals == DEFAULT_SIGNALS and cfg.rules == CurateConfig().rules
    assert cfg.rules == {c: Bounds(**b) for c, b in DEFAULT_RULES.items()} and cfg.source == SourceConfig()


@pytest.mark.parametrize(
    "cfg",
    [
        CurateConfig(),
        CurateConfig(signals={"resolution": {}}),
        CurateConfig(signals={"resolution": {}, "caption": {}}, rules={}),
        CurateConfig(rules={"sharpness": Bounds(min=10)}),
    ],
)
def test_a_stored_config_validates_back_to_itself(cfg):
    assert CurateConfig.model_validate(cfg.model_dump(mode="json")) == cfg


# --- new settings ----------------------------------------------------------------------------


def test_new_settings_defaults():
    run, source = RunConfig(), SourceConfig()
    assert (run.max_signal_error_fraction, run.ray_connect_timeout_s, source.changed) == (0.5, 30.0, "refuse")
    assert RunConfig(max_signal_error_fraction=1, ray_connect_timeout_s=3600).max_signal_error_fraction == 1
    assert SourceConfig(changed="recurate").changed == "recurate"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("run: {max_signal_error_fraction: 0}", "run.max_signal_error_fraction: Input should be greater than 0"),
        ("run: {max_signal_error_fraction: 1.5}", "run.max_signal_error_fraction: Input should be less than or"),
        ("run: {ray_connect_timeout_s: 0}", "run.ray_connect_timeout_s: Input should be greater than 0"),
        ("run: {ray_connect_timeout_s: 3601}", "run.ray_connect_timeout_s: Input should be less than or equal"),
        ("source: {changed: ignore}", "source.changed: Input should be 'refuse' or 'recurate'"),
    ],
)
def test_new_settings_are_validated(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text + "\n"))
    assert needle in str(err.value)


# --- config_differences ----------------------------------------------------------------------


def test_config_differences_names_leaf_settings():
    before = CurateConfig(signals=DEFAULT_SIGNALS | {"aesthetic": {}}).model_dump(mode="json")
    now = CurateConfig(
        source=SourceConfig(unreadable="salvage", changed="recurate"),
        signals={**DEFAULT_SIGNALS, "ocr": {"det_side": 640}},
        rules={**CurateConfig().rules, "sharpness": Bounds(min=80)},
        run=RunConfig(workers=9),
    ).model_dump(mode="json")
    free = ("run", "output", "source.changed")
    assert config_differences(before, now, free) == [
        "rules.sharpness.min", "signals.aesthetic", "signals.ocr.det_side", "source.unreadable",
    ]
    assert "run.workers" in config_differences(before, now, ()) and config_differences(now, now, ()) == []


def test_config_differences_free_paths_match_whole_keys_only():
    before = {"source": {"changed": "refuse", "changed_x": 1}, "rules": {"a": {"min": 1}}}
    now = {"source": {"changed": "recurate", "changed_x": 2}, "rules": {}}
    assert config_differences(before, now, ("source.changed",)) == ["rules.a", "source.changed_x"]
    assert config_differences(before, now, ("source", "rules")) == []
    assert config_differences({"a": None}, {}, ()) == ["a"]  # present as None is not absent
