"""The README's CLI walk, as written, against `manage.py demo` as a renter starts it: the demo's
own processes on the embedded default (SQLite, the file-system broker) in a folder of its own,
its S3-compatible store, the `export` lines it prints, the README's job files, and each command
line of the walk run by a shell with `shedshare` on its PATH."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from marketplace.devtools.management.commands.demo import CORPUS
from tests.conftest import child_environ
from tests.e2e import free_port, wait_until

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
BANNER_END = "Press Ctrl-C to stop."
# What only this test process has, or would send the demo elsewhere than its own folder.
NOT_FOR_THE_DEMO = ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "SHEDSHARE_DATA_DIR")


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def job_file(name: str) -> str:
    """The README's YAML job file whose job has `name`."""
    [text] = [block for block in readme_blocks("yaml") if (yaml.safe_load(block) or {}).get("name") == name]
    return text


def walk_lines() -> list[str]:
    """The command lines of the README's data walk, comments dropped."""
    [block] = [block for block in readme_blocks("sh") if "shedshare output get" in block]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture
def demo(tmp_path):
    """`manage.py demo` on free ports, until it has printed its banner; stopped as with Ctrl-C."""
    env = {name: value for name, value in child_environ().items() if name not in NOT_FOR_THE_DEMO}
    env.update(DEBUG="true", SHEDSHARE_DATA_DIR=str(tmp_path / "data"))
    out = tmp_path / "demo.out"
    argv = [sys.executable, "manage.py", "demo", "--port", str(free_port()), "--s3-port", str(free_port())]
    with open(out, "wb") as sink:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: BANNER_END in out.read_text() or process.poll() is not None,
            timeout=240,
            what=lambda: f"the demo's banner\n{out.read_text()[-4000:]}",
        )
        assert process.poll() is None, out.read_text()[-4000:]
        yield out.read_text(), tmp_path / "data" / "demo-logs"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def exported(banner: str) -> dict[str, str]:
    """The variables of the banner's `export` lines."""
    found = {}
    for line in banner.splitlines():
        if line.strip().startswith("export "):
            found.update(pair.split("=", 1) for pair in line.split()[1:])
    return found


def test_the_readmes_data_walk_works_as_written_against_the_demo(demo, tmp_path):
    banner, logs = demo
    variables = exported(banner)
    assert {"SHEDSHARE_URL", "SHEDSHARE_API_KEY", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} <= set(variables)
    work = tmp_path / "walk"
    (work / "bin").mkdir(parents=True)
    shim = work / "bin" / "shedshare"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m marketplace.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    (work / "job.yaml").write_text(job_file("fine-tune"))
    (work / "wordcount.yaml").write_text(job_file("word-count"))
    env = {**child_environ(), **variables, "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env["SHEDSHARE_CONFIG"] = str(work / "config.json")  # never the tester's own login

    printed, job_id = {}, None
    for line in walk_lines():
        command = line.replace("JOB_ID", job_id or "JOB_ID")
        done = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        agent_log = (logs / "agent-1.log").read_text()[-3000:]
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}\n{agent_log}"
        printed[line] = done.stdout
        submitted = re.search(r"Submitted job (\S+)", done.stdout)
        job_id = submitted.group(1) if submitted else job_id

    def said(start: str) -> str:
        [text] = [text for line, text in printed.items() if line.startswith(start)]
        return text

    assert "training for 3 epochs, token of 19 characters" in said("shedshare logs JOB_ID -f")
    counts = (work / "counts.txt").read_text()
    words = {word: int(n) for n, word in (line.split() for line in counts.splitlines() if line.split()[1:])}
    assert words == Counter(re.findall("[A-Za-z]+", CORPUS))
    listed = said("shedshare output list")
    assert "counts.txt" in listed and f" {len(counts.encode())} " in listed
    assert "Input       corpus.txt from" in said("shedshare residency")

    check = subprocess.run(
        ["bash", "-c", f"shedshare --json residency {job_id}"], cwd=work, env=env, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    record = json.loads(check.stdout)
    assert [p["country"] for p in record["placements"]] == ["DE"]
    assert [p["runs_in"] for p in record["placements"]] == ["process"]  # the demo's sheds have no engine
    assert record["isolation"]["network"].startswith("not cut")
    [uploaded] = [f for s in record["data"]["outputs"]["staged"] for f in s["files"]]
    assert uploaded["size"] == len(counts.encode())
