#!/usr/bin/env bash
# Builds the real Kubernetes components used by the tests and `make demo` from the Go module proxy.
# Binaries are cached under ~/.cache/ckpt-operator/bin/<component>-<version>/ and rebuilt only when missing.
# Usage: hack/build-tools.sh [etcd|kube|helm|kwok|kstatus|kube-score|kueue|all]   (prints the bin directory of each on stdout)
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.35.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
CLI_UTILS_VERSION=${CLI_UTILS_VERSION:-v0.37.2}  # kstatus
KUBE_SCORE_VERSION=${KUBE_SCORE_VERSION:-v1.20.0}
KUEUE_VERSION=${KUEUE_VERSION:-v0.17.0}
CACHE=${CKPT_CACHE:-$HOME/.cache/ckpt-operator}
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

log() { printf '[build-tools] %s\n' "$*" >&2; }

# wrapper_module DIR MODULE VERSION: a throwaway main module that requires MODULE@VERSION.
wrapper_module() {
  rm -rf "$1" && mkdir -p "$1"
  (cd "$1" && go mod init ckpt-operator.local/tools >/dev/null 2>&1 && go mod edit -require="$2@$3")
}

build_etcd() {
  local out="$CACHE/bin/etcd-$ETCD_VERSION"
  [[ -x $out/etcd ]] && { echo "$out"; return; }
  local work="$CACHE/work/etcd-$ETCD_VERSION"
  log "building etcd $ETCD_VERSION (cold: ~3 min)"
  wrapper_module "$work" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  (cd "$work" && go mod download go.etcd.io/etcd/server/v3 && go get go.etcd.io/etcd/server/v3@"$ETCD_VERSION" >/dev/null 2>&1 \
     && go build -trimpath -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3)
  mv "$out.tmp" "$out"
  echo "$out"
}

build_kube() {
  local out="$CACHE/bin/kubernetes-$K8S_VERSION"
  [[ -x $out/kube-apiserver && -x $out/kubectl ]] && { echo "$out"; return; }
  local work="$CACHE/work/kubernetes-$K8S_VERSION"
  log "building kube-apiserver, kube-scheduler, kube-controller-manager, kubectl $K8S_VERSION (cold: ~20 min)"
  wrapper_module "$work" k8s.io/kubernetes "$K8S_VERSION"
  local gomod staging minor="${K8S_VERSION#v1.}"
  gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # k8s.io/kubernetes replaces its staging modules with ./staging paths; point each at its published v0.<minor>.<patch>.
  staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$gomod")
  [[ -n $staging ]] || { log "no staging replaces found in $gomod"; exit 1; }
  for m in $staging; do (cd "$work" && go mod edit -replace="$m=$m@v0.$minor"); done
  local major=1 kminor="${minor%%.*}" pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$kminor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  (cd "$work" && go get "k8s.io/kubernetes@$K8S_VERSION" >/dev/null 2>&1 || true
   mkdir -p "$out.tmp"
   for c in kube-apiserver kube-scheduler kube-controller-manager kubectl; do
     log "  go build $c"
     go build -trimpath -ldflags "$ldflags" -o "$out.tmp/$c" "k8s.io/kubernetes/cmd/$c"
   done)
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "$out"
}

build_helm() {
  # with the ldflags of helm's own release build (its Makefile): the version, and the Kubernetes version of its
  # client-go as the default capabilities (without them `helm template` assumes v1.20 and fails kubeVersion checks)
  local out="$CACHE/bin/helm-$HELM_VERSION-release"
  [[ -x $out/helm ]] && { echo "$out"; return; }
  local work="$CACHE/work/helm-$HELM_VERSION"
  log "building helm $HELM_VERSION (cold: ~4 min)"
  wrapper_module "$work" helm.sh/helm/v3 "$HELM_VERSION"
  (cd "$work" && go get "helm.sh/helm/v3@$HELM_VERSION" >/dev/null 2>&1 || true
   local client_go major minor pkg=helm.sh/helm/v3
   client_go=$(go list -f '{{.Version}}' -m k8s.io/client-go)        # v0.<minor>.<patch>
   major=$(( $(echo "${client_go#v}" | cut -d. -f1) + 1 )); minor=$(echo "$client_go" | cut -d. -f2)
   go build -trimpath -ldflags "-s -w -X $pkg/internal/version.version=$HELM_VERSION \
       -X $pkg/internal/version.gitTreeState=clean \
       -X $pkg/pkg/lint/rules.k8sVersionMajor=$major -X $pkg/pkg/lint/rules.k8sVersionMinor=$minor \
       -X $pkg/pkg/chartutil.k8sVersionMajor=$major -X $pkg/pkg/chartutil.k8sVersionMinor=$minor" \
     -o "$out.tmp/helm" $pkg/cmd/helm)
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "$out"
}

build_kwok() {
  # kwok (fake nodes that "run" pods, for the scale benchmark), with the release build's version ldflags, plus the
  # upstream stages we reuse (node initialize/heartbeat, pod ready) copied next to the binary.
  local out="$CACHE/bin/kwok-$KWOK_VERSION"
  [[ -x $out/kwok ]] && { echo "$out"; return; }
  local work="$CACHE/work/kwok-$KWOK_VERSION"
  log "building kwok $KWOK_VERSION (cold: ~5 min)"
  wrapper_module "$work" sigs.k8s.io/kwok "$KWOK_VERSION"
  local consts=sigs.k8s.io/kwok/pkg/consts dir
  (cd "$work" && go get "sigs.k8s.io/kwok@$KWOK_VERSION" >/dev/null 2>&1 || true
   mkdir -p "$out.tmp/stages"
   go build -trimpath -ldflags "-s -w -X $consts.Version=${KWOK_VERSION#v} -X $consts.KubeVersion=${K8S_VERSION#v}" \
     -o "$out.tmp/kwok" sigs.k8s.io/kwok/cmd/kwok)
  dir=$(cd "$work" && go list -m -f '{{.Dir}}' "sigs.k8s.io/kwok")
  cp "$dir/kustomize/stage/node/fast/node-initialize.yaml" \
     "$dir/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
     "$dir/kustomize/stage/pod/fast/pod-ready.yaml" "$out.tmp/stages/"
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "$out"
}

build_kstatus() {
  # hack/kstatus: kstatus (sigs.k8s.io/cli-utils) reading one object, as Flux and kpt read health
  local out="$CACHE/bin/kstatus-$CLI_UTILS_VERSION"
  [[ -x $out/kstatus ]] && { echo "$out"; return; }
  local work="$CACHE/work/kstatus-$CLI_UTILS_VERSION" here
  here=$(cd "$(dirname "$0")" && pwd)
  log "building kstatus (sigs.k8s.io/cli-utils $CLI_UTILS_VERSION)"
  wrapper_module "$work" sigs.k8s.io/cli-utils "$CLI_UTILS_VERSION"
  cp "$here/kstatus/main.go" "$work/"
  (cd "$work" && go get "sigs.k8s.io/cli-utils@$CLI_UTILS_VERSION" >/dev/null 2>&1 || true
   go mod tidy >/dev/null 2>&1 || true
   go build -trimpath -ldflags "-s -w" -o "$out.tmp/kstatus" .)
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "$out"
}

build_kube_score() {
  # kube-score (a linter nobody here wrote), run on the rendered chart by the chart tests
  local out="$CACHE/bin/kube-score-$KUBE_SCORE_VERSION"
  [[ -x $out/kube-score ]] && { echo "$out"; return; }
  local work="$CACHE/work/kube-score-$KUBE_SCORE_VERSION"
  log "building kube-score $KUBE_SCORE_VERSION"
  wrapper_module "$work" github.com/zegl/kube-score "$KUBE_SCORE_VERSION"
  (cd "$work" && go get "github.com/zegl/kube-score@$KUBE_SCORE_VERSION" >/dev/null 2>&1 || true
   go build -trimpath -ldflags "-s -w -X main.version=${KUBE_SCORE_VERSION#v}" -o "$out.tmp/kube-score" \
     github.com/zegl/kube-score/cmd/kube-score)
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "$out"
}

build_kueue() {
  # Kueue's manager (the real one, tests run the job queueing against it), with its CRDs copied next to it
  local out="$CACHE/bin/kueue-$KUEUE_VERSION"
  [[ -x $out/kueue && -d $out/crds ]] && { echo "$out"; return; }
  local work="$CACHE/work/kueue-$KUEUE_VERSION" dir
  log "building kueue $KUEUE_VERSION (cold: ~6 min)"
  wrapper_module "$work" sigs.k8s.io/kueue "$KUEUE_VERSION"
  (cd "$work" && go get "sigs.k8s.io/kueue@$KUEUE_VERSION" >/dev/null 2>&1 || true
   mkdir -p "$out.tmp/crds"
   go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
     -o "$out.tmp/kueue" sigs.k8s.io/kueue/cmd/kueue)
  dir=$(cd "$work" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  cp "$dir"/config/components/crd/bases/*.yaml "$out.tmp/crds/"
  cp "$dir/config/components/webhook/manifests.yaml" "$out.tmp/webhooks.yaml"
  chmod -R u+w "$out.tmp"
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "$out"
}

case "${1:-all}" in
  etcd) build_etcd ;;
  kube) build_kube ;;
  helm) build_helm ;;
  kwok) build_kwok ;;
  kstatus) build_kstatus ;;
  kube-score) build_kube_score ;;
  kueue) build_kueue ;;
  all) build_etcd; build_kube; build_helm; build_kwok; build_kstatus; build_kube_score; build_kueue ;;
  *) log "unknown component $1"; exit 2 ;;
esac
