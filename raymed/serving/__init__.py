"""The HTTP endpoint on Ray Serve: deployments, request codecs, the Serve config, the client."""
