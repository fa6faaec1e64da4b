"""``weft viz``: the mesh's golden metrics for a person, from the agents or a Prometheus.

Three layers, so the arithmetic is testable without a lab:

* `weft.viz.expo` — parse Prometheus text exposition (what each agent serves on
  ``:15020/metrics``) and the JSON of Prometheus's query API into plain `Sample` lists;
* `weft.viz.model` — sans-I/O aggregation: two snapshots some seconds apart become
  per-workload success rate, RPS, latency quantiles (from ``response_latency_ms``
  buckets), TCP connections, edges and per-route counts;
* `weft.viz.sources` — the only I/O: scraping agents (in the lab, from inside each node's
  network namespace) or querying a Prometheus, and reading a lab's pods and services.

Why deltas of counters rather than the counters themselves: an agent's counters run from
its start, so "success rate" of cumulative counts would mostly describe the past. Two
scrapes ``--window`` seconds apart give what is happening now, as ``rate()`` does; a
counter that went down between them (agent restarted) counts from zero, as in PromQL.
"""
