"""The `extproc` command line: serve, up (the local stack), check-config, admin, route, report."""
