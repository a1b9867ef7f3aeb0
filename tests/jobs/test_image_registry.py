"""Submitting a job whose image names a registry inside an owner's machine or network."""

import pytest

from marketplace.jobs.models import Job
from tests.conftest import JOB_SPEC, problem_of

JOBS = "/api/v1/jobs"


@pytest.mark.parametrize(
    "image",
    [
        "127.0.0.1:6379/x",
        "10.0.0.5:5000/x",
        "[::1]:5000/x",
        "[fd00:ec2::254]/x",
        "[::ffff:127.0.0.1]:80/x",
        "localhost:5000/x",
        "localhost/x",
        "registry.localhost/x",
        "169.254.169.254/latest",
        "100.64.0.1:5000/x",
        "192.168.1.10/x:1",
        "0.0.0.0:2375/x",
        "127.1:5000/x",
        "2130706433:5000/x",
        "mirror:5000/x",
        "nas.local/x",
        "metadata.google.internal/x",
    ],
)
def test_an_image_on_an_internal_registry_is_refused_with_a_400_naming_it_and_nothing_stored(renter_api, image):
    body = problem_of(renter_api.post(JOBS, {**JOB_SPEC, "image": image}, format="json"), 400)

    assert body["type"] == "/problems/validation-error"
    [message] = body["errors"]["image"]
    assert "loopback, private or local" in message
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "python:3.12-slim",
        "acme/train:1.2",
        "docker.io/library/python:3.12-slim",
        "nvcr.io/nvidia/pytorch:24.01-py3",
        "registry.example.com:5000/team/model@sha256:" + "a" * 64,
        "[2606:4700::1111]:5000/x",
    ],
)
def test_an_image_on_a_public_registry_is_accepted(renter_api, image):
    response = renter_api.post(JOBS, {**JOB_SPEC, "image": image}, format="json")

    assert response.status_code == 201, response.content
    assert Job.objects.get().image == image


@pytest.mark.parametrize("image", ["Not An Image!", "ghcr.io/acme/train:", "ghcr.io:99999/x", "[fe80::1%eth0]/x"])
def test_a_malformed_reference_is_refused(renter_api, image):
    body = problem_of(renter_api.post(JOBS, {**JOB_SPEC, "image": image}, format="json"), 400)

    assert body["errors"]["image"] == ["Not a valid image reference, e.g. ghcr.io/acme/train:1.2."]


def test_the_operators_own_private_registry_may_be_named_and_no_other(renter_api, settings):
    """JOB_IMAGE_PRIVATE_REGISTRIES lists exact host:port pairs; a neighbouring port stays refused."""
    settings.JOB_IMAGE_PRIVATE_REGISTRIES = ["127.0.0.1:5000"]

    accepted = renter_api.post(JOBS, {**JOB_SPEC, "image": "127.0.0.1:5000/shedshare-test/busybox:1"}, format="json")
    refused = renter_api.post(JOBS, {**JOB_SPEC, "image": "127.0.0.1:5001/shedshare-test/busybox:1"}, format="json")

    assert accepted.status_code == 201, accepted.content
    problem_of(refused, 400)
