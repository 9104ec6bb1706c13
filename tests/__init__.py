"""raylens's tests, a package: helpers are imported as ``tests.servers``, ``tests.sourcegen``...

Run from the repo root: ``make test-fast`` (unit tests, no server, no Ray) or ``make test``.
"""
