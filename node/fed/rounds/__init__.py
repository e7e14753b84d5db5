"""Federated rounds split by protocol stage (hivemind's `averaging/` layout): what both roles share (`context`,
`inbox`, `events`), the aggregator's side (`collect`: the update protocol's receiving end; `aggregator`: open,
wait, combine, announce) and the member's side (`member`: train, account, release, send, fetch, apply)."""
