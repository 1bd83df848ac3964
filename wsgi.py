"""WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app` from the repository root."""

from service import create_app
from service.auth import check_bind

app = create_app()
# gunicorn.conf.py checks the real bind addresses; this covers other WSGI servers started with HOST.
check_bind(app.config["SETTINGS"], [app.config["SETTINGS"].host])
