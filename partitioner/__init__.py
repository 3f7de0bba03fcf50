"""Dataset -> features -> (balanced) k-means -> shards per cluster, centroids and stats."""
