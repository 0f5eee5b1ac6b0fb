# Sourced by .ci/run and .ci/schemathesis.sh: waiting for a service this run started.

# wait_for_service PID PORT LOG [SECONDS]: returns once 127.0.0.1:PORT accepts connections;
# exits (printing LOG) at once if the process PID died, or after SECONDS (30) without it.
wait_for_service() {
  local pid="$1" port="$2" log="$3" secs="${4:-30}"
  local tries=$((secs * 10))
  for _ in $(seq 1 "$tries"); do
    service_alive "$pid" "$log"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      # Something else may hold the port: then ours has died of it by now, or soon will.
      service_alive "$pid" "$log"
      return 0
    fi
    sleep 0.1
  done
  echo "the service (pid $pid) did not listen on 127.0.0.1:$port within ${secs} s; its log:" >&2
  cat "$log" >&2
  exit 1
}

# service_alive PID LOG: exits (printing LOG) if the process PID is no longer running.
service_alive() {
  local pid="$1" log="$2"
  if ! kill -0 "$pid" 2>/dev/null; then
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    echo "the service (pid $pid) exited (status $rc); its log:" >&2
    cat "$log" >&2
    exit 1
  fi
}
