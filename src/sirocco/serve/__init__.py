"""An OpenAI-compatible HTTP server over the Engine (``sirocco serve``): app.py the routes, protocol.py the wire
format, doors.py what a request must show before any work is done for it (Host, Content-Type, body size, CORS),
runner.py the engine's thread, metrics.py the Prometheus metrics, pipeline.py the channel that gives rank 0's
commands to every rank of a pipeline."""
