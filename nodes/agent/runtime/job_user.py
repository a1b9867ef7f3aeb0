"""Who the process runtime runs jobs as, and where their working directories may live.

An agent started as root never runs a job as root: each job runs as the owner's `job_user`
(default 65534:65534, `nobody`/`nogroup` on every Linux distribution; no account is created),
in a working directory only that user may enter, while the agent's state, configuration and
credential stay readable by root alone. Jobs share that one user, so on this development runtime
they are not isolated from each other. An agent started as an ordinary user runs jobs as itself:
then they are isolated only as far as the operating system separates a user's processes, which
is to say not from the agent.
"""

import os
import pwd
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nodes.agent.runtime import RuntimeUnavailable

IDS = re.compile(r"(?P<uid>\d+)(?::(?P<gid>\d+))?")
NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")


@dataclass(frozen=True)
class JobUser:
    uid: int
    gid: int


def parse(value: str) -> str:
    """Check a `job_user` setting's form (`uid[:gid]` or a user name); raises ValueError."""
    value = str(value).strip()
    if not (IDS.fullmatch(value) or NAME.fullmatch(value)):
        raise ValueError(f"{value!r} is neither uid[:gid] nor a user name")
    return value


def job_user_for(setting: str, euid: int) -> JobUser | None:
    """The user jobs run as: None (the agent's own) unless the agent runs as root."""
    if euid != 0:
        return None
    ids = IDS.fullmatch(setting)
    if ids:
        uid = int(ids["uid"])
        user = JobUser(uid, int(ids["gid"] or uid))
    else:
        try:
            entry = pwd.getpwnam(setting)
        except KeyError:
            raise RuntimeUnavailable(f"job_user {setting!r}: no such user") from None
        user = JobUser(entry.pw_uid, entry.pw_gid)
    if user.uid == 0 or user.gid == 0:
        raise RuntimeUnavailable(f"job_user {setting!r} is root: jobs must not run with the agent's privileges")
    return user


def jobs_root(work_dir: Path, user: JobUser) -> Path:
    """Where the jobs' working directories go: `work_dir` if the job user can reach it, else a
    folder of the agent's own in the system's temporary directory. The default work_dir lies in
    the agent's private state directory, which the job user must not enter."""
    if _reachable(work_dir.parent, user):
        return _traversable(work_dir)
    fallback = Path(tempfile.gettempdir()) / f"shedshare-jobs-{os.geteuid()}"
    if not _reachable(fallback.parent, user):
        raise RuntimeUnavailable(f"job_user {user.uid} can reach neither {work_dir} nor {fallback.parent}")
    return _traversable(fallback)


def _traversable(path: Path) -> Path:
    """Ours, entered by anyone, listed by nobody else: jobs find their own folder by its name only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o711)
    info = path.lstat()
    # In a shared temporary directory someone else may have made the folder first (or a link).
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise RuntimeUnavailable(f"{path} is not a folder of this agent's user; remove it")
    os.chmod(path, 0o711)  # noqa: S103 - search only: no one else may list or write it
    return path


def _reachable(path: Path, user: JobUser) -> bool:
    """Whether the user may walk down to `path` (search permission on it and every folder above)."""
    for folder in (path, *path.parents):
        try:
            info = folder.stat()
        except FileNotFoundError:
            continue  # made by the agent, as 0711
        if info.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == user.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def hand_over(folder: Path, user: JobUser) -> None:
    """Give the job user what the agent wrote in the job's folder (its staged inputs), links
    never followed: only the agent has written there yet, but the job will."""
    os.lchown(folder, user.uid, user.gid)
    for root, dirs, names in os.walk(folder):
        for name in (*dirs, *names):
            os.lchown(os.path.join(root, name), user.uid, user.gid)
