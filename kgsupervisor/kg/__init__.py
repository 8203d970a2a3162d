"""Talking to the KG service: the HTTP client, the answer model, breakers, endpoints, and the reference service."""
