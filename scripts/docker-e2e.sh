#!/usr/bin/env bash
# End to end, on one machine with a Docker daemon and no image registry: build the locally bootstrapped
# base, the brainscan image (and PostgreSQL/Redis images where the official ones are not here), bring
# up the compose stack (postgres, redis, migrate, api, E2E_WORKERS workers, beat), create an API key,
# submit generated PNG scans in a zip with curl, poll until the job is done, check every result holds
# the four class probabilities of the served model, drop a zip into the host's inbox folder and score
# it with `brainscan nightly --now`, print the figures, tear everything down.
#
#   sudo scripts/docker-e2e.sh
#   E2E_WORKERS=2 E2E_SCANS=24 E2E_PORT=18000 E2E_KEEP=1 scripts/docker-e2e.sh   # KEEP: leave it up
#   E2E_NO_CACHE=1 scripts/docker-e2e.sh        # rebuild the base and the image from nothing (timings)
#
# Needs: docker (daemon running), docker compose or docker-compose, debootstrap (for the base), curl,
# python3. Behind a TLS-intercepting proxy, pass its CA: EXTRA_CA_CERTS=/path/ca.pem (see
# scripts/build-base-image.sh). Not part of CI: it builds TensorFlow images for minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT="${E2E_PROJECT:-brainscan-e2e}"
PORT="${E2E_PORT:-18000}"
WORKERS="${E2E_WORKERS:-2}"
SCANS="${E2E_SCANS:-12}"
KEEP="${E2E_KEEP:-0}"
NO_CACHE="${E2E_NO_CACHE:-0}"
READY_TIMEOUT_S="${E2E_READY_TIMEOUT_S:-600}"
JOB_TIMEOUT_S="${E2E_JOB_TIMEOUT_S:-600}"
export BRAINSCAN_IMAGE="${BRAINSCAN_IMAGE:-brainscan:latest}"
export BRAINSCAN_API_PORT="$PORT"
URL="http://127.0.0.1:$PORT"

if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    echo "needs docker compose (or docker-compose)" >&2
    exit 1
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml "$@"; }
seconds_since() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }
now() { python3 -c "import time; print(time.time())"; }
step() { printf '\n== %s\n' "$*"; }

t_start=$(now)
work=$(mktemp -d /tmp/brainscan-e2e.XXXXXX)
teardown() {
    status=$?
    if [[ $status != 0 ]]; then
        echo "FAILED (exit $status); last log lines of each service:" >&2
        compose logs --no-color --tail=30 >&2 || true
    fi
    if [[ "$KEEP" == 1 ]]; then
        echo "E2E_KEEP=1: stack left up ($URL); tear down with: ${COMPOSE[*]} -p $PROJECT down -v"
    else
        compose down -v --remove-orphans >/dev/null 2>&1 || true
        rm -rf "$work"
    fi
}
trap teardown EXIT

step "base image"
t0=$(now)
if [[ "$NO_CACHE" == 1 ]]; then scripts/build-base-image.sh --force; else scripts/build-base-image.sh; fi
base_s=$(seconds_since "$t0")

step "PostgreSQL and Redis images"
if ! docker image inspect "${BRAINSCAN_POSTGRES_IMAGE:-postgres:16-alpine}" >/dev/null 2>&1; then
    export BRAINSCAN_POSTGRES_IMAGE=brainscan-postgres:15
    docker build -q -f scripts/docker/postgres.Dockerfile -t "$BRAINSCAN_POSTGRES_IMAGE" scripts/docker
fi
if ! docker image inspect "${BRAINSCAN_REDIS_IMAGE:-redis:7-alpine}" >/dev/null 2>&1; then
    export BRAINSCAN_REDIS_IMAGE=brainscan-redis:7
    docker build -q -f scripts/docker/redis.Dockerfile -t "$BRAINSCAN_REDIS_IMAGE" scripts/docker
fi
echo "postgres: ${BRAINSCAN_POSTGRES_IMAGE:-postgres:16-alpine}  redis: ${BRAINSCAN_REDIS_IMAGE:-redis:7-alpine}"

step "brainscan image ($BRAINSCAN_IMAGE)"
t0=$(now)
build_flags=()
[[ "$NO_CACHE" != 1 ]] || build_flags=(--no-cache)
docker build "${build_flags[@]}" -t "$BRAINSCAN_IMAGE" . 2>&1 | tee "$work/build.log"
image_s=$(seconds_since "$t0")
context=$(grep -m1 -oE "Sending build context to Docker daemon +[0-9.]+ ?[kMG]?B" "$work/build.log" \
    | sed 's/.*daemon *//' || echo "?")
image_bytes=$(docker image inspect -f '{{.Size}}' "$BRAINSCAN_IMAGE")
image_uid=$(docker run --rm --entrypoint id "$BRAINSCAN_IMAGE" -u)
# The model the image serves (whatever models/ held at build time; never a hard-coded version).
served=$(docker run --rm --entrypoint python "$BRAINSCAN_IMAGE" -c \
    "from brainscan.modelrepo import resolve_model; from brainscan.settings import get_settings; \
s = get_settings(); c = resolve_model(s.model_dir, s.model_name, s.model_version).card; \
print(f'{c.name}/{c.version}')" 2>/dev/null || echo "")
echo "context $context, image $((image_bytes / 1024 / 1024)) MiB, runs as uid $image_uid, model ${served:-?}"
[[ "$image_uid" != 0 ]] || { echo "the image runs as root" >&2; exit 1; }

step "compose up: postgres, redis, migrate, api, $WORKERS workers, beat"
# The nightly inbox is a host folder owned by the image's user.
mkdir -p "$work/inbox"
chown "$image_uid:$image_uid" "$work/inbox" 2>/dev/null || chmod 0777 "$work/inbox"
export BRAINSCAN_INBOX_DIR="$work/inbox"
t_up=$(now)
compose up -d --no-build --scale worker="$WORKERS" postgres redis migrate api worker beat
deadline=$(($(date +%s) + READY_TIMEOUT_S))
until curl -fsS "$URL/readyz" -o "$work/ready.json" 2>/dev/null \
    && python3 -c "import json, sys; c = json.load(open(sys.argv[1]))['checks']['workers']['count']; \
sys.exit(c < int(sys.argv[2]))" "$work/ready.json" "$WORKERS"; do
    (($(date +%s) < deadline)) || { echo "not ready after ${READY_TIMEOUT_S}s" >&2; exit 1; }
    sleep 2
done
ready_s=$(seconds_since "$t_up")
cat "$work/ready.json"; echo

step "first API key (compose run --rm api brainscan keys create e2e)"
key=$(compose run --rm -T api brainscan keys create e2e 2>/dev/null | tail -n 1)
[[ "$key" == bs_* ]] || { echo "no key printed" >&2; exit 1; }
echo "${key:0:11}... created"

step "submit $SCANS generated PNG scans in a zip"
docker run --rm --entrypoint python "$BRAINSCAN_IMAGE" -c '
import io, sys, zipfile
import numpy as np
from PIL import Image

# Grey head-shaped ellipses with a brighter blob and noise: enough for the model to score.
rng = np.random.default_rng(15)
y, x = np.mgrid[0:256, 0:256]
buffer = io.BytesIO()
with zipfile.ZipFile(buffer, "w") as archive:
    for i in range(int(sys.argv[1])):
        head = ((x - 128) / rng.uniform(80, 110)) ** 2 + ((y - 128) / rng.uniform(95, 120)) ** 2 <= 1
        cx, cy, r = rng.uniform(90, 166), rng.uniform(90, 166), rng.uniform(8, 30)
        blob = 120 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))
        pixels = np.where(head, 70 + blob + rng.normal(0, 12, head.shape), 0)
        png = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(png, "PNG")
        archive.writestr(f"scan-{i:03d}.png", png.getvalue())
sys.stdout.buffer.write(buffer.getvalue())
' "$SCANS" >"$work/scans.zip"
t_submit=$(now)
curl -fsS -H "Authorization: Bearer $key" -F "files=@$work/scans.zip" "$URL/v1/jobs" >"$work/submitted.json"
cat "$work/submitted.json"; echo
job=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['id'])" "$work/submitted.json")

step "poll until done"
first_s=""
deadline=$(($(date +%s) + JOB_TIMEOUT_S))
while :; do
    curl -fsS -H "Authorization: Bearer $key" "$URL/v1/jobs/$job?limit=0" >"$work/summary.json"
    read -r finished done_count failed_count < <(python3 -c "import json, sys; j = json.load(open(sys.argv[1])); \
print(int(j['finished']), j['done'], j['failed'])" "$work/summary.json")
    if [[ -z "$first_s" && $((done_count + failed_count)) -gt 0 ]]; then
        first_s=$(seconds_since "$t_submit")
        first_from_up_s=$(seconds_since "$t_up")
    fi
    [[ "$finished" == 1 ]] && break
    (($(date +%s) < deadline)) || { echo "job not finished after ${JOB_TIMEOUT_S}s" >&2; exit 1; }
    sleep 0.5
done
all_s=$(seconds_since "$t_submit")

step "check the results"
curl -fsS -H "Authorization: Bearer $key" "$URL/v1/jobs/$job?limit=1000" >"$work/job.json"
python3 - "$work/job.json" "$SCANS" "${served:-}" <<'PY'
import collections
import json
import math
import sys

job = json.load(open(sys.argv[1]))
expected, served = int(sys.argv[2]), sys.argv[3]
classes = {"glioma", "meningioma", "notumor", "pituitary"}
items = job["items"]
problems = []
if job["status"] != "succeeded" or len(items) != expected:
    problems.append(f"job {job['status']} with {len(items)} of {expected} items")
for item in items:
    probabilities = item["probabilities"] or {}
    if set(probabilities) != classes or not math.isclose(sum(probabilities.values()), 1, abs_tol=1e-3):
        problems.append(f"item {item['position']}: probabilities {probabilities}")
    model = f"{item['model']['name']}/{item['model']['version']}"
    if served and model != served:
        problems.append(f"item {item['position']}: scored by {model}, the image serves {served}")
labels = collections.Counter(item["label"] for item in items)
flags = collections.Counter(str(item.get("flag")) for item in items)
print(f"job {job['id']}: {job['status']}, {len(items)} items, labels {dict(labels)}, flags {dict(flags)}")
print("first item:", json.dumps({k: items[0][k] for k in ("label", "confidence", "probabilities", "model")}))
if problems:
    sys.exit("results wrong:\n  " + "\n  ".join(problems))
print("every item: 4 class probabilities summing to 1, scored by the served model")
PY

step "nightly inbox: a file dropped in the host folder, then \`brainscan nightly --now\`"
cp "$work/scans.zip" "$BRAINSCAN_INBOX_DIR/host-dropped.zip"
touch -d "-10 min" "$BRAINSCAN_INBOX_DIR/host-dropped.zip"  # older than BRAINSCAN_NIGHTLY_SETTLE_S
compose run --rm -T worker brainscan nightly --now 2>/dev/null
[[ -s "$BRAINSCAN_INBOX_DIR/done/host-dropped.zip.job.txt" ]] \
    || { echo "the nightly run did not take the host's file" >&2; exit 1; }
echo "host sees: $(ls "$BRAINSCAN_INBOX_DIR/done" | tr '\n' ' ')"

step "processes"
for service in api worker beat; do
    for container in $(compose ps -q "$service"); do
        echo "$service $(docker exec "$container" id) cpu limit $(docker inspect -f '{{.HostConfig.NanoCpus}}' \
            "$container" | awk '{print ($1 ? $1 / 1e9 : "none")}')"
    done
done
compose logs --no-color worker 2>/dev/null | grep -m "$WORKERS" "BRAINSCAN_TF_THREADS=" || true

step "figures"
cat <<EOF
build context             $context
base image build          ${base_s}s (about 0 when it already existed)
brainscan image build     ${image_s}s$([[ "$NO_CACHE" == 1 ]] || echo " (cached layers reused)"), $((image_bytes / 1024 / 1024)) MiB
stack up -> ready         ${ready_s}s ($WORKERS workers with the model loaded)
submit -> first result    ${first_s}s
submit -> all $SCANS done    ${all_s}s
stack up -> first result  ${first_from_up_s}s (includes key creation and upload)
whole script so far       $(seconds_since "$t_start")s (teardown follows)
EOF
