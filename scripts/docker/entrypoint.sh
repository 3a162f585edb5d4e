#!/bin/sh
# The image's entrypoint: sizes TensorFlow's thread pool to this container's CPU limit, then runs the
# command. With BRAINSCAN_TF_THREADS unset, each container gets floor(CPU limit) threads (at least 1),
# read from its cgroup, so `docker compose up --scale worker=N` with `cpus: C` per worker uses N x C
# cores and no more. A set BRAINSCAN_TF_THREADS (0 = all cores) is used as it is.
set -eu

cpu_limit_millicores() {
    # cgroup v2: "max 100000" or "200000 100000"; cgroup v1: cfs_quota_us (-1 = none) / cfs_period_us.
    if [ -r /sys/fs/cgroup/cpu.max ]; then
        read -r quota period </sys/fs/cgroup/cpu.max
    else
        for dir in /sys/fs/cgroup/cpu /sys/fs/cgroup/cpu,cpuacct; do
            if [ -r "$dir/cpu.cfs_quota_us" ]; then
                quota=$(cat "$dir/cpu.cfs_quota_us")
                period=$(cat "$dir/cpu.cfs_period_us")
                break
            fi
        done
    fi
    case "${quota:-max}" in max | -1) return 1 ;; esac
    echo $((quota * 1000 / period))
}

if [ -z "${BRAINSCAN_TF_THREADS:-}" ]; then
    if millicores=$(cpu_limit_millicores); then
        threads=$((millicores / 1000))
        [ "$threads" -ge 1 ] || threads=1
        source="CPU limit of $millicores millicores"
    else
        threads=$(nproc)  # nproc honours a cpuset (--cpuset-cpus)
        source="no CPU limit: every core this container may use"
    fi
    export BRAINSCAN_TF_THREADS="$threads"
    if [ "${BRAINSCAN_LOG_FORMAT:-json}" = json ]; then
        printf '{"ts": "%s", "level": "INFO", "logger": "entrypoint", "msg": "BRAINSCAN_TF_THREADS=%s (%s)"}\n' \
            "$(date -u +%Y-%m-%dT%H:%M:%S.000+00:00)" "$threads" "$source" >&2
    else
        echo "entrypoint: BRAINSCAN_TF_THREADS=$threads ($source)" >&2
    fi
fi

exec "$@"
