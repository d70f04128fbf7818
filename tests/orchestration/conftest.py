"""The served deployment (webserver + daemon) shared by test_webserver.py and test_ui.py."""

from tests.orchestration.test_webserver import deployment  # noqa: F401  (the shared module-scoped fixture)
