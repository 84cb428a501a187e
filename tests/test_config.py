"""Settings.from_env: defaults, parsing, refusal of bad values, secrets kept out of reprs, docs in step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from multitalk_worker.config import ENV_VARS, Settings, SettingsError
from tests.conftest import REPO


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.weights == "/runpod-volume/multitalk" and not settings.tiny_model
    assert settings.volume_root == Path("/runpod-volume")
    assert settings.max_input_bytes == 100_000_000
    assert settings.max_base64_bytes == 10_000_000
    assert settings.max_duration_s == 40.0
    assert settings.allow_loopback is False and settings.on_runpod is False
    assert settings.s3.bucket is None and settings.s3.url_expiry_s == 3600
    assert settings.log_level == "INFO"
    assert settings.video_crf == 23 and not settings.offload


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "MULTITALK_WEIGHTS": "tiny",
            "MULTITALK_ALLOW_LOOPBACK": "YES",
            "MULTITALK_MAX_INPUT_MB": "2.5",
            "MULTITALK_S3_URL_EXPIRY_S": "60",
            "MULTITALK_LOG_LEVEL": "debug",
            "MULTITALK_CA_BUNDLE": "/tmp/ca.pem",
            "MULTITALK_MAX_RESOLUTION": "480p",
            "MULTITALK_VIDEO_CRF": "0",
            "MULTITALK_S3_BUCKET": "",  # empty counts as unset
            "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID",
        }
    )
    assert settings.tiny_model and settings.allow_loopback
    assert settings.max_input_bytes == 2_500_000
    assert settings.s3.url_expiry_s == 60 and settings.s3.bucket is None
    assert settings.log_level == "DEBUG" and settings.ca_bundle == Path("/tmp/ca.pem")
    assert settings.max_resolution == "480p" and settings.on_runpod
    assert settings.video_crf == 0


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MULTITALK_ALLOW_LOOPBACK", "maybe", "expected one of"),
        ("MULTITALK_MAX_INPUT_MB", "lots", "MULTITALK_MAX_INPUT_MB"),
        ("MULTITALK_MAX_INPUT_MB", "-1", "> 0"),
        ("MULTITALK_FETCH_TIMEOUT_S", "nan", "finite"),
        ("MULTITALK_MAX_DURATION_S", "41", "(0, 40]"),
        ("MULTITALK_VIDEO_CRF", "52", "0..51"),
        ("MULTITALK_S3_URL_EXPIRY_S", "604801", "7 days"),
        ("MULTITALK_MAX_RESOLUTION", "1080p", "480p, 720p"),
        ("MULTITALK_LOG_LEVEL", "LOUD", "DEBUG"),
        ("MULTITALK_S3_ACCESS_KEY_ID", "AKIA", "both"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert fragment in str(info.value)


def test_secrets_stay_out_of_repr_and_report() -> None:
    settings = Settings.from_env(
        {
            "MULTITALK_S3_ACCESS_KEY_ID": "AKIDSECRETVALUE123",
            "MULTITALK_S3_SECRET_ACCESS_KEY": "very-secret-value-xyz",
            "MULTITALK_S3_SESSION_TOKEN": "token-secret-abc",
        }
    )
    for text in (repr(settings), str(settings.public_dict())):
        for secret in ("AKIDSECRETVALUE123", "very-secret-value-xyz", "token-secret-abc"):
            assert secret not in text
    assert settings.public_dict()["MULTITALK_S3_SECRET_ACCESS_KEY"] == "set"
    assert settings.public_dict()["MULTITALK_S3_SESSION_TOKEN"] == "set"


def test_docs_table_matches_settings() -> None:
    """docs/settings.md lists exactly the variables of ENV_VARS, with their defaults."""
    text = (REPO / "docs" / "settings.md").read_text()
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \| ([^|]+) \|", text, flags=re.M)
    documented = {name: default.strip() for name, _, default in rows}
    assert list(documented) == [var.name for var in ENV_VARS]
    for var in ENV_VARS:
        expected = f"`{var.default}`" if var.default is not None else "unset"
        assert documented[var.name] == expected, var.name


def test_runpod_hub_offers_only_known_settings_with_their_defaults() -> None:
    """Every env input of .runpod/hub.json is a setting, with a default that the settings parser accepts
    and that equals the worker's own default (where the worker has one)."""
    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    known = {var.name: var for var in ENV_VARS}
    for entry in hub["config"]["env"]:
        var = known[entry["key"]]
        field = entry["input"]
        default = field["default"]
        if field["type"] == "boolean":  # the Hub sets trueValue / falseValue in the environment
            default = field["trueValue"] if default else field["falseValue"]
        default = str(default)
        Settings.from_env({var.name: default})  # parses (empty counts as unset)
        if default and var.default is not None:
            assert default == var.default, var.name
