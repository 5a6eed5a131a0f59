#!/usr/bin/env python
"""List the tensors of a native or Hugging Face model directory (name, shape, dtype) without
loading them, and the parameter total; exit code 2 on a missing or unreadable checkpoint.

    python tools/inspect_checkpoint.py DIR [--filter SUBSTRING]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from safetensors import SafetensorError, safe_open

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--filter", default="", help="only names containing this substring")
    args = parser.parse_args(argv)
    files = sorted(args.path.glob("*.safetensors"))
    if not files:
        print(f"inspect: error: no .safetensors files in {str(args.path)!r}", file=sys.stderr)
        return 2
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in sorted(f.keys()):
                    sl = f.get_slice(name)
                    shape = sl.get_shape()
                    numel = 1
                    for s in shape:
                        numel *= s
                    total += numel
                    if args.filter in name:
                        print(f"{name:<60} {str(tuple(shape)):<22} {sl.get_dtype():<6} {file.name}")
        except (SafetensorError, OSError) as exc:
            print(f"inspect: error: {file} cannot be read ({exc}); it is truncated or corrupt", file=sys.stderr)
            return 2
    print(f"total parameters: {total:,} in {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
