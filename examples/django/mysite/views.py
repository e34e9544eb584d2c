from __future__ import annotations

import os

import django
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from sockherd import worker


@require_GET
def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse(
        f"hello from django {django.get_version()} (worker {worker.id or 'standalone'}, pid {os.getpid()})\n",
        content_type="text/plain; charset=utf-8",
    )


@csrf_exempt  # an API endpoint: no session cookie, so nothing for CSRF to protect
@require_POST
def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type="application/octet-stream")
