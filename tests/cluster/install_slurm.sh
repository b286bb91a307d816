#!/usr/bin/env bash
# Install the Debian packages the test SLURM cluster (tests/cluster/testcluster.py) needs.
# Idempotent: does nothing when every binary is already on PATH.
# --no-install-recommends: with recommends slurm-wlm alone pulls in ~43 packages.
set -euo pipefail

binaries=(munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr)
missing=()
for b in "${binaries[@]}"; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_slurm: all binaries present, nothing to do"
    exit 0
fi
echo "install_slurm: missing ${missing[*]}; installing packages"

if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: must run as root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends slurm-wlm munge slurmdbd mariadb-server
