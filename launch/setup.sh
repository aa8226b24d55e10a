#!/usr/bin/env bash
# Create .venv and install melanoma-dist with its pinned stack (idempotent).
#
#   bash launch/setup.sh            # CPU host (Horovod with Gloo)
#   GPU=1 bash launch/setup.sh      # GPU host (tensorflow[and-cuda], Horovod with NCCL)
#
# Horovod has no wheel: it compiles against the TensorFlow installed in the venv,
# so it is installed after TensorFlow, without build isolation (with isolation the
# build cannot see TensorFlow). Everything is constrained by launch/constraints.txt
# so that the second pip call cannot move numpy or TensorFlow.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
HOROVOD_VERSION=0.28.1

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade "pip<26" "setuptools<80" wheel packaging

req=launch/requirements.txt
if [ "${GPU:-0}" = "1" ]; then
  req=$(mktemp); sed 's/^tensorflow-cpu==\(.*\)/tensorflow[and-cuda]==\1/' launch/requirements.txt > "$req"
fi
echo "[setup] installing the pinned stack ($req)"
pip install -q -c launch/constraints.txt -r "$req"

if ! "$VENV/bin/python" -c "import horovod.tensorflow" 2>/dev/null; then
  echo "[setup] building horovod==$HOROVOD_VERSION against the installed TensorFlow (several minutes)"
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
         HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
  if [ "${GPU:-0}" = "1" ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  pip install -q --no-build-isolation --no-cache-dir -c launch/constraints.txt \
      "horovod==$HOROVOD_VERSION"
fi

pip install -q --no-deps -e .
"$VENV/bin/python" - <<'PY'
import horovod.tensorflow as hvd, keras, numpy, ray, tensorflow as tf
from melanoma_dist.model.pretrained import weights_file
lite = [weights_file(f"efficientnet_lite{n}").name for n in range(3)]
print(f"[setup] ok: tensorflow {tf.__version__}, keras {keras.__version__}, "
      f"numpy {numpy.__version__}, ray {ray.__version__}, horovod built with "
      f"gloo={hvd.gloo_built()} nccl={hvd.nccl_built()}; ImageNet weights {', '.join(lite)}")
PY
