"""An OpenAI-compatible HTTP server over the Engine (``sirocco serve``): app.py the routes, protocol.py the wire
format, runner.py the engine's thread, metrics.py the Prometheus metrics, pipeline.py the channel that gives rank
0's commands to every rank of a pipeline."""
