"""The core: admission, batching and post-processing between HTTP and backends."""
