#!/usr/bin/env bash
# The "same startup script" the operator resubmits after every preemption. Launch it through ckpt-run:
#   command: ["ckpt-run", "--", "bash", "/workspace/startup.sh"]
# ckpt-run forwards SIGTERM to the whole process group, so python gets it even though bash is in between.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
echo "startup.sh: attempt ${CKPT_ATTEMPT:-0} (${CKPT_RESTART_REASON:-none}), checkpoints in ${CKPT_DIR:-./checkpoints}"
python "$here/train.py" "$@"
