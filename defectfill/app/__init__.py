"""The browser app (`app_defectfill.py`): what it is asked for (`settings`), runs as the app shows them (`runs`), the mask editor's values
(`editor`), the handlers the page calls (`handlers`, plain functions the tests call without a browser),
the Gradio page (`ui`), and driving the page in a headless browser (`browser`)."""
