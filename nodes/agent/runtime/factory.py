"""Choose the runtime the owner configured (`runtime` key, `--runtime` flag)."""

import logging
import os

from nodes.agent import logs
from nodes.agent.config import AgentConfig
from nodes.agent.runtime import Runtime
from nodes.agent.runtime.job_user import job_user_for
from nodes.agent.runtime.process import ProcessRuntime

logger = logging.getLogger(__name__)


def runtime_for(cfg: AgentConfig, *, euid: int | None = None) -> Runtime:
    """The configured runtime; raises RuntimeUnavailable when it cannot work on this machine."""
    log_dir = cfg.state_dir / "logs"
    if cfg.isolation.runtime == "docker":
        from nodes.agent.runtime.docker import DockerRuntime, connect, egress_guard, host_of
        from nodes.agent.runtime.image_store import PulledImages
        from nodes.agent.runtime.spec import cpu_limit

        client = connect(cfg.isolation.sandbox_runtime)
        host = host_of(client, simulated=bool(cfg.simulate))
        if cpu_limit(cfg.isolation, 1, host) < cfg.isolation.cpus_per_gpu:
            note = "a job gets at most the machine's CPUs, whatever its GPUs"
            logs.event(
                logger,
                "cpu_limit_clamped",
                logging.WARNING,
                cpus_per_gpu=cfg.isolation.cpus_per_gpu,
                host_cpus=host.cpus,
                note=note,
            )
        egress = egress_guard(client, cfg.isolation) if cfg.isolation.allow_egress else None
        return DockerRuntime(
            client,
            cfg.isolation,
            log_dir,
            images=cfg.images,
            pulled=PulledImages(cfg.state_dir),
            host=host,
            egress=egress,
            scratch_dir=cfg.work_dir,
        )
    if cfg.isolation.allow_unisolated_dev_runtime:
        logs.event(logger, "unisolated_runtime", logging.WARNING, note="development only: jobs run as host processes")
    else:
        logs.event(
            logger,
            "refusing_all_work",
            logging.WARNING,
            note="the process runtime isolates nothing; use --runtime docker, or --dev-runtime on a development box",
        )
    user = job_user_for(cfg.isolation.job_user, os.geteuid() if euid is None else euid)
    if user is None:
        note = "the agent is not root, so jobs run as its own user: isolated only as far as the OS separates them"
        logs.event(logger, "jobs_run_as_agent_user", logging.WARNING, note=note)
    else:
        logs.event(logger, "jobs_run_as", uid=user.uid, gid=user.gid)
    return ProcessRuntime(cfg.work_dir, log_dir, job_user=user)
