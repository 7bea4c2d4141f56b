#!/usr/bin/env bash
# Set up rankdetr's virtual environment at <repo>/.venv, once. Every step checks whether it is
# already done and skips it then, so running this again costs a few seconds (one interpreter start
# when everything is in place).
#
#   1. the virtual environment (python3 -m venv; $PYTHON picks the interpreter, >= 3.10)
#   2. torch + torchvision ($RANKDETR_TORCH, default "torch==2.14.1 torchvision==0.29.1";
#      $RANKDETR_TORCH_PIP_ARGS adds pip options, e.g. "--index-url https://download.pytorch.org/whl/cu128").
#      A torch already importable in the environment is kept as it is.
#   3. detectron2 (tools/install_detectron2.py: an importable one, $DETECTRON2_SOURCE, upstream
#      when reachable, else the repaired v0.6 release)
#   4. rankdetr in editable mode with its compiled op and the rest of the stack (pyproject.toml),
#      redone only when setup.py, pyproject.toml or csrc/ changed since the last build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RANKDETR_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
TORCH_SPEC="${RANKDETR_TORCH:-torch==2.14.1 torchvision==0.29.1}"
STAMP="$VENV/.rankdetr-build-stamp"

say() { echo "[setup] $*"; }
# pip, without this workplace's noise about index folders it skips; keeps pip's exit status.
pip_quiet() { "$PY" -m pip install --progress-bar off "$@" > >(grep -v "^WARNING: Location") 2>&1; }

source_hash() {
  # What the editable install and the compiled op depend on.
  (cd "$ROOT" && find setup.py pyproject.toml csrc -type f -print0 | sort -z | xargs -0 sha256sum) |
    sha256sum | cut -d' ' -f1
}

make_venv() {
  if [ -x "$PY" ]; then
    say "virtual environment: $VENV (exists)"
    return
  fi
  local python="${PYTHON:-python3}"
  "$python" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' ||
    { echo "rankdetr needs Python >= 3.10; set PYTHON=/path/to/python3.x" >&2; exit 1; }
  say "creating virtual environment $VENV with $($python --version)"
  "$python" -m venv "$VENV"
}

install_torch() {
  if "$PY" -c "import torch, torchvision" 2>/dev/null; then
    say "torch: $("$PY" -c 'import torch, torchvision as tv; print(torch.__version__, "/ torchvision", tv.__version__)') (installed)"
    return
  fi
  say "installing $TORCH_SPEC ${RANKDETR_TORCH_PIP_ARGS:-}"
  # shellcheck disable=SC2086  # the spec and the options are lists of words
  pip_quiet $TORCH_SPEC ${RANKDETR_TORCH_PIP_ARGS:-}
  "$PY" -c "import torch, torchvision" || { echo "torch did not install" >&2; exit 1; }
}

install_detectron2() {
  "$PY" "$ROOT/tools/install_detectron2.py"
}

install_rankdetr() {
  local want
  want="$(source_hash)"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] &&
    "$PY" -c "import rankdetr._C" 2>/dev/null; then
    say "rankdetr: built and installed (sources unchanged)"
    return
  fi
  say "installing rankdetr (editable) and building its extension; this takes a minute or two"
  # ninja makes the extension build incremental and parallel.
  "$PY" -c "import ninja" 2>/dev/null || pip_quiet ninja
  # [onnx]: the ONNX export and its tests (tests/export) run in CI too.
  (cd "$ROOT" && pip_quiet --no-build-isolation -e ".[dev,onnx]")
  "$PY" -c "import rankdetr._C" ||
    { echo "rankdetr's extension did not build; see the compiler output above" >&2; exit 1; }
  echo "$want" >"$STAMP"
}

# A second run's common case, everything in place, checked in one interpreter (each separate
# check imported torch again: 15 s in all, against ~5 s here). Prints the versions; fails (and the
# steps below then check and install one by one) when anything is missing, stale or broken.
already_set_up() {
  [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(source_hash)" ] || return 1
  "$PY" -c '
import torch, torchvision, detectron2, detectron2.config, detectron2.engine, rankdetr, rankdetr._C
print(torch.__version__, torchvision.__version__, detectron2.__version__, rankdetr.__version__)
' 2>/dev/null | tail -n 1
}

main() {
  local start=$SECONDS versions torch_v torchvision_v detectron2_v rankdetr_v
  if versions="$(already_set_up)"; then
    read -r torch_v torchvision_v detectron2_v rankdetr_v <<<"$versions"
    say "virtual environment: $VENV (exists)"
    say "torch: $torch_v / torchvision $torchvision_v (installed)"
    say "detectron2 $detectron2_v: importable, nothing to do"
    say "rankdetr: built and installed (sources unchanged)"
    say "ready in $((SECONDS - start)) s: rankdetr $rankdetr_v / detectron2 $detectron2_v"
    return
  fi
  make_venv
  install_torch
  install_detectron2
  install_rankdetr
  say "ready in $((SECONDS - start)) s: $("$PY" -c 'import rankdetr, detectron2; print("rankdetr", rankdetr.__version__, "/ detectron2", detectron2.__version__)')"
}

main "$@"
