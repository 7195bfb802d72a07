"""Print requirements/lock.txt for the current environment: every installed distribution at its
exact version, except torch (pinned by scripts/setup.sh) and maep_fast itself."""
from __future__ import annotations

import sys
from importlib.metadata import distributions
from pathlib import Path

SKIP = {"torch", "maep_fast", "maep-fast", "pip"}


def main() -> None:
    lock = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
    header = [line for line in lock.read_text().splitlines() if line.startswith("#")] if lock.exists() else []
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-") not in
                   {s.replace("_", "-") for s in SKIP}}, key=str.lower)
    sys.stdout.write("\n".join(header + pins) + "\n")


if __name__ == "__main__":
    main()
