#!/usr/bin/env bash
# The container step of .ci/run: Docker's daemon (started when it is not running), a base image, and the image built
# from the repository's Dockerfile as README.md's "Docker" section builds it; tests/test_bids_app.py then runs it.
# No image registry is reachable on the project's machines, so the Dockerfile's base (python:3.11 slim, Debian 12)
# comes in through its one build argument as a stand-in: Debian 12 from debootstrap with its Python 3.11, the
# machine's CA bundle and pip's settings (the package index is reached through host networking).
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE=vnet-base:bookworm
IMAGE=vnet-hippocampus

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; }
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info >/dev/null

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    ROOTFS=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" \
        http://deb.debian.org/debian >/dev/null
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndefault-timeout = 180\n' >"$ROOTFS/etc/pip.conf"
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$ROOTFS"
fi

docker build --network host --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" .
