"""The growth lab's report of a results directory (``extproc loadtest --out DIR``): rich tables on
the terminal, ``index.html`` with PNG charts and ``report.json``, per scale and mode.

* :mod:`~extproc.lab.report.compute`: every number, with its definition (cost split, GPU view,
  latency, caches, tiers, retries), and the naive-against-gateway comparison;
* :mod:`~extproc.lab.report.results`: reading the runs; :mod:`~extproc.lab.report.tables`,
  :mod:`~extproc.lab.report.charts`, :mod:`~extproc.lab.report.html`: the three renderings;
* :mod:`~extproc.lab.report.build`: all of it into ``DIR/report/``;
  :mod:`~extproc.lab.report.command`: ``extproc lab-report DIR``.
"""
