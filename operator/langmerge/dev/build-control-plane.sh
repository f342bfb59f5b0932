#!/usr/bin/env bash
# Build kube-apiserver and kube-controller-manager v1.20.2 from Debian bookworm's `kubernetes` source package and
# cache the binaries. Idempotent: exits at once when the cached binaries exist. Also installs etcd and openssl.
#
# Cache folder: $LANGMERGE_CACHE (default ~/.cache/langmerge). Binaries land in $LANGMERGE_CACHE/kube-1.20.2/bin.
set -euo pipefail

CACHE="${LANGMERGE_CACHE:-$HOME/.cache/langmerge}"
VERSION="1.20.2"
DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
BIN="$CACHE/kube-$VERSION/bin"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_pkgs=()
command -v etcd >/dev/null 2>&1 || need_pkgs+=(etcd-server)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)

if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
  fi
  echo "control plane binaries cached in $BIN"
  exit 0
fi

start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends golang-1.19-go golang-github-modern-go-reflect2-dev \
  etcd-server rsync make openssl curl ca-certificates >/dev/null

work="$(mktemp -d "${TMPDIR:-/tmp}/langmerge-kube-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sources.d" "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
# Source repositories from the system's own list, without touching the system's apt configuration.
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$work/sources.d/debian.sources"
apt_opts=(-o "Dir::Etc::SourceParts=$work/sources.d" -o Dir::Etc::SourceList=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache")
apt-get "${apt_opts[@]}" update -qq
(cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only "kubernetes=$DEB_VERSION" >/dev/null)
tar -C "$work/src" -xzf "$work/src/kubernetes_1.20.5+really1.20.2.orig.tar.gz"
tree="$work/src/kubernetes-$VERSION"

# Go >= 1.18 breaks the vendored reflect2 v1.0.1 (apiserver dies with "fatal error: fault"): use Debian's 1.0.2.
r2="$tree/vendor/github.com/modern-go/reflect2"
find "$r2" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) -delete
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$r2/"
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$r2/" 2>/dev/null || true

export GOROOT=/usr/lib/go-1.19 PATH="/usr/lib/go-1.19/bin:$PATH" GOFLAGS=-mod=vendor GOPROXY=off \
       GOPATH="$work/gopath" GOCACHE="$work/gocache"
make -C "$tree" WHAT="cmd/kube-apiserver cmd/kube-controller-manager" KUBE_BUILD_PLATFORMS=linux/amd64 >"$work/build.log" 2>&1 \
  || { tail -50 "$work/build.log"; exit 1; }

mkdir -p "$BIN.tmp"
cp "$tree/_output/bin/kube-apiserver" "$tree/_output/bin/kube-controller-manager" "$BIN.tmp/"
rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
echo "built control plane in $(( $(date +%s) - start )) s -> $BIN"
