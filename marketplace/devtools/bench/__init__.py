"""Benchmarks behind ``python manage.py bench <name>``.

Each module offers ``add_arguments(parser)`` and ``run(**options)``; ``run`` returns one JSON-serialisable dict,
which the command prints as the only line on stdout.
"""
