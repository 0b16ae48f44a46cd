"""Prompt texts several test modules share."""

# The spam prompt of the fine-tuning and llama.cpp tests: the model's own prompt, no model pinned.
SPAM_PROMPT = """---
output: {type: label, labels: [ham, spam]}
---
user:
Is this SMS spam or ham? Answer with one word.

{{ input }}
"""
