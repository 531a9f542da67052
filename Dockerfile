# vmcgi in a container: Node, QEMU for aarch64 guests, and the default guest.
#
#   docker build -t vmcgi .
#   docker run --init -p 8080:80 vmcgi                       # TCG
#   docker run --init -p 8080:80 --device /dev/kvm \
#     --group-add "$(getent group kvm | cut -d: -f3)" vmcgi   # KVM (arm64 host)
#
# A linux/arm64 container image as a guest (the build needs root, for the
# owners of the image's files), then served:
#
#   docker run --rm --user root -v "$PWD:/work" vmcgi \
#     node dist/image/main.js --from-image docker-archive:/work/app.tar --out /work/app
#   docker run --init -p 8080:8080 -v "$PWD/app:/guest:ro" vmcgi \
#     node dist/main.js --config /guest/vmcgi.json --host 0.0.0.0 --port 8080
#
# The build stages run on the build machine's own architecture
# ($BUILDPLATFORM): on amd64 the guest is cross-compiled, on arm64 (a
# Raspberry Pi) compiled natively. Neither the guest nor the JavaScript
# depends on the architecture of the image, so an arm64 image built on an
# amd64 machine needs no emulation for the slow part. Only Debian packages
# are used; BuildKit is needed (docker buildx, or DOCKER_BUILDKIT=1).

# The guest: kernel (images/kernel.sh), then initramfs (images/initramfs.sh).
FROM --platform=$BUILDPLATFORM debian:trixie-slim AS guest
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# Build tools for the guest kernel and initramfs, the newest linux-source,
# and a cross compiler plus arm64 busybox unless the build machine is arm64:
# those groups of images/packages.txt.
COPY images/packages.txt images/
RUN set -eux; \
    groups="kernel|kernel-source|initramfs|image-init"; \
    if [ "$(dpkg --print-architecture)" != arm64 ]; then \
        dpkg --add-architecture arm64; \
        groups="$groups|cross-aarch64"; \
    fi; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends \
        $(awk -v re="^($groups)\$" '$1 ~ re { print $2 }' images/packages.txt)
# The kernel first, from its recipe alone: it takes minutes, and changes to
# the initramfs recipe, the site, the init or the agent do not rebuild it.
COPY images/lib.sh images/kernel.sh images/kernel.config images/kernel-aarch64.config images/
RUN bash images/kernel.sh
COPY images/ images/
# The initramfs, and vmcgi's init for container images (images/image-init.sh),
# which `--from-image` puts in each image's own initramfs.
RUN bash images/initramfs.sh && bash images/image-init.sh && rm -rf images/out/cache images/out/aarch64/initramfs-build


# vmcgi itself: the compiled TypeScript and its production dependencies.
# A separate stage, so that TypeScript and guest changes do not rebuild
# each other.
FROM --platform=$BUILDPLATFORM debian:trixie-slim AS app
ENV DEBIAN_FRONTEND=noninteractive
RUN --mount=type=bind,source=images/packages.txt,target=/tmp/packages.txt \
    apt-get update -q && \
    apt-get install -y -q --no-install-recommends \
        $(awk '$1 ~ /^(node|npm)$/ { print $2 }' /tmp/packages.txt)
WORKDIR /src
COPY package.json package-lock.json ./
# Behind a proxy that intercepts TLS, give npm the proxy's CA certificate:
# docker build --secret id=ca,src=/path/to/ca.pem (not stored in the image).
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/ca; fi; \
    npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src/ src/
RUN npm run build && npm prune --omit=dev --no-audit --no-fund


FROM debian:trixie-slim
ENV DEBIAN_FRONTEND=noninteractive
# Node, QEMU for the aarch64 guest, setpriv and setcap, and what turns a
# container image into a guest (skopeo, umoci, mkfs.erofs): the node, run,
# run-aarch64, docker and image groups of images/packages.txt (read from the
# build context, not copied into the image). The 32-bit ARM emulator that
# qemu-system-arm also carries (30 MB) is left out. setcap lets node, as a
# non-root user, listen on port 80.
RUN --mount=type=bind,source=images/packages.txt,target=/tmp/packages.txt \
    set -eux; \
    echo 'path-exclude /usr/bin/qemu-system-arm' >/etc/dpkg/dpkg.cfg.d/vmcgi-exclude; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends \
        $(awk '$1 ~ /^(node|run|run-aarch64|docker|image)$/ { print $2 }' /tmp/packages.txt); \
    setcap cap_net_bind_service=+ep "$(readlink -f /usr/bin/node)"; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --system --user-group --uid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin vmcgi

WORKDIR /app
COPY --from=app /src/package.json ./
COPY --from=app /src/node_modules/ node_modules/
COPY --from=app /src/dist/ dist/
COPY --from=guest /src/images/out/aarch64/Image /src/images/out/aarch64/initramfs.cpio.gz /src/images/out/aarch64/image-init images/out/aarch64/
COPY config/docker.json config/

# For KVM, give this user the host's kvm group: --group-add <gid of kvm>.
USER vmcgi
EXPOSE 80
# Exec form, so that SIGTERM from `docker stop` reaches node (run with --init,
# so that node is not PID 1). vmcgi drains for shutdown.drainMs (5 s), well
# inside Docker's 10 s before SIGKILL.
CMD ["node", "dist/main.js", "--config", "/app/config/docker.json"]
