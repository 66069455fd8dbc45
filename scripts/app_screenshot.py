#!/usr/bin/env python
"""The command line of `defectfill.app.browser`: drive the running app in headless chromium (paint a stroke,
Generate) and save the page as the README's screenshot."""

from defectfill.app.browser import main

if __name__ == "__main__":
    main()
