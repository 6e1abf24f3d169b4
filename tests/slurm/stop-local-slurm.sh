#!/usr/bin/env bash
# stop-local-slurm.sh -- cleanly stop what start-local-slurm.sh (same directory) started.
# Adapted from the project's tested reference scripts; see tests/slurm/README.md.
# Stops slurmd, slurmctld, slurmdbd, mariadbd, munged -- each by the PID in its own
# pidfile (never by name). Safe to run when nothing is running.
#   --purge   also delete $SLURM_LOCAL_DIR (job state, accounting DB, logs) for a cold start
#   --keep-munge  leave munged running
set -uo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/brainvae-slurm}
PURGE=0; KEEP_MUNGE=0
for a in "$@"; do
  case "$a" in
    --purge) PURGE=1 ;;
    --keep-munge) KEEP_MUNGE=1 ;;
    *) echo "usage: $0 [--purge] [--keep-munge]" >&2; exit 2 ;;
  esac
done
log() { printf '[stop-local-slurm %s] %s\n' "$(date +%T)" "$*" >&2; }

# is_live PID NAME -> true if PID is a running (non-zombie) process whose comm starts with NAME
is_live() {
  local pid=$1 name=$2
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1   # zombie = gone
  case "$(cat "/proc/$pid/comm" 2>/dev/null)" in "$name"*) return 0 ;; *) return 1 ;; esac
}
# live_pid PIDFILE NAME -> prints the PID from PIDFILE if that process is live
live_pid() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  is_live "$pid" "$2" && echo "$pid"
}

# stop_proc PID NAME [SECONDS] -> SIGTERM (unless already exiting), wait, SIGKILL as last resort
stop_proc() {
  local pid=$1 name=$2 secs=${3:-20} i
  is_live "$pid" "$name" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < secs * 5; i++)); do
    is_live "$pid" "$name" || return 0
    sleep 0.2
  done
  log "$name (pid $pid) did not exit after ${secs}s -> SIGKILL"
  kill -KILL "$pid" 2>/dev/null
}
# stop_pid PIDFILE NAME [SECONDS]
stop_pid() {
  local pid
  pid=$(live_pid "$1" "$2") && stop_proc "$pid" "$2" "${3:-20}"
  rm -f "$1"
}

# 1. slurm daemons. `scontrol shutdown` asks slurmctld to save state and stop itself and
#    every slurmd; we remember their PIDs first and wait for them (pidfiles vanish on exit).
CTLD_PID=$(live_pid "$BASE/run/slurmctld.pid" slurmctld || true)
SLURMD_PID=$(live_pid "$BASE/run/slurmd.pid" slurmd || true)
if [ -n "$CTLD_PID" ]; then
  log "scontrol shutdown"
  timeout 20 scontrol shutdown >/dev/null 2>&1 || true
  for ((i = 0; i < 100; i++)); do
    is_live "$CTLD_PID" slurmctld || is_live "${SLURMD_PID:-0}" slurmd || break
    sleep 0.2
  done
fi
[ -n "$SLURMD_PID" ] && stop_proc "$SLURMD_PID" slurmd 15
[ -n "$CTLD_PID" ] && stop_proc "$CTLD_PID" slurmctld 20
rm -f "$BASE/run/slurmd.pid" "$BASE/run/slurmctld.pid"

# 2. accounting
stop_pid "$BASE/run/slurmdbd.pid" slurmdbd 20
stop_pid "$BASE/run/mysql/mariadbd.pid" mariadbd 60

# 3. munge
if [ $KEEP_MUNGE = 0 ]; then
  stop_pid /run/munge/munged.pid munged 10
fi

if [ $PURGE = 1 ]; then
  log "purging $BASE"
  rm -rf "$BASE"
fi
log "done"
