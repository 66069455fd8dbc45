#!/usr/bin/env python
"""Measure what the pre-trained tiny model has learned, against the same architecture at random init.

The command line of `scripts/tiny/measure.py`, whose docstring says more.
"""

from tiny.measure import main

if __name__ == "__main__":
    main()
