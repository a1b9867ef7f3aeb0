# The node agent. On a real shed it is installed with pip and run by systemd; this image is for
# simulated sheds in compose and for trying the agent out. It runs jobs with the docker runtime
# (mount the host's /var/run/docker.sock), never as processes inside this container.
# On the local Debian base, with the locked packages docker/build.sh downloaded into
# docker/.wheels/agent: run `bash docker/build.sh` once before building this.
FROM shedshare/debian:bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 SHEDSHARE_AGENT_CONFIG=/var/lib/shedshare-agent/agent.json \
    SHEDSHARE_AGENT_RUNTIME=docker PATH=/opt/venv/bin:$PATH
COPY docker/.wheels/agent /wheels
RUN python3 -m venv /opt/venv && pip install --no-cache-dir --no-index --find-links /wheels -r /wheels/requirements.txt
# The agent's own distribution only (nodes/agent/pyproject.toml): no Django, Celery, Stripe or
# psycopg. Built here from the source (setuptools from the wheelhouse), so that a code change
# needs only `docker-compose build`.
COPY nodes/agent /src/agent
RUN pip install --no-cache-dir --no-index --find-links /wheels --no-deps /src/agent \
    && rm -rf /src /wheels && mkdir -m 0700 -p /var/lib/shedshare-agent
ENTRYPOINT ["shedshare-agent"]
CMD ["run"]
