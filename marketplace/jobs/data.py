"""A job's data: the inputs its shed's agent fetches into its scratch before the start and the
outputs it uploads after the exit (``nodes/agent/protocol.py``, ``Staging``), each at a URL (an
object of S3-compatible storage, presigned, or any HTTPS URL) in a declared jurisdiction. The
job's container never reaches the network for them.

The jurisdictions a job allows cover its data as well as its compute: every input's and output's
jurisdiction must be admitted by them, or the submit is refused. What was staged, where from and
where to, is recorded as the agent reports it (``job.staged_in``, ``job.staged_out`` and their
failures), for the residency record.
"""

import re
from urllib.parse import urlsplit

from django.conf import settings
from rest_framework import serializers

from marketplace.jobs import jurisdictions
from nodes.agent import imageref

PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
PATH_RULE = "a relative path of letters, digits, '.', '_' and '-' (no '..', no leading '/' or '.')"
MAX_ITEMS = 64
URL_MAX = 4096


def endpoint(url: str) -> str:
    """The URL without its query: where the data is, without the signature that opens it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "Not a URL."
    where = f"{host}:{port}" if port else host
    allowed_inside = where in settings.JOB_DATA_PRIVATE_HOSTS or host in settings.JOB_DATA_PRIVATE_HOSTS
    if parts.scheme != "https" and not (parts.scheme == "http" and allowed_inside):
        return "Data moves over HTTPS only (https://…)."
    if not host or parts.username or parts.password:
        return "A URL names a host and no user or password (presign it, or use a secret)."
    if imageref.internal_host(host) and not allowed_inside:
        return f"{host} is a loopback, private or local address: sheds fetch only from public endpoints."
    return None


class _DataSerializer(serializers.Serializer):
    url = serializers.CharField(max_length=URL_MAX)
    path = serializers.CharField(max_length=255)
    jurisdiction = serializers.CharField(
        max_length=10, help_text="Where the storage is: an ISO 3166-1 country (DE) or subdivision (DE-BY)."
    )

    def validate_url(self, value: str) -> str:
        problem = _url_problem(value)
        if problem:
            raise serializers.ValidationError(problem)
        return value

    def validate_path(self, value: str) -> str:
        if not PATH.fullmatch(value) or any(part in (".", "..") for part in value.split("/")):
            raise serializers.ValidationError(f"Not {PATH_RULE}.")
        return value

    def validate_jurisdiction(self, value: str) -> str:
        try:
            [code] = jurisdictions.normalise([value])
        except ValueError as error:
            raise serializers.ValidationError(str(error)) from None
        if code in jurisdictions.NAMED_SETS:
            raise serializers.ValidationError("Name the country or subdivision the storage is in, not a set of them.")
        return code


class InputSerializer(_DataSerializer):
    path = serializers.CharField(max_length=255, help_text="Where it lands, under <scratch>/inputs/.")
    sha256 = serializers.RegexField(r"^[0-9a-f]{64}$", required=False, help_text="Checked after the fetch.")
    size = serializers.IntegerField(min_value=0, max_value=2**50, required=False, help_text="Bytes, checked too.")


class OutputSerializer(_DataSerializer):
    path = serializers.CharField(max_length=255, help_text="The file under <scratch>/outputs/ to upload.")
    url = serializers.CharField(max_length=URL_MAX, help_text="Where to PUT it (a presigned S3 URL).")


def data_problems(job_jurisdictions: list[str], inputs: list[dict], outputs: list[dict]) -> dict:
    """Field errors of the data as a whole: repeated paths, and locations the job does not allow."""
    problems = {}
    for name, items in (("inputs", inputs), ("outputs", outputs)):
        paths = [item["path"] for item in items]
        repeated = sorted({path for path in paths if paths.count(path) > 1})
        found = [f"{path} is named twice." for path in repeated]
        if job_jurisdictions:
            for n, item in enumerate(items):
                code = item["jurisdiction"]
                country = code.split("-")[0]
                if not jurisdictions.match(job_jurisdictions, country, code if "-" in code else ""):
                    found.append(
                        f"{name}[{n}] is in {code}, which the job's jurisdictions ({', '.join(job_jurisdictions)}) "
                        "do not allow: they cover the job's data as well as where it runs."
                    )
        if found:
            problems[name] = found
    return problems
