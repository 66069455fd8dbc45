#!/usr/bin/env python
"""Does a tiny base model learn defects it was never tuned on?

The command line of `defectfill.tiny.generalisation`, whose docstring says more.
"""

from defectfill.tiny.generalisation import main

if __name__ == "__main__":
    main()
