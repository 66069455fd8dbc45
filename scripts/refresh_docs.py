#!/usr/bin/env python
"""Run the repository's demos as a user runs them and write what they measure into the docs (previews, timings,
tables, the model README's tables): after a change of a config, this one command and one commit.

The command line of `scripts/tiny/demos.py`, whose docstring lists the parts.
"""

from tiny.demos import main

if __name__ == "__main__":
    main()
