#!/usr/bin/env bash
# Makes sure the base image of the Dockerfile, debian:trixie-slim, is in the
# local Docker image store:
#
#   1. it is there already: nothing to do;
#   2. `docker pull` works: pulled;
#   3. otherwise (no registry reachable) a stand-in is built with debootstrap
#      from the Debian mirror that apt on this machine already uses, trimmed
#      like the official slim images, and imported under the same name.
#
#   bash scripts/docker-base.sh
#
# Environment: BASE_IMAGE (debian:trixie-slim), SUITE (trixie),
# DEBIAN_MIRROR and DEBIAN_SECURITY_MIRROR (read from apt's sources in
# /etc/apt/sources.list.d/ and /etc/apt/sources.list when unset). Needs root
# for debootstrap.
set -euo pipefail

IMAGE=${BASE_IMAGE:-debian:trixie-slim}
SUITE=${SUITE:-trixie}

fail() {
    echo "docker-base: $*" >&2
    exit 1
}

command -v docker >/dev/null 2>&1 || fail "docker is not installed"
docker info >/dev/null 2>&1 || fail "the Docker daemon is not running (or not reachable by this user)"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "==> base image $IMAGE: present"
    exit 0
fi

echo "==> base image $IMAGE: pulling"
if timeout 120 docker pull -q "$IMAGE"; then
    exit 0
fi
echo "    pull failed; building a stand-in with debootstrap"

# The first Debian archive URI apt is configured with whose path ends in
# $1 (debian, debian-security), from deb822 .sources files or one-line .list
# files; third-party repositories do not match.
apt_mirror() {
    local files=() f
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    {
        awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "${files[@]}"
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' "${files[@]}"
    } | grep -E "^https?://[^ ]+/$1/?\$" | head -n 1 || true
}
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror debian)}
[ -n "$MIRROR" ] || fail "found no Debian mirror in apt's sources; set DEBIAN_MIRROR"
MIRROR=${MIRROR%/}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(apt_mirror debian-security)}
SECURITY_MIRROR=${SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}
SECURITY_MIRROR=${SECURITY_MIRROR%/}

[ "$(id -u)" = 0 ] || fail "debootstrap needs root"
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "    installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
fi

ROOT=$(mktemp -d /tmp/vmcgi-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
start=$(date +%s)
echo "    debootstrap --variant=minbase $SUITE from $MIRROR"
if ! debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1; then
    tail -n 20 "$ROOT.log" >&2
    rm -f "$ROOT.log"
    fail "debootstrap failed"
fi
rm -f "$ROOT.log"

# apt sources like the official image's: the release, its updates and
# security updates.
rm -f "$ROOT/etc/apt/sources.list"
cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# Trim it like the official slim images: no documentation, manuals or
# locales, now or from packages installed later; no apt lists or caches, and
# apt deletes the packages it downloaded once they are installed.
cat >"$ROOT/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' >"$ROOT/etc/apt/apt.conf.d/docker-no-languages"
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOT/usr/share/man/"* "$ROOT/usr/share/info/"* "$ROOT/usr/share/locale/"* \
    "$ROOT/var/lib/apt/lists/"* "$ROOT/var/cache/apt/"*.bin "$ROOT/var/cache/apt/archives/"*.deb \
    "$ROOT/var/log/"*.log

tar --numeric-owner -C "$ROOT" -c . | docker import --change 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "==> base image $IMAGE: imported a stand-in in $(($(date +%s) - start)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
