#!/usr/bin/env bash
# Builds the container images the tests turn into guests, from Debian's archive: no registry, no Docker.
#
#   bash test/images/build.sh [--out DIR] [--verify]
#
# Default --out: images/out/test-images. Writes, each with a .key beside it:
#
#   DIR/python/               OCI layout, tag latest: bookworm minbase + python3
#                             (layer 1), then /app/server.py as user app
#                             (999:999), a hard link, a whiteout and an opaque
#                             directory (layer 2); python/server.py here.
#   DIR/static/               OCI layout, tag latest: one layer, Debian's static
#                             busybox, its httpd serving static/www here, as root.
#   DIR/multi/                OCI layout whose tag latest is an image index:
#                             the static image for linux/amd64 and linux/arm64.
#   DIR/docker-archive.tar    the static image as Docker 20.10's `docker save`
#   DIR/docker-archive-oci.tar  ... and as Docker 25+'s (an OCI layout tar with
#                             a manifest.json)
#
# Runs as root (debootstrap, chroot, owners). Each output's key is a sha256 of
# this script, what goes into it (server.py, the site, the busybox .deb) and,
# for python, the Debian release and mirror; unchanged inputs make a rerun a
# no-op. A new output is built in OUTPUT.tmp and renamed into place. Layer 1
# of python (debootstrap, a minute or two) is cached apart, in
# images/out/cache/test-images/, under a key of its own recipe only, so an
# edit elsewhere in this script or to server.py does not redo it.
#
# Everything is deterministic for given inputs: fixed `created`, every mtime
# that date, tar --sort=name --numeric-owner, gzip -n, hash-checked .pyc.
# The mirror is the one apt uses here ($DEBIAN_MIRROR overrides it).
# busybox-static of arm64 and amd64 comes from apt-get download; where apt
# does not know the other architecture, from a private copy of apt's lists
# (the machine's apt is not changed; TEST_IMAGES_PRIVATE_APT=1 forces it).
#
# Whatever was built is then checked: every blob's digest and size, skopeo
# inspect of each image, umoci unpack (whiteout, opaque directory, hard link,
# owners), server.py and busybox httpd answering in a chroot. --verify runs
# the checks when nothing was built too.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$HERE/../.." && pwd -P)
# step, fail, the ERR trap and the package helpers are the image recipes' own.
# shellcheck disable=SC2034 # read by images/lib.sh
LOG_PREFIX=test-images
# shellcheck source-path=SCRIPTDIR source=../../images/lib.sh
source "$REPO/images/lib.sh"
CACHE="$REPO/images/out/cache/test-images"
OUT="$REPO/images/out/test-images"
VERIFY=0
RELEASE=bookworm
# Every date in the images: config `created`, history, each file's mtime.
CREATED=2025-01-01T00:00:00Z
EPOCH=1735689600
TAG=latest
REPO_TAG=vmcgi-test/static:latest
MT_INDEX=application/vnd.oci.image.index.v1+json
MT_MANIFEST=application/vnd.oci.image.manifest.v1+json
MT_CONFIG=application/vnd.oci.image.config.v1+json
MT_LAYER_GZIP=application/vnd.oci.image.layer.v1.tar+gzip
MT_LAYER_TAR=application/vnd.oci.image.layer.v1.tar

usage() {
    echo "usage: bash test/images/build.sh [--out DIR] [--verify]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage ;;
        --out=*) OUT=${1#*=}; shift ;;
        --out) [ $# -ge 2 ] || usage; OUT=$2; shift 2 ;;
        --verify) VERIFY=1; shift ;;
        *) echo "test-images: unknown argument: $1" >&2; usage ;;
    esac
done
OUT=$(realpath -m -- "$OUT")

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# ---------------------------------------------------------------- tools
step "checking tools"
if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    fail "this script needs a Debian-based system (dpkg, apt-get)"
fi
mapfile -t pkgs < <(packages test-images)
[ ${#pkgs[@]} -gt 0 ] || fail "images/packages.txt has no test-images group"
missing=()
for p in "${pkgs[@]}"; do
    pkg_installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    is_root || fail "missing Debian packages ${missing[*]}; as root run: apt-get update && apt-get install --no-install-recommends ${missing[*]}"
    echo "    installing: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The host's architecture is the images' (python and static); multi has both.
HOST_DEB_ARCH=$(dpkg --print-architecture)
case "$HOST_DEB_ARCH" in
    amd64) ARCH=amd64 ;;
    arm64) ARCH=arm64 ;;
    *) fail "unsupported architecture '$HOST_DEB_ARCH' (amd64 or arm64)" ;;
esac
MULTI_ARCHES=(amd64 arm64)
# The platform fields of an OCI architecture; arm64 images say variant v8,
# as Docker Hub's do.
variant_of() { if [ "$1" = arm64 ]; then echo v8; fi; }

# The mirror: the first "deb" source of $RELEASE that apt uses here, in the
# order apt reads them (sources.list, then sources.list.d/ by name; one-line
# .list files and deb822 .sources files).
apt_mirror() {
    local f files=()
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*; do
        case "$f" in *.list|*.sources) [ -f "$f" ] && files+=("$f") ;; esac
    done
    for f in "${files[@]}"; do
        case "$f" in
            *.list)
                awk -v rel="$RELEASE" '
                    $1 != "deb" { next }
                    { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } }
                    $(i + 1) == rel && $i ~ /^(https?|file):/ { print $i; exit }
                ' "$f"
                ;;
            *.sources)
                # Stanzas are separated by blank lines; fields may be in any order.
                awk -v rel="$RELEASE" '
                    function flush() {
                        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " rel " ") &&
                            enabled != "no" && uri ~ /^(https?|file):/) { print uri; found = 1; exit }
                        types = suites = uri = enabled = ""
                    }
                    /^#/ { next }
                    /^[ \t]*$/ { flush(); next }
                    tolower($1) == "types:" { $1 = ""; types = $0 }
                    tolower($1) == "suites:" { $1 = ""; suites = $0; gsub(/^ +| +$/, "", suites) }
                    tolower($1) == "uris:" { uri = $2 }
                    tolower($1) == "enabled:" { enabled = tolower($2) }
                    END { if (!found) flush() }
                ' "$f"
                ;;
        esac
    done | head -n 1
}
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
if [ -z "$MIRROR" ]; then
    MIRROR=http://deb.debian.org/debian
    echo "    apt has no $RELEASE source; using $MIRROR"
fi
MIRROR=${MIRROR%/}
echo "    architecture: $ARCH; Debian $RELEASE from $MIRROR"

mkdir -p "$CACHE" "$OUT"
exec 9>"$CACHE/.lock"
flock 9

# Mount points under a directory, deepest first (debootstrap mounts /proc
# and /sys in its target; a failed run can leave them).
mounts_under() {
    awk -v d="$1/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
# rm -rf that first unmounts whatever is mounted below, and never crosses
# into another file system.
safe_rm() {
    local d m
    for d in "$@"; do
        [ -e "$d" ] || [ -L "$d" ] || continue
        while IFS= read -r m; do
            [ -z "$m" ] || umount -l "$m" 2>/dev/null || true
        done < <(mounts_under "$(realpath -m -- "$d")")
        rm -rf --one-file-system -- "$d"
    done
}
WORK=""
cleanup() { [ -z "$WORK" ] || safe_rm "$WORK"; }
trap cleanup EXIT
# Left by a killed run (the lock is ours now).
for d in "$CACHE"/work.*; do safe_rm "$d"; done
WORK=$(mktemp -d "$CACHE/work.XXXXXX")

# ---------------------------------------------------------------- busybox
# Debian's busybox-static .deb of an architecture: one already downloaded
# here, else the one images/initramfs.sh downloaded, else apt-get download.
DEB_DIR="$CACHE/debs"
mkdir -p "$DEB_DIR"
find_deb() { # dir arch
    [ -d "$1" ] || return 0
    find "$1" -maxdepth 1 -name "busybox-static_*_$2.deb" | sort | tail -n 1
}
apt_download() { # arch: apt-get download busybox-static:ARCH into DEB_DIR
    # As root, apt would otherwise warn that its _apt user cannot write here.
    local sandbox=() state opts
    is_root && sandbox=(-o APT::Sandbox::User=root)
    # TEST_IMAGES_PRIVATE_APT=1 takes the second way even when apt knows
    # the architecture (to test it).
    if [ "${TEST_IMAGES_PRIVATE_APT:-0}" != 1 ] && apt-cache show "busybox-static:$1" >/dev/null 2>&1; then
        (cd "$DEB_DIR" && apt-get download -q "${sandbox[@]}" "busybox-static:$1")
        return
    fi
    # apt does not know this architecture here (no dpkg --add-architecture):
    # rather than change the machine's apt, read the same sources into a
    # private state of that architecture only.
    echo "    apt knows no busybox-static:$1; reading the package lists for $1 into $CACHE/apt-$1"
    state="$CACHE/apt-$1"
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
    opts=(-o "APT::Architecture=$1" -o "APT::Architectures=$1"
        -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache"
        -o Dir::State::status=/dev/null "${sandbox[@]}")
    apt-get "${opts[@]}" update -q
    (cd "$DEB_DIR" && apt-get "${opts[@]}" download -q "busybox-static:$1")
    # The .deb is what stays; the lists (~20 MB) are read again if ever needed.
    safe_rm "$state"
}
declare -A BB_DEB=()
fetch_busybox() { # arch
    local deb
    deb=$(find_deb "$DEB_DIR" "$1")
    if [ -z "$deb" ]; then
        deb=$(find_deb "$REPO/images/out/cache/busybox" "$1")
        if [ -n "$deb" ] && [ "${TEST_IMAGES_PRIVATE_APT:-0}" != 1 ]; then
            cp "$deb" "$DEB_DIR/"
        else
            apt_download "$1"
        fi
        deb=$(find_deb "$DEB_DIR" "$1")
        [ -n "$deb" ] || fail "busybox-static:$1 download produced no .deb"
    fi
    BB_DEB[$1]=$deb
}
step "fetching busybox-static (${MULTI_ARCHES[*]})"
for a in "${MULTI_ARCHES[@]}"; do
    fetch_busybox "$a"
    echo "    $a: ${BB_DEB[$a]##*/}"
done

# ---------------------------------------------------------------- keys
SCRIPT_SUM=$(sha256 "$HERE/build.sh")
# Every file of a tree with its type and mode, for a key.
tree_sum() { # dir
    (cd "$1" && find . -printf '%y %m %p %l\n' | LC_ALL=C sort &&
        find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) | sha256sum | cut -d' ' -f1
}
key_of() { printf '%s\n' "$@" | sha256sum | cut -d' ' -f1; }
static_key() { # arch
    key_of "static-v1" "script: $SCRIPT_SUM" "arch: $1" "busybox: $(sha256 "${BB_DEB[$1]}")" "www: $(tree_sum "$HERE/static/www")"
}
KEY_PYTHON=$(key_of "python-v1" "script: $SCRIPT_SUM" "arch: $ARCH" "release: $RELEASE" "mirror: $MIRROR" \
    "server.py: $(sha256 "$HERE/python/server.py")")
KEY_STATIC=$(static_key "$ARCH")
KEY_MULTI=$(key_of "multi-v1" "$(for a in "${MULTI_ARCHES[@]}"; do static_key "$a"; done)")
KEY_DOCKER=$(key_of "docker-archive-v1" "$KEY_STATIC")
KEY_DOCKER_OCI=$(key_of "docker-archive-oci-v1" "$KEY_STATIC")

key_matches() { # output key
    [ -e "$1" ] && [ -f "$1.key" ] && [ "$(cat "$1.key")" = "$2" ]
}
# Puts a finished OUTPUT.tmp in place of OUTPUT, then its key. Without the
# key, a half-done replacement is rebuilt by the next run.
install_output() { # output key
    rm -f "$1.key"
    if [ -e "$1" ]; then
        safe_rm "$1.old"
        mv -T "$1" "$1.old"
    fi
    mv -T "$1.tmp" "$1"
    safe_rm "$1.old"
    echo "$2" >"$1.key"
}
BUILT=0

# ---------------------------------------------------------------- layers
# One tar for a layer: the entries of ROOT (without ./), each directory's
# entries in name order, numeric owners as they are on disk, every mtime
# EPOCH, no atime/ctime, xattrs or ACLs (GNU format stores none of them).
layer_tar() { # root out.tar
    (
        cd "$1"
        find . -mindepth 1 -maxdepth 1 -printf '%P\0' | LC_ALL=C sort -z |
            tar --create --file="$2" --format=gnu --sort=name --numeric-owner \
                --mtime="@$EPOCH" --no-acls --no-xattrs --no-selinux \
                --null --verbatim-files-from --files-from=-
    )
}
# Appends a layer to the image being assembled in LAYOUT: LAYERS (their
# descriptors) and DIFF_IDS. From an uncompressed tar (gzip -n makes the
# blob) or an already compressed one whose diff_id is known.
LAYERS=() DIFF_IDS=()
add_layer() { # layout tar
    local gz
    gz=$(mktemp "$WORK/layer.XXXXXX")
    gzip -n -c "$2" >"$gz"
    add_gz_layer "$1" "$gz" "$(sha256 "$2")"
    rm -f "$gz"
}
add_gz_layer() { # layout tar.gz diff_id
    local hex size
    hex=$(sha256 "$2")
    size=$(stat -c %s "$2")
    mkdir -p "$1/blobs/sha256"
    ln -f "$2" "$1/blobs/sha256/$hex" 2>/dev/null || cp "$2" "$1/blobs/sha256/$hex"
    LAYERS+=("$(descriptor "$MT_LAYER_GZIP" "$hex" "$size")")
    DIFF_IDS+=("sha256:$3")
}
descriptor() { # mediaType hex size
    jq -cn --arg mt "$1" --arg d "sha256:$2" --argjson size "$3" '{mediaType: $mt, digest: $d, size: $size}'
}
# Writes a JSON text as a blob of LAYOUT; prints its descriptor.
json_blob() { # layout mediaType json
    local hex f
    f=$(mktemp "$WORK/blob.XXXXXX")
    printf '%s' "$3" >"$f"
    hex=$(sha256 "$f")
    mkdir -p "$1/blobs/sha256"
    mv -f "$f" "$1/blobs/sha256/$hex"
    descriptor "$2" "$hex" "$(stat -c %s "$1/blobs/sha256/$hex")"
}
# The config (the image's settings, CONFIG: a JSON object of the config's
# "config" field, HISTORY: a JSON array) and the manifest of LAYERS, as
# blobs; sets MANIFEST (its descriptor) and CONFIG_DESC. Empties LAYERS.
add_image() { # layout arch config history
    local variant cfg
    variant=$(variant_of "$2")
    cfg=$(jq -cn --arg created "$CREATED" --arg arch "$2" --arg variant "$variant" \
        --argjson config "$3" --argjson history "$4" \
        --argjson diff_ids "$(printf '%s\n' "${DIFF_IDS[@]}" | jq -Rc '.' | jq -sc '.')" \
        '{created: $created, architecture: $arch, os: "linux"}
         + (if $variant == "" then {} else {variant: $variant} end)
         + {config: $config, rootfs: {type: "layers", diff_ids: $diff_ids}, history: $history}')
    CONFIG_DESC=$(json_blob "$1" "$MT_CONFIG" "$cfg")
    MANIFEST=$(json_blob "$1" "$MT_MANIFEST" "$(jq -cn --arg mt "$MT_MANIFEST" --argjson config "$CONFIG_DESC" \
        --argjson layers "$(printf '%s\n' "${LAYERS[@]}" | jq -sc '.')" \
        '{schemaVersion: 2, mediaType: $mt, config: $config, layers: $layers}')")
    LAYERS=() DIFF_IDS=()
}
# oci-layout and index.json: DESC, tagged $TAG.
write_index() { # layout descriptor
    printf '{"imageLayoutVersion":"1.0.0"}' >"$1/oci-layout"
    jq -cn --arg mt "$MT_INDEX" --arg tag "$TAG" --argjson m "$2" \
        '{schemaVersion: 2, mediaType: $mt, manifests: [$m + {annotations: {"org.opencontainers.image.ref.name": $tag}}]}' \
        | tr -d '\n' >"$1/index.json"
}
hex_of() { jq -r '.digest | sub("^sha256:"; "")' <<<"$1"; }

# ---------------------------------------------------------------- python: layer 1
# debootstrap minbase with python3, trimmed, plus /opt/cfg/{a,b} for layer
# 2's opaque directory. Its key is the text of these functions (declare -f),
# the release, the mirror and the architecture: nothing else in this script.
build_base() { # root
    local root=$1
    # SOURCE_DATE_EPOCH: shadow's pwconv dates root's password with it, not today.
    SOURCE_DATE_EPOCH=$EPOCH LC_ALL=C debootstrap --variant=minbase --include=python3 \
        --arch="$ARCH" --force-check-gpg --cache-dir="$CACHE/debootstrap-debs" \
        "$RELEASE" "$root" "$MIRROR"
    [ -z "$(mounts_under "$root")" ] || fail "debootstrap left file systems mounted under $root"
    recompile_pycs "$root"
    trim_root "$root"
    install -d -m 0755 -o 0 -g 0 "$root/opt/cfg"
    printf 'a\n' >"$root/opt/cfg/a"
    printf 'b\n' >"$root/opt/cfg/b"
    chmod 0644 "$root/opt/cfg/a" "$root/opt/cfg/b"
}
# Debian compiles .pyc files that check their source's mtime; every mtime in
# the layer is EPOCH, so they would all be stale (recompiled at every start
# of every VM). Recompile the same files to check the source's hash instead,
# with a fixed hash seed so that the bytes do not vary.
recompile_pycs() { # root
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C PYTHONHASHSEED=0 chroot "$1" python3 -I -c '
import glob, importlib.util, os, py_compile, sys
n = 0
for top in sorted(glob.glob("/usr/lib/python3*")):
    for d, dirs, files in os.walk(top):
        dirs.sort()
        if os.path.basename(d) != "__pycache__":
            continue
        for f in sorted(files):
            if not f.endswith(".pyc"):
                continue
            pyc = os.path.join(d, f)
            src = importlib.util.source_from_cache(pyc)
            if not os.path.exists(src):
                continue
            opt = int(f.split(".opt-")[1][0]) if ".opt-" in f else 0
            py_compile.compile(src, cfile=pyc, dfile=src, doraise=True, optimize=opt,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
            n += 1
print(f"    recompiled {n} .pyc files (checked-hash)")
'
}
# What a container image does not need: documentation, apt's caches and
# lists, logs, debootstrap's copies of this machine's resolv.conf and
# hostname, device nodes (the runtime provides /dev), backup files.
trim_root() { # root
    local r=${1:?}
    # shellcheck disable=SC2115 # r is never empty (above)
    rm -rf "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/locale/* \
        "$r"/usr/share/lintian "$r"/var/cache/apt/* "$r"/var/lib/apt/lists/* \
        "$r"/var/cache/ldconfig/aux-cache "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old \
        "$r"/etc/hostname "$r"/etc/resolv.conf "$r"/etc/passwd- "$r"/etc/group- "$r"/etc/shadow- \
        "$r"/etc/gshadow- "$r"/dev/* "$r"/tmp/* "$r"/run/*
    mkdir -p "$r/var/lib/apt/lists/partial"
    find "$r/var/log" -type f -delete
}
BASE_KEY=$(key_of "python-base-v1" "release: $RELEASE" "mirror: $MIRROR" "arch: $ARCH" "epoch: $EPOCH" \
    "$(declare -f build_base recompile_pycs trim_root layer_tar)")
BASE="$CACHE/python-base-$BASE_KEY"

# The base's layer.tar.gz, its diff_id, and the account files that layer 2
# rewrites (as a Dockerfile's RUN useradd would: whole files, new lines).
ensure_base() {
    [ -f "$BASE/layer.tar.gz" ] && [ -f "$BASE/diff_id" ] && return 0
    step "python layer 1: debootstrap $RELEASE minbase + python3 (a minute or two)"
    is_root || fail "debootstrap needs root"
    local tmp="$BASE.tmp" start
    start=$(date +%s)
    safe_rm "$tmp"
    mkdir -p "$tmp" "$CACHE/debootstrap-debs"
    build_base "$tmp/root"
    [ -f "$tmp/root/etc/issue.net" ] || fail "layer 1 has no /etc/issue.net, which layer 2 whites out"
    mkdir -p "$tmp/etc"
    cp -a "$tmp/root/etc/passwd" "$tmp/root/etc/group" "$tmp/root/etc/shadow" "$tmp/root/etc/gshadow" "$tmp/etc/"
    layer_tar "$tmp/root" "$tmp/layer.tar"
    sha256 "$tmp/layer.tar" >"$tmp/diff_id"
    gzip -n -c "$tmp/layer.tar" >"$tmp/layer.tar.gz"
    rm -f "$tmp/layer.tar"
    safe_rm "$tmp/root"
    # Other bases (an older recipe or mirror) are never used again.
    for d in "$CACHE"/python-base-*; do
        [ "$d" = "$tmp" ] || safe_rm "$d"
    done
    mv -T "$tmp" "$BASE"
    echo "    layer 1 built in $(($(date +%s) - start)) s: $(du -h "$BASE/layer.tar.gz" | cut -f1) compressed"
}

# ---------------------------------------------------------------- python: image
build_python() {
    local dst="$OUT/python.tmp" l2="$WORK/python-layer2" t
    ensure_base
    step "python image"
    safe_rm "$dst"
    mkdir -p "$dst"
    add_gz_layer "$dst" "$BASE/layer.tar.gz" "$(cat "$BASE/diff_id")"

    # Layer 2, as `docker build` would record it: changed files whole, with
    # their parent directories; /app owned by the app user.
    mkdir -p "$l2"
    install -d -m 0755 -o 0 -g 0 "$l2/etc" "$l2/opt"
    cp -a "$BASE/etc/." "$l2/etc/"
    echo "app:x:999:999::/app:/bin/sh" >>"$l2/etc/passwd"
    echo "app:x:999:" >>"$l2/etc/group"
    echo "app:!:$((EPOCH / 86400)):0:99999:7:::" >>"$l2/etc/shadow"
    echo "app:!::" >>"$l2/etc/gshadow"
    install -d -m 0755 -o 999 -g 999 "$l2/app"
    install -m 0644 -o 999 -g 999 "$HERE/python/server.py" "$l2/app/server.py"
    # A second name of the same file, in the same layer: a tar hard link.
    ln "$l2/app/server.py" "$l2/app/server-link.py"
    # A plain whiteout: layer 1's /etc/issue.net is deleted.
    install -m 0644 -o 0 -g 0 /dev/null "$l2/etc/.wh.issue.net"
    # An opaque directory: layer 1's /opt/cfg (a, b) is replaced by c alone.
    install -d -m 0755 -o 0 -g 0 "$l2/opt/cfg"
    install -m 0644 -o 0 -g 0 /dev/null "$l2/opt/cfg/.wh..wh..opq"
    printf 'c\n' >"$l2/opt/cfg/c"
    chmod 0644 "$l2/opt/cfg/c"
    t="$WORK/python-layer2.tar"
    layer_tar "$l2" "$t"
    add_layer "$dst" "$t"

    add_image "$dst" "$ARCH" "$(jq -cn '{
            User: "app",
            ExposedPorts: {"8080/tcp": {}},
            Env: ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello from the image"],
            Entrypoint: ["python3"],
            Cmd: ["/app/server.py"],
            WorkingDir: "/app"
        }')" "$(jq -cn --arg c "$CREATED" --arg r "$RELEASE" '[
            {created: $c, created_by: ("debootstrap --variant=minbase --include=python3 " + $r + ", trimmed; /opt/cfg/a, /opt/cfg/b")},
            {created: $c, created_by: "useradd app (999:999); /app/server.py, /app/server-link.py (hard link); rm /etc/issue.net (whiteout); /opt/cfg replaced by c (opaque)"},
            {created: $c, created_by: "USER app; WORKDIR /app; ENV PATH GREETING; EXPOSE 8080; ENTRYPOINT python3; CMD /app/server.py", empty_layer: true}
        ]')"
    write_index "$dst" "$MANIFEST"
    install_output "$OUT/python" "$KEY_PYTHON"
    BUILT=1
}

# ---------------------------------------------------------------- static
# The static image of an architecture, in LAYOUT: /bin/busybox (and sh, id
# as links to it) and the site at /www. Sets MANIFEST; STATIC_TAR[arch] is
# its uncompressed layer.
declare -A STATIC_TAR=() STATIC_CONFIG=()
build_static() { # layout arch
    local root="$WORK/static-root-$2" x="$WORK/busybox-$2" bb="" p
    safe_rm "$root" "$x"
    dpkg-deb -x "${BB_DEB[$2]}" "$x"
    # Debian 12 ships it as /bin/busybox, Debian 13 (merged /usr) as /usr/bin/busybox.
    for p in bin/busybox usr/bin/busybox; do
        [ -f "$x/$p" ] && { bb="$x/$p"; break; }
    done
    [ -n "$bb" ] || fail "${BB_DEB[$2]} has no bin/busybox or usr/bin/busybox"
    install -d -m 0755 "$root/bin" "$root/www" "$root/www/cgi-bin"
    install -m 0755 "$bb" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    ln -s busybox "$root/bin/id"
    install -m 0644 "$HERE/static/www/index.html" "$root/www/index.html"
    install -m 0755 "$HERE/static/www/cgi-bin/id" "$root/www/cgi-bin/id"
    chown -R -h 0:0 "$root"
    STATIC_TAR[$2]="$WORK/static-$2.tar"
    layer_tar "$root" "${STATIC_TAR[$2]}"
    mkdir -p "$1"
    add_layer "$1" "${STATIC_TAR[$2]}"
    add_image "$1" "$2" "$(jq -cn '{
            ExposedPorts: {"8081/tcp": {}},
            Cmd: ["/bin/busybox", "httpd", "-f", "-v", "-p", "8081", "-h", "/www"]
        }')" "$(jq -cn --arg c "$CREATED" --arg v "$(dpkg-deb -f "${BB_DEB[$2]}" Version)" '[
            {created: $c, created_by: ("busybox-static " + $v + " as /bin/busybox, /bin/sh, /bin/id; /www")},
            {created: $c, created_by: "EXPOSE 8081; CMD busybox httpd -f -v -p 8081 -h /www", empty_layer: true}
        ]')"
    STATIC_CONFIG[$2]=$CONFIG_DESC
}

# Docker 20.10's `docker save`: per layer a directory <v1 id>/ with VERSION,
# json (the legacy v1 image) and layer.tar; the config as <hex>.json;
# manifest.json and repositories.
write_docker_archive() { # out.tar arch
    local d="$WORK/docker-archive" cfg_hex layer_hex v1id v1json
    safe_rm "$d"
    mkdir -p "$d"
    cfg_hex=$(hex_of "${STATIC_CONFIG[$2]}")
    layer_hex=$(sha256 "${STATIC_TAR[$2]}")
    # Docker derives the v1 id from the layer's chain id (with one layer,
    # its diff_id) and the v1 image; any stable hash of them will do.
    v1id=$(key_of "v1-id" "sha256:$layer_hex" "sha256:$cfg_hex")
    v1json=$(jq -c --arg id "$v1id" '{id: $id, created, container_config: {}, config, architecture, os}' \
        "$OUT/static.tmp/blobs/sha256/$cfg_hex")
    mkdir -p "$d/$v1id"
    printf '1.0' >"$d/$v1id/VERSION"
    printf '%s' "$v1json" >"$d/$v1id/json"
    cp "${STATIC_TAR[$2]}" "$d/$v1id/layer.tar"
    cp "$OUT/static.tmp/blobs/sha256/$cfg_hex" "$d/$cfg_hex.json"
    jq -cn --arg cfg "$cfg_hex.json" --arg tag "$REPO_TAG" --arg layer "$v1id/layer.tar" \
        '[{Config: $cfg, RepoTags: [$tag], Layers: [$layer]}]' >"$d/manifest.json"
    jq -cn --arg name "${REPO_TAG%:*}" --arg tag "${REPO_TAG##*:}" --arg id "$v1id" \
        '{($name): {($tag): $id}}' >"$d/repositories"
    archive_dir "$d" "$1"
}
# Docker 25+'s: an OCI layout (the layer uncompressed, its digest its
# diff_id; the legacy v1 json as an unreferenced blob), index.json tagged
# with the full name, plus manifest.json (paths into blobs/, LayerSources)
# and repositories.
write_docker_oci_archive() { # out.tar arch
    local d="$WORK/docker-archive-oci" cfg_hex layer_hex size v1json layer_desc m
    safe_rm "$d"
    mkdir -p "$d/blobs/sha256"
    cfg_hex=$(hex_of "${STATIC_CONFIG[$2]}")
    layer_hex=$(sha256 "${STATIC_TAR[$2]}")
    size=$(stat -c %s "${STATIC_TAR[$2]}")
    cp "${STATIC_TAR[$2]}" "$d/blobs/sha256/$layer_hex"
    cp "$OUT/static.tmp/blobs/sha256/$cfg_hex" "$d/blobs/sha256/$cfg_hex"
    v1json=$(jq -c --arg id "$(key_of "v1-id" "sha256:$layer_hex" "sha256:$cfg_hex")" \
        '{id: $id, created, container_config: {}, config, architecture, os}' "$d/blobs/sha256/$cfg_hex")
    json_blob "$d" application/json "$v1json" >/dev/null
    layer_desc=$(descriptor "$MT_LAYER_TAR" "$layer_hex" "$size")
    m=$(json_blob "$d" "$MT_MANIFEST" "$(jq -cn --arg mt "$MT_MANIFEST" --argjson config "${STATIC_CONFIG[$2]}" \
        --argjson layer "$layer_desc" '{schemaVersion: 2, mediaType: $mt, config: $config, layers: [$layer]}')")
    printf '{"imageLayoutVersion": "1.0.0"}' >"$d/oci-layout"
    jq -cn --arg mt "$MT_INDEX" --argjson m "$m" --arg name "docker.io/$REPO_TAG" --arg tag "${REPO_TAG##*:}" \
        '{schemaVersion: 2, mediaType: $mt, manifests: [$m + {annotations: {"io.containerd.image.name": $name, "org.opencontainers.image.ref.name": $tag}}]}' \
        | tr -d '\n' >"$d/index.json"
    jq -cn --arg cfg "blobs/sha256/$cfg_hex" --arg tag "$REPO_TAG" --arg layer "blobs/sha256/$layer_hex" \
        --arg diff "sha256:$layer_hex" --arg mt "$MT_LAYER_TAR" --argjson size "$size" \
        '[{Config: $cfg, RepoTags: [$tag], Layers: [$layer],
           LayerSources: {($diff): {mediaType: $mt, size: $size, digest: $diff}}}]' >"$d/manifest.json"
    jq -cn --arg name "${REPO_TAG%:*}" --arg tag "${REPO_TAG##*:}" --arg id "$layer_hex" \
        '{($name): {($tag): $id}}' >"$d/repositories"
    archive_dir "$d" "$1"
}
# A deterministic tar of a directory's contents, owned by root.
archive_dir() { # dir out.tar
    chmod -R u=rwX,go=rX "$1"
    (
        cd "$1"
        find . -mindepth 1 -maxdepth 1 -printf '%P\0' | LC_ALL=C sort -z |
            tar --create --file="$2" --format=gnu --sort=name --owner=0 --group=0 --numeric-owner \
                --mtime="@$EPOCH" --no-acls --no-xattrs --no-selinux --null --verbatim-files-from --files-from=-
    )
}

build_static_family() {
    local a layout descs=() idx
    step "static image ($ARCH) and its docker archives"
    safe_rm "$OUT/static.tmp"
    build_static "$OUT/static.tmp" "$ARCH"
    write_index "$OUT/static.tmp" "$MANIFEST"
    if ! key_matches "$OUT/docker-archive.tar" "$KEY_DOCKER"; then
        write_docker_archive "$OUT/docker-archive.tar.tmp" "$ARCH"
    fi
    if ! key_matches "$OUT/docker-archive-oci.tar" "$KEY_DOCKER_OCI"; then
        write_docker_oci_archive "$OUT/docker-archive-oci.tar.tmp" "$ARCH"
    fi

    step "multi-platform image (${MULTI_ARCHES[*]})"
    layout="$OUT/multi.tmp"
    safe_rm "$layout"
    for a in "${MULTI_ARCHES[@]}"; do
        build_static "$layout" "$a"
        descs+=("$(jq -c --arg a "$a" --arg v "$(variant_of "$a")" \
            '. + {platform: ({architecture: $a, os: "linux"} + (if $v == "" then {} else {variant: $v} end))}' <<<"$MANIFEST")")
    done
    idx=$(json_blob "$layout" "$MT_INDEX" "$(jq -cn --arg mt "$MT_INDEX" \
        --argjson ms "$(printf '%s\n' "${descs[@]}" | jq -sc '.')" '{schemaVersion: 2, mediaType: $mt, manifests: $ms}')")
    write_index "$layout" "$idx"

    for a in static:$KEY_STATIC multi:$KEY_MULTI; do
        if key_matches "$OUT/${a%%:*}" "${a#*:}"; then
            safe_rm "$OUT/${a%%:*}.tmp"
        else
            install_output "$OUT/${a%%:*}" "${a#*:}"
        fi
    done
    for a in docker-archive.tar:$KEY_DOCKER docker-archive-oci.tar:$KEY_DOCKER_OCI; do
        [ -f "$OUT/${a%%:*}.tmp" ] || continue
        rm -f "$OUT/${a%%:*}.key"
        mv -f "$OUT/${a%%:*}.tmp" "$OUT/${a%%:*}"
        echo "${a#*:}" >"$OUT/${a%%:*}.key"
    done
    BUILT=1
}

# ---------------------------------------------------------------- build
if key_matches "$OUT/python" "$KEY_PYTHON"; then
    echo "==> python: up to date"
else
    is_root || fail "building the images needs root (debootstrap, chroot, file owners)"
    build_python
fi
if key_matches "$OUT/static" "$KEY_STATIC" && key_matches "$OUT/multi" "$KEY_MULTI" &&
    key_matches "$OUT/docker-archive.tar" "$KEY_DOCKER" && key_matches "$OUT/docker-archive-oci.tar" "$KEY_DOCKER_OCI"; then
    echo "==> static, multi, docker archives: up to date"
else
    is_root || fail "building the images needs root (file owners)"
    build_static_family
fi

# ---------------------------------------------------------------- verify
# Every blob of a layout is what its name says, every descriptor's size is
# its blob's; skopeo and umoci then read the images as images' --from-image
# will.
check_layout() { # layout
    local f hex d
    for f in "$1"/blobs/sha256/*; do
        hex=${f##*/}
        [ "$(sha256 "$f")" = "$hex" ] || fail "$f: digest mismatch"
    done
    # The descriptors of index.json and of the JSON blobs (manifests,
    # indexes; configs have none).
    while read -r d; do
        hex=${d%% *}
        [ -f "$1/blobs/sha256/$hex" ] || fail "$1: missing blob $hex"
        [ "$(stat -c %s "$1/blobs/sha256/$hex")" = "${d#* }" ] || fail "$1: size mismatch for $hex"
    done < <(for f in "$1/index.json" "$1"/blobs/sha256/*; do
        [ "$(head -c 1 "$f")" = "{" ] || continue
        jq -r '.manifests[]?, .config?, .layers[]? | objects | select(has("digest") and has("size")) | "\(.digest | sub("^sha256:"; "")) \(.size)"' "$f"
    done)
}
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 20000))
        # /proc/net/tcp{,6}: local address field 2, hex port after the colon.
        awk -v p="$(printf '%04X' "$p")" '$2 ~ (":" p "$") { found = 1 } END { exit !found }' \
            /proc/net/tcp /proc/net/tcp6 2>/dev/null || { echo "$p"; return; }
    done
}
# Polls URL with the command given until it answers; prints the answer.
fetch() { # tries command...
    local i out
    for ((i = 0; i < $1; i++)); do
        out=$("${@:2}" 2>/dev/null) && { printf '%s' "$out"; return 0; }
        sleep 0.2
    done
    return 1
}
verify() {
    local u="$WORK/unpack" port pid out a
    # Run with nothing of this environment (env -i), as a runtime would.
    CHROOT=$(command -v chroot)
    step "verifying"
    for a in python static multi; do
        check_layout "$OUT/$a"
    done
    out=$(skopeo inspect "oci:$OUT/python:$TAG")
    [ "$(jq -r '.Architecture + " " + .Os + " " + (.Layers | length | tostring)' <<<"$out")" = "$ARCH linux 2" ] ||
        fail "skopeo inspect python: $out"
    out=$(skopeo inspect --config "oci:$OUT/python:$TAG")
    [ "$(jq -c '.config | [.User, .WorkingDir, .Entrypoint, .Cmd]' <<<"$out")" = '["app","/app",["python3"],["/app/server.py"]]' ] ||
        fail "python config: $out"
    for a in "${MULTI_ARCHES[@]}"; do
        out=$(skopeo --override-arch "$a" inspect "oci:$OUT/multi:$TAG")
        [ "$(jq -r .Architecture <<<"$out")" = "$a" ] || fail "skopeo inspect multi for $a: $out"
    done
    [ "$(skopeo inspect --raw "oci:$OUT/multi:$TAG" | jq -r .mediaType)" = "$MT_INDEX" ] || fail "multi: not an image index"
    local diff
    diff=$(skopeo inspect --config "oci:$OUT/static:$TAG" | jq -c .rootfs.diff_ids)
    for a in docker-archive.tar docker-archive-oci.tar; do
        out=$(skopeo inspect "docker-archive:$OUT/$a")
        [ "$(jq -c '[.Layers, .Architecture]' <<<"$out")" = "[$diff,\"$ARCH\"]" ] || fail "skopeo inspect $a: $out"
        out=$(skopeo inspect --config "docker-archive:$OUT/$a")
        [ "$(jq -c .config.Cmd <<<"$out")" = '["/bin/busybox","httpd","-f","-v","-p","8081","-h","/www"]' ] ||
            fail "$a config: $out"
    done
    echo "    skopeo: python, static, multi (${MULTI_ARCHES[*]}), docker-archive.tar, docker-archive-oci.tar"

    # python: the layers applied (umoci unpack), then the server in a chroot
    # as the image would run it.
    safe_rm "$u"
    umoci unpack --image "$OUT/python:$TAG" "$u" >/dev/null
    local r="$u/rootfs"
    [ ! -e "$r/etc/issue.net" ] || fail "python: the whiteout of /etc/issue.net was not applied"
    out=$(find "$r/opt/cfg" -mindepth 1 -printf '%P ')
    [ "$out" = "c " ] || fail "python: /opt/cfg holds '$out', not c alone"
    [ "$(stat -c %i "$r/app/server.py")" = "$(stat -c %i "$r/app/server-link.py")" ] || fail "python: the hard link was lost"
    [ "$(stat -c %u:%g "$r/app" "$r/app/server.py" | sort -u)" = "999:999" ] || fail "python: /app is not owned by 999:999"
    [ "$(stat -c %g:%a "$r/etc/shadow")" = 42:640 ] || fail "python: /etc/shadow is not root:shadow (42) 0640"
    grep -qx 'app:x:999:999::/app:/bin/sh' "$r/etc/passwd" || fail "python: no app user in /etc/passwd"
    grep -qx 'root:x:0:0:root:/root:/bin/bash' "$r/etc/passwd" || fail "python: /etc/passwd lost layer 1's lines"
    echo "    $(env -i "$CHROOT" "$r" /usr/bin/python3 --version)"
    port=$(free_port)
    timeout 30 env -i "$CHROOT" --userspec=999:999 "$r" /usr/bin/env -C /app -i \
        PATH=/usr/local/bin:/usr/bin:/bin "GREETING=hello from the image" PORT="$port" \
        python3 /app/server.py 2>"$WORK/server.log" &
    pid=$!
    local get=(env -i "$CHROOT" "$r" /usr/bin/python3 -c "
import json, sys, urllib.request
r = urllib.request.urlopen('http://127.0.0.1:$port/check', timeout=5)
assert r.headers['X-Powered-By'] == 'python-test-image', r.headers
print(r.read().decode())")
    out=$(fetch 50 "${get[@]}") || { kill "$pid" 2>/dev/null; cat "$WORK/server.log" >&2; fail "python: server.py did not answer in the chroot"; }
    local want='{"cwd":"/app","gid":999,"greeting":"hello from the image","hardlink_same_inode":true,"issue_net_exists":false,"opt_cfg":["c"],"uid":999,"written_before":false}'
    [ "$(jq -cS '{cwd, gid, greeting, hardlink_same_inode, issue_net_exists, opt_cfg, uid, written_before}' <<<"$out")" = "$want" ] ||
        { kill "$pid" 2>/dev/null; fail "python: unexpected answer: $out"; }
    out=$("${get[@]}")
    [ "$(jq -c .written_before <<<"$out")" = true ] || { kill "$pid" 2>/dev/null; fail "python: second answer: $out"; }
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "    python: layers applied; server.py answered as uid 999 in /app: $(jq -c '{uid, cwd, opt_cfg, argv}' <<<"$out")"

    # static: busybox httpd and its CGI, in a chroot.
    safe_rm "$u"
    umoci unpack --image "$OUT/static:$TAG" "$u" >/dev/null
    r="$u/rootfs"
    [ "$(readlink "$r/bin/sh") $(readlink "$r/bin/id")" = "busybox busybox" ] || fail "static: /bin/sh, /bin/id are not links to busybox"
    port=$(free_port)
    timeout 30 env -i "$CHROOT" "$r" /bin/busybox httpd -f -p "127.0.0.1:$port" -h /www &
    pid=$!
    out=$(fetch 50 env -i "$CHROOT" "$r" /bin/busybox wget -q -O- "http://127.0.0.1:$port/cgi-bin/id") ||
        { kill "$pid" 2>/dev/null; fail "static: httpd did not answer in the chroot"; }
    [ "$out" = "uid: 0" ] || { kill "$pid" 2>/dev/null; fail "static: /cgi-bin/id said: $out"; }
    out=$(env -i "$CHROOT" "$r" /bin/busybox wget -q -O- "http://127.0.0.1:$port/")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ "$out" = "hello from a static binary" ] || fail "static: / said: $out"
    echo "    static: httpd answered /, /cgi-bin/id (uid: 0)"
    safe_rm "$u"
}
if [ "$BUILT" = 1 ] || [ "$VERIFY" = 1 ]; then
    verify
fi

for a in python static multi; do
    printf '    %-24s %s  %s\n' "oci:$OUT/$a:$TAG" "$(du -sh "$OUT/$a" | cut -f1)" \
        "$(jq -r '.manifests[0].digest' "$OUT/$a/index.json")"
done
for a in docker-archive.tar docker-archive-oci.tar; do
    printf '    %-24s %s\n' "docker-archive:$OUT/$a" "$(du -h "$OUT/$a" | cut -f1)"
done
echo "==> test images: $OUT"
