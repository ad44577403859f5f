"""Flower settings for the compose stack (mounted at /etc/flower/flowerconfig.py, `--conf`).

Authentication: HTTP basic auth on every page and API call (FLOWER_UNAUTHENTICATED_API stays
unset), with the login from the compose secret flower_basic_auth (deploy/compose/
flower-basic-auth, `user:password`); Flower refuses to start while it is missing or the
placeholder. Flower listens only on 127.0.0.1 of the host.

Task arguments are patient ids: the worker's tasks are sent without argsrepr/kwargsrepr, so
Celery's events carry the real arguments. So /tasks shows no argument, keyword or result column,
and format_task blanks them on every task Flower renders (task list, task page, API).
"""

import os
from pathlib import Path

SECRET = Path(os.environ.get("FLOWER_BASIC_AUTH_FILE", "/run/secrets/flower_basic_auth"))


def _login(path: Path) -> str:
    try:
        login = path.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"flower: no login: {path} unreadable ({exc})") from None
    user, _, password = login.partition(":")
    if not user or len(password) < 12 or "change-me" in login:
        raise SystemExit(f"flower: {path} must hold user:password (12+ characters, not the "
                         "placeholder)")
    return login


basic_auth = [_login(SECRET)]
tasks_columns = "name,uuid,state,received,started,runtime,worker"


def format_task(task):  # Flower's hook: the task as it will be shown
    """Hide what may name a patient: the arguments, keyword arguments and the result."""
    task.args = task.kwargs = task.result = "(hidden)"
    return task
