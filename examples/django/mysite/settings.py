"""The least a Django project needs to answer HTTP: no database, no apps, no templates."""

from __future__ import annotations

import os

# Set it in sockherd.toml's `environment`, or pass it through with `env = ["DJANGO_SECRET_KEY"]`.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-example-key-change-me")
DEBUG = False
# The Host nginx sends upstream: your domain with `proxy_set_header Host $host`, else the upstream's name.
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")

ROOT_URLCONF = "mysite.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
