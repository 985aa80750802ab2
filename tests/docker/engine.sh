# Sourced by check_image.sh: a private Docker engine for one check run, started and stopped by PID.
#
# Debian's docker.io package runs a real engine on a machine that has none and no registry. It runs here with
# its own data root, exec root and socket under $WORK, so it shares nothing with any other engine, and with no
# bridge and no iptables (containers use --network=host or --network=none). Root only.

# The docker.io package's own client: it talks to its own engine's BuildKit (secret mounts need BuildKit), where
# a newer client elsewhere on PATH may need the buildx plugin that this machine lacks.
DOCKER=${DOCKER:-/usr/bin/docker}
export DOCKER_BUILDKIT=1

engine_start() {  # engine_start WORK: start dockerd under WORK, export DOCKER_HOST, wait until it answers
  local work=$1
  export DOCKER_HOST="unix://$work/docker.sock"
  mkdir -p "$work"
  # overlay2 needs a backing filesystem with d_type (ext4, xfs); vfs would work anywhere but copies every layer.
  dockerd --data-root "$work/data" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
    -H "$DOCKER_HOST" --storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none \
    >"$work/dockerd.log" 2>&1 &
  ENGINE_PID=$!
  ENGINE_WORK=$work
  local _
  for _ in $(seq 60); do
    "$DOCKER" info >/dev/null 2>&1 && return 0
    kill -0 "$ENGINE_PID" 2>/dev/null || break
    sleep 1
  done
  echo "dockerd did not start; its log ($work/dockerd.log) ends with:" >&2
  tail -n 20 "$work/dockerd.log" >&2
  return 1
}

engine_stop() {  # stop the engine this shell started (its PID only), then remove whatever it left mounted
  [ -n "${ENGINE_PID:-}" ] || return 0
  # Containers first, so that dockerd does not have to wait for them.
  local ids
  ids=$("$DOCKER" ps -aq 2>/dev/null || true)
  [ -z "$ids" ] || "$DOCKER" rm -f $ids >/dev/null 2>&1 || true
  kill "$ENGINE_PID" 2>/dev/null || true
  local _
  for _ in $(seq 30); do kill -0 "$ENGINE_PID" 2>/dev/null || break; sleep 1; done
  if kill -0 "$ENGINE_PID" 2>/dev/null; then
    echo "dockerd ($ENGINE_PID) did not stop in 30 s; killing it" >&2
    kill -9 "$ENGINE_PID" 2>/dev/null || true
  fi
  wait "$ENGINE_PID" 2>/dev/null || true
  ENGINE_PID=
  # dockerd unmounts its layers on exit; a network namespace or a layer of a killed engine may stay behind.
  local mount
  for mount in $(engine_mounts | sort -r); do umount -l "$mount" 2>/dev/null || true; done
}

engine_mounts() {  # the mount points under the engine's folder (none once the engine has stopped)
  [ -n "${ENGINE_WORK:-}" ] || return 0
  awk -v root="$ENGINE_WORK/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts
}
