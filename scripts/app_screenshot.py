#!/usr/bin/env python
"""Drive the running app in headless chromium (paint a stroke, Generate; `defectfill.app.browser`) and save the
page as the README's screenshot."""

import argparse

from defectfill.app.browser import take_screenshot


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="The running app.")
    parser.add_argument("--output", default="docs/app_screenshot.png", help="Screenshot file (PNG).")
    parser.add_argument("--width", type=int, default=1400, help="Browser window width.")
    parser.add_argument("--height", type=int, default=1250, help="Browser window height.")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    take_screenshot(args.url, args.output, args.width, args.height)
    print(args.output)


if __name__ == "__main__":
    main(parse_args())
