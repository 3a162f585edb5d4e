#!/usr/bin/env bash
# Builds the base image brainscan's Dockerfile starts FROM, without any image registry:
# debootstrap a minimal Debian bookworm (python3.11 + venv), strip docs/caches, `docker import` it.
#
#   sudo scripts/build-base-image.sh                 # -> brainscan-base:bookworm
#   BASE_IMAGE=myreg/base:1 scripts/build-base-image.sh
#   EXTRA_CA_CERTS="/path/proxy-ca.pem" scripts/build-base-image.sh --force
#
# EXTRA_CA_CERTS (PEM files, space-separated) are added to the image's trust store: behind a
# TLS-intercepting proxy, pip in `docker build` needs the proxy's CA (the legacy builder has no
# build-time secrets). Leave it empty anywhere else.
# Needs root, debootstrap and a Docker daemon; reaches only Debian's package mirror.
# Where a registry is reachable, `--build-arg BASE_IMAGE=python:3.11-slim-bookworm` works instead.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-brainscan-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm
# python3-venv brings ensurepip (the image installs into /opt/venv); ca-certificates for pip's TLS.
PACKAGES=python3,python3-venv,ca-certificates

if [[ "${1:-}" != "--force" ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE exists (pass --force to rebuild)"
    exit 0
fi
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y debootstrap docker.io)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }

rootfs=$(mktemp -d /var/tmp/brainscan-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"

# The same trims as Debian's official "slim" images: no docs, man pages or locales, now or later.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CFG'
APT::Install-Recommends "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
CFG
cat >"$rootfs/etc/apt/sources.list" <<LIST
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
LIST
for cert in ${EXTRA_CA_CERTS:-}; do
    install -m 0644 "$cert" "$rootfs/usr/local/share/ca-certificates/extra-$(basename "${cert%.*}").crt"
done
if [[ -n "${EXTRA_CA_CERTS:-}" ]]; then
    chroot "$rootfs" update-ca-certificates
fi
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/{man,info,locale}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* \
    "$rootfs"/var/log/*.log "$rootfs"/tmp/*
# The host's resolver and hostname are not the container's.
: >"$rootfs/etc/resolv.conf"
echo localhost >"$rootfs/etc/hostname"

tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap $SUITE minbase + $PACKAGES" \
    - "$BASE_IMAGE"
docker run --rm "$BASE_IMAGE" python3 --version
docker image ls "$BASE_IMAGE"
