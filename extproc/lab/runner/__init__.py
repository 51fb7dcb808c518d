"""The growth lab's load runner: replays a workload's plan against an OpenAI-compatible endpoint,
open loop, with the clients' own retries, and records every request (see README.md here).

* :mod:`~extproc.lab.runner.driver`: the open-loop asyncio driver (:func:`drive`);
* :mod:`~extproc.lab.runner.exchange`: one attempt over HTTP, measured (status, latency, TTFT, usage, headers);
* :mod:`~extproc.lab.runner.records`: what is recorded per attempt and per request;
* :mod:`~extproc.lab.runner.scrape`: Prometheus snapshots before and after, and their delta;
* :mod:`~extproc.lab.runner.run`: one measured run written as ``requests.jsonl`` + ``summary.json``;
* :mod:`~extproc.lab.runner.progress`: the rich progress bar.
"""
