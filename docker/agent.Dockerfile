# The node agent. On a real shed it is installed with pip and run by systemd; this image is for
# simulated sheds in compose and for trying the agent out. It runs jobs with the docker runtime
# (mount the host's /var/run/docker.sock), never as processes inside this container.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 SHEDSHARE_AGENT_CONFIG=/var/lib/shedshare-agent/agent.json \
    SHEDSHARE_AGENT_RUNTIME=docker
WORKDIR /app
# The agent's own distribution only (nodes/agent/pyproject.toml): no Django, Celery, Stripe or psycopg.
COPY nodes/agent ./agent
RUN pip install --no-cache-dir ./agent && rm -rf ./agent && mkdir -m 0700 -p /var/lib/shedshare-agent
ENTRYPOINT ["shedshare-agent"]
CMD ["run"]
