"""The block-by-block (sequential) driver, split by concern: memory (pinned host caches, prefetch, moving module
tensors) and timing (phase timer). The driver itself is still diffptq.algo.sequential."""
