#!/usr/bin/env bash
# First level for a whole dataset on this machine: check, then run (resumable).
#   bash workflows/first_level.sh configs/local.yaml
set -euo pipefail
config="${1:?usage: first_level.sh CONFIG.yaml}"
bigglm validate "$config"
bigglm run "$config"
