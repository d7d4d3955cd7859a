#!/usr/bin/env bash
# Renders deploy/manifests/tessera.yaml from the Helm chart (helm from target/venv, installed by
# scripts/test.sh). tests/tests/deploy.rs fails when the committed file and the chart differ.
set -euo pipefail
cd "$(dirname "$0")/.."
helm="${HELM:-target/venv/bin/helm}"
{
  echo "# Rendered from deploy/helm/tessera with default values by scripts/render-manifests.sh."
  echo "# Do not edit: change the chart and run the script again."
  "$helm" template tessera deploy/helm/tessera --namespace tessera-system
} > deploy/manifests/tessera.yaml
