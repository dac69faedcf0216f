#!/usr/bin/env bash
# A one-node SLURM on this machine (Debian's slurm-wlm and munge; a step of .ci/run), so that tests/test_bids_app.py
# runs the documented job array (bundle/scripts/inference/slurm_bids_app.sh) against a real scheduler. A machine's own
# slurm.conf is left alone.
set -euo pipefail
command -v slurmctld >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; }
CONF=/etc/slurm/slurm.conf
MARK="# one-node SLURM of tests/services/slurm_node.sh"
if [ -f "$CONF" ] && ! grep -qx "$MARK" "$CONF"; then
    echo "$CONF is this machine's own: left alone" >&2
    exit 0
fi
HOST=$(hostname)
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
cat >"$CONF" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST CPUs=$(nproc) RealMemory=$(($(free -m | awk '/Mem:/{print $2}') - 1024)) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -q idle && exit 0; sleep 1; done
echo "the one-node SLURM did not come up: /var/log/slurm/" >&2
exit 1
