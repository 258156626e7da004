#!/usr/bin/env bash
# Fill compose/wheels/ with every wheel the hopscope image needs (pinned by constraints.txt),
# plus the build backend, so the image builds with `pip install --no-index`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
"$PIP" wheel --quiet -c constraints.txt -w compose/wheels . 2>&1 | grep -v "^WARNING: Location" || true
"$PIP" download --quiet -d compose/wheels "setuptools>=77" wheel 2>&1 | grep -v "^WARNING: Location" || true
rm -f compose/wheels/hopscope-*.whl
echo "$(ls compose/wheels/*.whl | wc -l) wheels in compose/wheels" >&2
