#!/usr/bin/env python
"""Measure what the pre-trained tiny model has learned, against the same architecture at random init.

The command line of `defectfill.tiny.measure`, whose docstring says more.
"""

from defectfill.tiny.measure import main

if __name__ == "__main__":
    main()
