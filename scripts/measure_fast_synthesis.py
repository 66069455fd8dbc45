#!/usr/bin/env python
"""How few denoising steps keep what synthesis paints: measured on the procedural defect families of the
generalisation check.

The command line of `scripts/tiny/fast_synthesis.py`, whose docstring says more.
"""

from tiny.fast_synthesis import main

if __name__ == "__main__":
    main()
