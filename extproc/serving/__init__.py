"""Running the service: worker processes on one port, health, graceful stop."""
