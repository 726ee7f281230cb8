"""The read-only web console: overview, live tags, trends from the local store, the config.

Served by the daemon on 127.0.0.1 by default (docs/console.md). Pages and the script that
draws charts ship in this package (static/); nothing is loaded from outside it. Import the
submodules: `settings` is light (the config loader uses it), `app` and `service` are not.
"""
