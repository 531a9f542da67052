#!/usr/bin/env bash
# Installs whatever vmcgi still lacks on a Debian machine with Node 20, then
# builds it: Debian packages, npm packages, the TypeScript and the default guest
# image. Each step is skipped when it is already done, so running it again is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '==> %s\n' "$*"; }

# What vmcgi and its tests run, for both guests: the run, run-ARCH, test and
# image groups of images/packages.txt, which says why each is needed. The image
# recipes install their own build tools (as root) or name them.
mapfile -t packages < <(awk '$1 ~ /^(run|run-aarch64|run-x86_64|test|image)$/ { print $2 }' images/packages.txt)
((${#packages[@]})) || { echo "setup: images/packages.txt lists no packages" >&2; exit 1; }
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
  step "installing Debian packages: ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: run as root, or install them first: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  step 'installing npm packages (npm ci)'
  npm ci --no-audit --no-fund
fi

step 'building TypeScript'
npm run --silent build

step 'building the default guest image'
npm run --silent images

step 'building the test guest image (the same kernel, images/test-site over images/site)'
npm run --silent images -- --site images/site --site images/test-site --out images/out/test-site

step "building the kernel-only test guest (the test guest's initramfs built into the same kernel, relinked)"
npm run --silent images -- --builtin-initramfs images/out/test-site/initramfs.cpio.gz --out images/out/kernel-only

step 'building the x86_64 guest image'
npm run --silent images -- --arch x86_64

step 'building the test container images (test/images/build.sh: Debian packages, no registry)'
bash test/images/build.sh
