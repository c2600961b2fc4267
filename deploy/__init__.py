"""pocketseg.deploy: pocketseg doctor and the container entry point."""
