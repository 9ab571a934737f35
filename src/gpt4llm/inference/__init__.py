"""Producing text from a model: batched local generation, best-of-N, the OpenAI-compatible server, and the client
for any OpenAI-compatible endpoint."""
