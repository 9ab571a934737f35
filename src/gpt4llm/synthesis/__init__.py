"""Making the paper's data again with any OpenAI-compatible teacher: answers, translations, scores."""
