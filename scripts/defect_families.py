#!/usr/bin/env python
"""Procedural defect families that neither the tiny model's pre-training nor its config ever saw.

The command line of `scripts/tiny/families.py`, whose docstring says more.
"""

from tiny.families import main

if __name__ == "__main__":
    main()
