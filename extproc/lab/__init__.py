"""The growth lab: what the gateway does to cost per request as traffic grows.

* :mod:`extproc.lab.workload`: a workload model (YAML) and a deterministic generator of planned
  requests from it (``PlannedRequest``, in :mod:`extproc.lab.workload.plan`).
* :mod:`extproc.lab.runner`: drives an OpenAI-compatible endpoint with a workload at scale factors,
  naive baseline against the gateway, and records every request.
* :mod:`extproc.lab.report`: tables, an HTML page with PNG charts and a JSON file from a run.
* :mod:`extproc.lab.simulate`: past one machine, a discrete-event capacity model (SimPy) of a
  day at 1x..5x with static, CPU-based and queue-depth autoscaling.

The lab is a client of the gateway: it imports nothing of the serving path (``extproc.serving``,
``extproc.framework``, the plugins); the layer contract in pyproject.toml enforces it.
"""
