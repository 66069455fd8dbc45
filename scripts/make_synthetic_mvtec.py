#!/usr/bin/env python
"""Write a small, deterministic, synthetic dataset in the official MVTec AD folder layout.

The command line of `scripts/tiny/synthetic_data.py`, whose docstring says more.
"""

from tiny.synthetic_data import main

if __name__ == "__main__":
    main()
