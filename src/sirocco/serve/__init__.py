"""An OpenAI-compatible HTTP server over the Engine (``sirocco serve``): app.py the routes, protocol.py the wire
format, runner.py the engine's thread, metrics.py the Prometheus metrics."""
