"""The Celery app and its tasks."""
