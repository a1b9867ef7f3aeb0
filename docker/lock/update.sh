#!/usr/bin/env bash
# The lock files: exact versions of everything the server, the agent and the CLI install, so a
# fresh install next month gets what CI tested. CI and the images install from them; pyproject's
# ranges stay the distributions' own promises.
#
#   bash docker/lock/update.sh      # after changing a dependency in any pyproject.toml
#
# dev.txt (the server plus the development and test tools: what CI installs) is resolved first;
# the others are resolved within it, so a package shared by two of them has the same version in
# both. Needs uv (pip install uv).
set -euo pipefail
cd "$(dirname "$0")/../.."
UV=${UV:-uv}
compile() { "$UV" pip compile --quiet --universal --python-version 3.11 --no-header --annotation-style line "$@"; }
compile pyproject.toml --extra dev -o docker/lock/dev.txt
compile pyproject.toml -c docker/lock/dev.txt -o docker/lock/server.txt
compile nodes/agent/pyproject.toml -c docker/lock/dev.txt -o docker/lock/agent.txt
compile marketplace/cli/pyproject.toml -c docker/lock/dev.txt -o docker/lock/cli.txt
