#!/usr/bin/env bash
# Set up (if needed) and run the main job: the local TwinEdge stack with live summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/twinedge demo "$@"
