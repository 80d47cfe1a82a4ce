"""The command-line tools (``python tools/<name>.py``); from the repository root they import as
``tools.<name>``, which is how the tests use them."""
