# The node agent. On a real shed it is installed with pip and run by systemd; this image is for
# simulated sheds in compose and for trying the agent out.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 SHEDSHARE_AGENT_CONFIG=/var/lib/shedshare-agent/agent.json
WORKDIR /app
COPY pyproject.toml README.md ./
COPY marketplace ./marketplace
COPY nodes ./nodes
COPY billing ./billing
RUN pip install --no-cache-dir ".[agent]" && mkdir -p /var/lib/shedshare-agent
ENTRYPOINT ["shedshare-agent"]
CMD ["run"]
