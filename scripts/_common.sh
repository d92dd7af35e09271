# Sourced by scripts/*.sh: strict mode, the repository root as the working directory, and the project's python
# (PYTHON, else .venv/bin/python, else python3) as $PY.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
