"""Shedshare's Django project: settings, URLs, the Celery app and the WSGI/ASGI entry points.

This package imports nothing, so its sub-packages (the renter CLI among them) load alone."""
