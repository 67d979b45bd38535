"""`run_server`: the service on uvicorn, one process or several (what `hiervec serve` runs).

    >>> run_server(ServiceSettings(model="model.pt"), ServerSettings(port=8000))   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import replace

from .settings import ServerSettings, ServiceSettings


def run_server(settings: ServiceSettings, server: ServerSettings = ServerSettings(),
               log: Callable[[str], None] = print) -> None:
    """Serve until stopped. Several workers over a Milvus Lite file share one Lite process, started
    (and stopped) here; each worker reads the settings from the environment (secrets too, which
    `ServiceSettings.to_json` leaves out). A bad model or a mismatched collection fails before
    uvicorn starts, as the library's error."""
    import uvicorn

    from milvus_store import ConnectionSettings, LiteProcess

    from .app import create_app
    from .core import Service
    from .guard import configure

    protocol = configure(server.header_timeout_s, server.max_connections_per_client)
    with contextlib.ExitStack() as stack:
        if server.workers > 1 and ConnectionSettings.resolve(settings.uri).is_local:
            lite = stack.enter_context(LiteProcess(settings.uri))
            settings = replace(settings, store_uri=lite.uri)
        service = Service.open(settings)
        if not settings.api_key:
            log("warning: no API key: whoever reaches this server can add and delete images")
        separate = service.store_uri != settings.uri  # a Lite file served from a process of its own
        served = settings.uri if separate else service.index(None).store.settings.display_uri
        log(f"serving {settings.collection!r} of {served} on http://{server.host}:{server.port}/ (API schema at "
            f"/docs)" + (" (Milvus Lite in a process of its own)" if separate else ""))
        if server.workers == 1:
            try:
                uvicorn.run(create_app(service), host=server.host, port=server.port, log_level="info", http=protocol)
            finally:  # the app's shutdown closed it, unless uvicorn never started it (a port in use)
                service.close()
            return
        service.close()
        os.environ["HIERVEC_SERVE_SETTINGS"] = settings.to_json()
        for name, secret in (("HIERVEC_MILVUS_TOKEN", settings.token), ("HIERVEC_API_KEY", settings.api_key)):
            if secret:
                os.environ[name] = secret
        uvicorn.run("service.app:app_from_environment", factory=True, host=server.host, port=server.port,
                    workers=server.workers, http=protocol, log_level="info")
