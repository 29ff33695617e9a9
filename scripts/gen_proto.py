"""Regenerate shared/plugin_pb2.py and its stub from shared/plugin.proto with the bundled protoc.

`--check` regenerates into a temporary folder and exits 1 if the committed files differ.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

SHARED = Path(__file__).resolve().parent.parent / "shared"
OUTPUTS = ("plugin_pb2.py", "plugin_pb2.pyi")


def generate(out_dir: Path) -> None:
    args = [
        "protoc",
        f"-I{SHARED}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(SHARED / "plugin.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    opts = parser.parse_args()
    if not opts.check:
        generate(SHARED)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in OUTPUTS if not filecmp.cmp(Path(tmp) / n, SHARED / n, shallow=False)]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run ./dev proto", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
