"""The team server: an OpenAI-compatible gateway over deployments (`tunelab serve`)."""
