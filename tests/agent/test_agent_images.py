"""The owner's image policy: references read as Docker reads them, registries allowed or refused
with the rule named, and the keys in the agent's config."""

import json
from dataclasses import replace

import pytest

from nodes.agent import config, imageref
from nodes.agent.images import DEFAULT_REGISTRIES, ImagePolicy, registry_problem, size_problem
from nodes.agent.refusal import policy_for
from tests.agent.fakes import HONOURS_ALL
from tests.agent.test_agent_refusal import INVENTORY, assign_touching, run_agent

PUBLIC = {"docker.io": ["104.18.0.1"], "ghcr.io": ["140.82.0.1"], "nvcr.io": ["2606:4700::1"]}


def dns(answers: dict[str, list[str]]):
    return lambda host: answers.get(host, [])


def policy(**extra) -> ImagePolicy:
    return ImagePolicy(**{"resolve": dns(PUBLIC), **extra})


@pytest.mark.parametrize(
    ("reference", "registry", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", None, None),
        ("acme/train:1.2", "docker.io", "acme/train", "1.2", None),
        ("index.docker.io/acme/train", "docker.io", "acme/train", None, None),
        ("ghcr.io/acme/train:1.2", "ghcr.io", "acme/train", "1.2", None),
        ("localhost/x", "localhost", "x", None, None),
        ("LOCALHOST:5000/x", "localhost:5000", "x", None, None),
        ("Mirror/x", "mirror", "x", None, None),  # upper case cannot be a path: a registry
        ("[0:0::1]:5000/a/b:t", "[::1]:5000", "a/b", "t", None),
        ("quay.io/a/b@sha256:" + "0" * 64, "quay.io", "a/b", None, "sha256:" + "0" * 64),
    ],
)
def test_a_reference_is_read_as_docker_reads_it(reference, registry, path, tag, digest):
    ref = imageref.parse(reference)

    assert (ref.registry, ref.path, ref.tag, ref.digest) == (registry, path, tag, digest)


@pytest.mark.parametrize("reference", ["", "UPPER", "a/B", "x:", "ghcr.io:0/x", "[fe80::1%eth0]:5000/x", "a" * 256])
def test_a_malformed_reference_is_refused(reference):
    with pytest.raises(imageref.BadReference):
        imageref.parse(reference)


@pytest.mark.parametrize("image", ["busybox", "ghcr.io/acme/train:1", "nvcr.io/nvidia/pytorch:24.01-py3"])
def test_an_image_from_a_listed_public_registry_passes(image):
    assert registry_problem(image, policy()) is None


@pytest.mark.parametrize(
    "image",
    [
        "127.0.0.1:6379/x",
        "10.0.0.5:5000/x",
        "[::1]:5000/x",
        "localhost:5000/x",
        "169.254.169.254/x",
        "[fd00:ec2::254]/x",
        "0x7f000001:5000/x",
        "registry:5000/x",
    ],
)
def test_an_internal_registry_is_refused_by_the_internal_rule_even_when_listed(image):
    listed = policy(registries=("127.0.0.1:6379", "10.0.0.5", "localhost", "registry"))

    problem = registry_problem(image, listed)

    assert problem is not None and problem.startswith("rule internal_registry:")


def test_a_registry_off_the_list_is_refused_by_the_registries_rule():
    problem = registry_problem("evil.example.com/x:1", policy())

    assert problem == "rule registries: evil.example.com is not one of the registries this unit pulls from"


def test_a_listed_name_that_resolves_to_a_private_address_is_refused_without_saying_the_address():
    rebound = policy(
        registries=("registry.example.com",), resolve=dns({"registry.example.com": ["8.8.8.8", "10.1.2.3"]})
    )

    problem = registry_problem("registry.example.com/x", rebound)

    assert problem == "rule internal_registry: registry.example.com resolves to a private or local address here"
    assert "10.1.2.3" not in problem


def test_a_listed_name_that_does_not_resolve_is_refused():
    assert "does not resolve" in registry_problem("ghcr.io/x", policy(resolve=dns({})))


def test_the_owners_own_mirror_may_be_internal_and_is_not_looked_up():
    looked_up = []
    mirrors = policy(registry_mirrors=("10.0.0.5:5000",), resolve=lambda host: looked_up.append(host) or [])

    assert registry_problem("10.0.0.5:5000/x:1", mirrors) is None
    assert registry_problem("10.0.0.5:5001/x:1", mirrors).startswith("rule internal_registry:")
    assert looked_up == []


def test_patterns_match_subdomains_and_ports():
    answers = dns({"us.gcr.io": ["8.8.4.4"], "gcr.io": ["8.8.4.4"], "r.example.com": ["8.8.8.8"]})
    patterns = policy(registries=("*.gcr.io", "r.example.com:5000"), resolve=answers)

    assert registry_problem("us.gcr.io/p/x", patterns) is None
    assert registry_problem("gcr.io/p/x", patterns).startswith("rule registries:")
    assert registry_problem("r.example.com:5000/x", patterns) is None
    assert registry_problem("r.example.com:5001/x", patterns).startswith("rule registries:")


def test_the_size_cap_names_its_rule():
    cap = ImagePolicy(image_max_mb=100)

    assert size_problem(100 * 2**20, cap) is None
    assert (
        size_problem(100 * 2**20 + 1, cap) == "rule image_max_mb: the image is 101 MiB, over this unit's cap of 100 MiB"
    )


def enrolled(tmp_path, **keys):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"url": "http://s", "unit_id": "u", "credential": "c", **keys}))
    return path


def test_the_image_policy_has_documented_defaults(tmp_path):
    images = config.load(enrolled(tmp_path)).images

    assert images.registries == DEFAULT_REGISTRIES and "docker.io" in images.registries
    assert images.registry_mirrors == ()
    assert (images.image_max_mb, images.image_keep_hours, images.image_disk_mb) == (32768, 24.0, 204800)


def test_the_owner_sets_registries_and_mirrors_in_the_file_or_the_environment(tmp_path, monkeypatch):
    path = enrolled(tmp_path, registries=["GHCR.io", "*.example.com"], image_max_mb=2048)
    monkeypatch.setenv("SHEDSHARE_AGENT_REGISTRY_MIRRORS", "mirror.lan:5000, [fd00::1]:5000")

    images = config.load(path).images

    assert images.registries == ("ghcr.io", "*.example.com")
    assert images.registry_mirrors == ("mirror.lan:5000", "[fd00::1]:5000")
    assert images.image_max_mb == 2048


@pytest.mark.parametrize(
    ("key", "value"), [("registries", ["not a host"]), ("registry_mirrors", ["mirror"]), ("image_max_mb", 0)]
)
def test_a_bad_image_key_is_refused_naming_it(tmp_path, key, value):
    with pytest.raises(config.ConfigError, match=key):
        config.load(enrolled(tmp_path, **{key: value}))


def test_the_container_runtime_checks_registries_and_the_process_runtime_pulls_nothing():
    from nodes.agent.isolation import IsolationConfig

    assert policy_for(IsolationConfig(runtime="docker"), INVENTORY).registries == ImagePolicy()
    dev = IsolationConfig(runtime="process", allow_unisolated_dev_runtime=True)
    assert policy_for(dev, INVENTORY).registries is None


def test_the_agent_refuses_an_assignment_from_a_private_registry_before_starting_it(server, tmp_path, caplog):
    allocation_id, marker = assign_touching(server, tmp_path, image="10.0.0.5:5000/x")
    strict = replace(HONOURS_ALL, registries=policy())

    run_agent(server, tmp_path, strict)

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "refused:registry"}
    assert server.started == []
    assert not marker.exists()
    assert "rule internal_registry: 10.0.0.5:5000" in caplog.text


def test_the_agent_runs_an_assignment_from_an_allowed_registry(server, tmp_path):
    allocation_id, marker = assign_touching(server, tmp_path, image="ghcr.io/acme/x:1")
    allowing = replace(HONOURS_ALL, registries=policy())

    run_agent(server, tmp_path, allowing)

    assert server.finished[allocation_id]["reason"] == "exited"
    assert marker.exists()
