#!/usr/bin/env python
"""Does a tiny base model learn defects it was never tuned on?

The command line of `scripts/tiny/generalisation.py`, whose docstring says more.
"""

from tiny.generalisation import main

if __name__ == "__main__":
    main()
