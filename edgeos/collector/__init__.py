"""Plant side: `edgeos collect` takes gateways' units off the broker into PostgreSQL, exactly once.

Imports `edgeos.wire` and nothing else of the daemon; the daemon never imports this package
(its dependency, asyncpg, is the optional extra `edgeos[collector]`). docs/collector.md.
"""
