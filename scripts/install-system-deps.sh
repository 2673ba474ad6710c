#!/usr/bin/env bash
# System packages the project needs (Debian, as root). Idempotent: installs only what is missing.
#   python3, python3-venv  the interpreter and venv for .venv/ (torch==2.13.0 is a cp311 wheel)
#   redis-server           the adapter registry; tests start their own on a free loopback port
#   g++, ninja-build       build the engine's C++ kernels (services/engine/csrc/) on first use
#   python3-dev            Python.h, which the kernels' pybind11 bindings (csrc/bindings.cpp) compile against
#   prometheus             prometheus + promtool: the observability tests scrape the real stack and check deploy/prometheus/
set -euo pipefail

need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v redis-server >/dev/null || need+=(redis-server)
command -v g++ >/dev/null || need+=(g++)
command -v ninja >/dev/null || need+=(ninja-build)
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
    || need+=(python3-dev)

if ((${#need[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing system packages: ${need[*]} — run as root (or: sudo apt-get install -y ${need[*]})" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
