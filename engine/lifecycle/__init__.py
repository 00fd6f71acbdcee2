"""What happens to stored instances after they arrive: delete, compaction (and the
background loop that runs it in `serve`), the quota policy, verify and scrub, and the
catalog rebuilt from segments. Above the store: the store reports usage, the policy here
decides."""
