"""Shared state: one store interface, in memory or on Redis; policies never talk to Redis directly."""
