"""What operators run the marketplace with: readiness (``health``), Prometheus metrics
(``metrics``), and error reports and traces that configuration switches on (``telemetry``).
Part of the project package: it reads every app, and no app imports it."""
