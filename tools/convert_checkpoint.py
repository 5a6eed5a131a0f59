#!/usr/bin/env python
"""Convert checkpoints without the console script: same arguments as `megatron-elastic convert`.

    python tools/convert_checkpoint.py from-hf HF_DIR NATIVE_DIR
    python tools/convert_checkpoint.py to-hf NATIVE_DIR HF_DIR --dtype bfloat16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
