#!/usr/bin/env bash
# Set up a fresh Debian machine for TwinEdge: system services, a virtualenv, the project.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v influxd >/dev/null 2>&1 || need_apt+=(influxdb)
command -v victoria-metrics >/dev/null 2>&1 || need_apt+=(victoria-metrics)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # The packages start system-wide services; TwinEdge starts its own on free ports.
  $SUDO systemctl disable --now mosquitto influxdb victoria-metrics >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating virtualenv .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.twinedge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing the project and its test tools into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[test,bench]"
  touch "$stamp"
fi
echo "==> ready: .venv/bin/twinedge"
