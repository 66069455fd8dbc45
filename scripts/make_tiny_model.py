#!/usr/bin/env python
"""Build the tiny, randomly initialised SD2-inpainting-shaped pipeline that the tests and the offline
demo load exactly as users load ``sd2-community/stable-diffusion-2-inpainting``.

The command line of `scripts/tiny/model.py`, whose docstring says more.
"""

from tiny.model import main

if __name__ == "__main__":
    main()
