"""Running chains (issue 18): a published chain's steps, each a personality or a pulled adapter, run in order."""
