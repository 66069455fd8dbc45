#!/usr/bin/env python
"""Pre-train the tiny SD2-inpainting-shaped model so the offline demo and the tests show real learning.

The command line of `scripts/tiny/pretrain.py`, whose docstring says more.
"""

from tiny.pretrain import main

if __name__ == "__main__":
    main()
