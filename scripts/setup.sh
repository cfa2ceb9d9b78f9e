#!/usr/bin/env bash
# Sets up a fresh Debian machine (root, Node >= 20) for Ballast.
#   scripts/setup.sh          what running the agent needs: a C toolchain for the
#                             native addon, npm packages, the build
#   scripts/setup.sh --test   also the real peers the tests and benchmarks use:
#                             QEMU tools, libnbd tools, nbdkit, fio, etcd
# Debian packages are installed only when missing; nothing here relies on what
# an earlier run left behind.
set -euo pipefail
cd "$(dirname "$0")/.."

want=(python3 make g++)
if [[ "${1:-}" == "--test" ]]; then
  want+=(qemu-utils libnbd-bin python3-libnbd nbdkit fio)
  # dumpd: a real QEMU, a guest kernel and busybox for the end-to-end dump test
  want+=(qemu-system-x86 linux-image-amd64 busybox-static binutils cpio)
  # the agent: a real Prometheus scrapes it; libvirt's schema judges `attach --format libvirt`
  want+=(prometheus libvirt-clients libxml2-utils)
  # libvirt guests: a real libvirtd (and virtlogd) the tests start; it brings the
  # libvirt-qemu user that QEMU runs as
  want+=(libvirt-daemon-system libvirt-daemon-driver-qemu)
  # TLS: the tests make their certificates with openssl
  want+=(openssl)
  # deploy: real OpenSSH servers on loopback ports
  want+=(openssh-server openssh-client)
  # the cluster store: real etcd clusters on loopback ports
  want+=(etcd-server etcd-client)
  # notifications: a pool on a real loop-device filesystem whose medium flips
  # hardening: another uid (setpriv), full and failing disks (tmpfs, loop devices, ext4)
  want+=(util-linux mount e2fsprogs)
fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

node -e 'if (+process.versions.node.split(".")[0] < 20) { console.error("setup: Node >= 20 is required, found " + process.version); process.exit(1) }'

# npm ci builds the native addon (install script) and dist/ (prepare script). It takes
# minutes, so it runs only when what it produces would differ: another package-lock.json,
# another Node ABI, another addon source, or its output missing. Otherwise only dist/ is
# rebuilt, and only when a source is newer than it.
stamp=node_modules/.ballast-setup
want_stamp="$(cat package-lock.json binding.gyp native/* 2>/dev/null | sha256sum | cut -d' ' -f1) node-abi-$(node -p process.versions.modules)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" && -f build/Release/ballast_native.node && -d dist ]]; then
  if [[ -n "$(find agent agentd bench cli cluster deploy dumpd guestd migrate nbd nemesis notify test -name '*.ts' -newer "$stamp" -print -quit)" ]] ||
    [[ tsconfig.build.json -nt "$stamp" ]]; then
    echo "setup: dependencies unchanged; rebuilding dist/" >&2
    npm run build --silent
    touch "$stamp"
  else
    echo "setup: nothing changed since the last setup (npm ci skipped)" >&2
  fi
else
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want_stamp" >"$stamp"
fi
