#!/usr/bin/env bash
# Installs a real OpenAI-compatible llama.cpp server (the PyPI package `llama-cpp-python[server]`, built from
# source for this CPU) into a cached virtualenv outside the repo, for the real-server test tier.
# Idempotent: the first run builds (several minutes on 2 cores); later runs only check the venv and return.
# Prints the venv's python on stdout (progress and the start command go to stderr).
#
#   LAPCE_AI_LLAMA_SERVER_VENV   where the venv lives (default: $HOME/.cache/lapce-ai/llama-server-venv-<version>)
#   CMAKE_BUILD_PARALLEL_LEVEL   build jobs for llama.cpp (default: number of cores)
#   LAPCE_AI_TEST_MODEL          when set, a one-token generation checks the build before it is accepted
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
REQUIREMENT="llama-cpp-python[server]==${LLAMA_CPP_PYTHON_VERSION}"

venv="${LAPCE_AI_LLAMA_SERVER_VENV:-${HOME}/.cache/lapce-ai/llama-server-venv-${LLAMA_CPP_PYTHON_VERSION}}"
python="${venv}/bin/python"
stamp="${venv}/.lapce-ai-installed"
# llama.cpp tuned for the CPU it is built on (the venv is a per-machine cache, never shipped), minus Intel AMX:
# ggml's AMX matmul segfaults on the first Q4_1 decode on a Sapphire Rapids KVM guest (ggml_backend_amx_mul_mat).
build_cmake_args="-DGGML_NATIVE=ON"
build_cflags=""
if echo 'int main(void) { return 0; }' | "${CC:-cc}" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -x c -o /dev/null - 2>/dev/null; then
    build_cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
build_id="${REQUIREMENT} ${build_cmake_args} ${build_cflags}"

print_usage() {
    echo "llama-server: start it with" >&2
    echo "  ${python} -m llama_cpp.server --model MODEL.gguf --host 127.0.0.1 --port 8080" >&2
}

installed_version() {
    "${python}" -c 'import llama_cpp, llama_cpp.server; print(llama_cpp.__version__)' 2>/dev/null || true
}

smoke_test() {
    [[ -n "${LAPCE_AI_TEST_MODEL:-}" ]] || return 0
    "${python}" - "${LAPCE_AI_TEST_MODEL}" <<'PY' >&2
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)
out = llm("def add(a, b):\n    return", max_tokens=2, temperature=0)
assert out["usage"]["prompt_tokens"] > 0, out
PY
}

if [[ -f "${stamp}" ]] && [[ "$(cat "${stamp}")" == "${build_id}" ]] \
    && [[ "$(installed_version)" == "${LLAMA_CPP_PYTHON_VERSION}" ]]; then
    print_usage
    echo "${python}"
    exit 0
fi

echo "llama-server: building ${REQUIREMENT} for this CPU into ${venv} (several minutes)" >&2
rm -rf "${venv}"
mkdir -p "$(dirname "${venv}")"
python3 -m venv "${venv}"
started="$(date +%s)"
CMAKE_ARGS="${CMAKE_ARGS:-} ${build_cmake_args}" \
    CFLAGS="${CFLAGS:-} ${build_cflags}" CXXFLAGS="${CXXFLAGS:-} ${build_cflags}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "${python}" -m pip install --quiet --no-cache-dir "${REQUIREMENT}" >&2
if [[ "$(installed_version)" != "${LLAMA_CPP_PYTHON_VERSION}" ]]; then
    echo "llama-server: ${REQUIREMENT} installed but llama_cpp.server does not import from ${python}" >&2
    exit 1
fi
if ! smoke_test; then
    echo "llama-server: the build cannot generate with ${LAPCE_AI_TEST_MODEL} (it crashed or failed above)" >&2
    exit 1
fi
echo "${build_id}" > "${stamp}"
echo "llama-server: built in $(($(date +%s) - started)) s" >&2
print_usage
echo "${python}"
