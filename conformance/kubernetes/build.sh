#!/usr/bin/env bash
# Builds the real Kubernetes components (and kwok, kine, etcd 3.5) that the Kubernetes
# harness runs, at the versions pinned in go.mod and below, into .cache/bin
# (ignored). A binary is rebuilt only when its pin changed; Go's module and build
# caches make a rebuild cheap. Prints what it built or reused.
set -euo pipefail
cd "$(dirname "$0")"

K8S_VERSION=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
KWOK_VERSION=v0.8.0
KINE_VERSION=v0.17.5
BIN=$PWD/.cache/bin
mkdir -p "$BIN"

if ! command -v go >/dev/null 2>&1; then
  echo "!!! go is not installed: the Kubernetes components cannot be built" >&2
  exit 1
fi

# stamp NAME PIN: true when BIN/NAME exists and was built from PIN.
fresh() { [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.pin" 2>/dev/null)" = "$2" ]; }
built() { echo "$2" >"$BIN/.$1.pin"; echo "built   $1 $2 ($(($(date +%s) - $3)) s)"; }

# A binary's pin: its version, the Go toolchain and every module version that
# goes into it (so changes to the harness's own dependencies rebuild nothing).
k8s_pin() {
  echo "$K8S_VERSION $(go env GOVERSION) $(go list -deps -tags selinux,notest \
    -f '{{with .Module}}{{.Path}}@{{.Version}}{{end}}' "k8s.io/kubernetes/cmd/$1" |
    sort -u | sha256sum | cut -c1-16)"
}
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
# One at a time: each link takes about 2 GiB and both cores.
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  pin=$(k8s_pin "$cmd")
  if fresh "$cmd" "$pin"; then
    echo "reused  $cmd $K8S_VERSION"
    continue
  fi
  t0=$(date +%s)
  CGO_ENABLED=0 go build -tags selinux,notest -ldflags "$ldflags" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  built "$cmd" "$pin" "$t0"
done

# The reference etcd 3.5, from the module in etcd/ (its replace lines would
# stop a go install).
for tool in etcd:go.etcd.io/etcd/server/v3 etcdctl:go.etcd.io/etcd/etcdctl/v3; do
  name=${tool%%:*} pkg=${tool#*:}
  version=$(cd etcd && go list -m -f '{{.Version}}' "$pkg")
  pin="$version $(go env GOVERSION)"
  if fresh "$name" "$pin"; then echo "reused  $name $version"; continue; fi
  t0=$(date +%s)
  (cd etcd && CGO_ENABLED=0 go build -ldflags "-s -w" -o "$BIN/$name" "$pkg")
  built "$name" "$pin" "$t0"
done

# kwok and kine have no replace lines: go install at a pinned version, verified
# against the checksum database, outside our module.
install_pinned() { # NAME PACKAGE VERSION
  if fresh "$1" "$3 $(go env GOVERSION)"; then echo "reused  $1 $3"; return; fi
  t0=$(date +%s)
  (cd / && CGO_ENABLED=0 GOBIN="$BIN" GOFLAGS=-mod=mod go install -ldflags "-s -w" "$2@$3")
  [ "$(basename "$2")" = "$1" ] || mv "$BIN/$(basename "$2")" "$BIN/$1"
  built "$1" "$3 $(go env GOVERSION)" "$t0"
}
install_pinned kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
install_pinned kine github.com/k3s-io/kine "$KINE_VERSION"

echo "components in $BIN"
