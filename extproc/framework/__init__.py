"""The plugin framework: hookspecs, plugin loading and hook calls, the request context and lifecycle, config."""
