"""The ASGI entry point: ``python -m sockherd.uvicorn mysite.asgi:application``.

Wrapped in :class:`sockherd.asgi.SuspendMiddleware`, so a worker of a
``sockherd restart --suspended`` deploy holds requests while ``manage.py migrate`` runs,
until ``sockherd resume``.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from sockherd.asgi import SuspendMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

# django-stubs types the scope as a dict where the ASGI spec (and sockherd) say a mapping.
application = SuspendMiddleware(get_asgi_application())  # type: ignore[arg-type]
