import stat

import pytest

from nodes.agent import config
from nodes.agent.config import ConfigError

UNIT = "7b0e4c1a-2f7d-4a53-9a3e-0d5f4b6c8e21"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("CONFIG", "URL", "UNIT_ID", "CREDENTIAL", "SIMULATE", "WORK_DIR", "STATE_DIR"):
        monkeypatch.delenv(f"SHEDSHARE_AGENT_{key}", raising=False)


def enrolled(tmp_path):
    path = tmp_path / "etc" / "shedshare" / "agent.json"
    config.save_enrolment(path, url="http://shed.test/", unit_id=UNIT, credential="shs_node_x")
    return path


def test_an_enrolment_round_trips_through_the_file(tmp_path):
    cfg = config.load(enrolled(tmp_path))

    assert (cfg.url, cfg.unit_id, cfg.credential) == ("http://shed.test", UNIT, "shs_node_x")
    assert cfg.simulate is None
    assert cfg.state_dir == tmp_path / "etc" / "shedshare" / "state"
    assert cfg.work_dir == cfg.state_dir / "work"


def test_the_file_is_private_to_its_owner(tmp_path):
    path = enrolled(tmp_path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_re_enrolling_over_a_readable_file_makes_it_private_again(tmp_path):
    path = enrolled(tmp_path)
    path.chmod(0o644)

    config.save_enrolment(path, url="http://shed.test", unit_id=UNIT, credential="shs_node_y")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.load(path).credential == "shs_node_y"


def test_the_credential_never_shows_in_a_repr(tmp_path):
    assert "shs_node_x" not in repr(config.load(enrolled(tmp_path)))


def test_environment_overrides_the_file_and_options_override_both(tmp_path, monkeypatch):
    path = enrolled(tmp_path)
    monkeypatch.setenv("SHEDSHARE_AGENT_URL", "http://other.test")
    monkeypatch.setenv("SHEDSHARE_AGENT_SIMULATE", "2xH100-80GB")

    cfg = config.load(path, simulate="4xB200-192GB", work_dir=None)

    assert cfg.url == "http://other.test"
    assert cfg.simulate == "4xB200-192GB"


def test_a_missing_file_says_how_to_enrol(tmp_path):
    with pytest.raises(ConfigError, match="not enrolled.*shedshare-agent enrol"):
        config.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("content", "complaint"),
    [("{", "cannot read"), ("[]", "JSON object"), ('{"url": "http://x"}', "missing unit_id, credential")],
)
def test_a_broken_file_is_refused_readably(tmp_path, content, complaint):
    path = tmp_path / "agent.json"
    path.write_text(content)

    with pytest.raises(ConfigError, match=complaint):
        config.load(path)


def test_the_default_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEDSHARE_AGENT_CONFIG", str(tmp_path / "a.json"))

    assert config.default_path() == tmp_path / "a.json"


def test_the_drain_policy_waits_unless_told_to_stop(tmp_path, monkeypatch):
    path = enrolled(tmp_path)
    assert config.load(path).drain == "wait"

    monkeypatch.setenv("SHEDSHARE_AGENT_DRAIN", "stop")
    assert config.load(path).drain == "stop"
    assert config.load(path, drain="wait").drain == "wait"


def test_an_unknown_drain_policy_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="drain must be one of wait, stop"):
        config.load(enrolled(tmp_path), drain="later")
